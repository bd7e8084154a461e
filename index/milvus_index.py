"""The distributed backend: a Milvus collection behind the same :class:`~index.base.VectorIndex` contract.

One collection per gallery, with the schema::

    id           INT64 primary key (our item id, no auto-id)
    vector       FLOAT_VECTOR(dim), metric IP on unit vectors (= cosine)
    camera       INT64            (-1 = unknown)
    captured_at  DOUBLE, nullable (NULL = unknown; NULL never passes a time window)
    identity     INT64            (-1 = unknown)

so every :class:`~index.base.SearchFilter` is pushed down as one boolean expression, e.g.
``camera in [1, 2] and captured_at >= 1700000000.0 and identity != 7``. Long allow lists are split
into several searches whose top-k are merged.

Index types by spec: ``flat`` -> FLAT, ``ivf-flat`` -> IVF_FLAT, ``ivf-sq8`` -> IVF_SQ8, ``ivf-pq``
-> IVF_PQ, ``hnsw`` -> HNSW, and on a GPU-enabled cluster ``gpu-flat`` -> GPU_BRUTE_FORCE,
``gpu-ivf-flat`` -> GPU_IVF_FLAT, ``gpu-ivf-pq`` -> GPU_IVF_PQ, ``gpu-cagra`` -> GPU_CAGRA.

Where it runs:

- **Tests and single machines**: ``uri="./milvus.db"`` (a local path ending in ``.db``) starts
  milvus-lite inside this process, listening on 127.0.0.1 only; nothing to install beyond
  ``pip install pymilvus milvus-lite``.
- **A Milvus cluster**: ``uri="http://milvus.internal:19530"`` and, with authentication,
  ``token="user:password"`` (or an API key / Zilliz Cloud token); never write the token into a
  snapshot, pass it again to :meth:`MilvusIndex.load`. For TLS use ``uri="https://...:19530"``
  and ``secure=True``, with ``server_pem_path=`` (one-way TLS) or ``ca_pem_path=``,
  ``client_pem_path=``, ``client_key_path=`` (mutual TLS) and ``server_name=`` when the
  certificate's name differs from the host; these keywords go straight to ``MilvusClient``.
  ``db_name=`` selects a database, ``timeout=`` bounds every call.

Consistency: the default ``consistency_level="Strong"`` makes every search see all acknowledged
writes, which the contract (removed ids never return) needs; ``"Bounded"`` is faster on a busy
cluster but a search may briefly return a just-removed id. Within one process, searches and
mutations of one :class:`MilvusIndex` exclude each other (a readers-writer lock), so a search sees
an ``add`` entirely or not at all; writers in other processes get no such guarantee.

Persistence is the server's: :meth:`MilvusIndex.save` flushes and writes a manifest (collection,
spec, count, ``last_seq``) through :mod:`index.snapshot`. Operations after ``last_seq`` may already
be applied on the server when the service replays its log, so replay must skip ids that
:meth:`MilvusIndex.contains` reports present (removals are idempotent anyway).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from index import snapshot
from index.backend_base import IndexBackend
from index.base import (
    PAD_SCORE,
    AttributesLike,
    Capabilities,
    IndexBackendError,
    IndexInputError,
    ReadWriteLock,
    SearchFilter,
    SearchResult,
    SnapshotError,
    as_ids,
    check_dim,
    check_last_seq,
    snapshot_loader,
)

logger = logging.getLogger(__name__)

#: Milvus's limit on topk (``limit``) of one search.
MAX_K = 16_384
SPEC_INDEX_TYPES = {
    "flat": "FLAT",
    "ivf-flat": "IVF_FLAT",
    "ivf-sq8": "IVF_SQ8",
    "ivf-pq": "IVF_PQ",
    "hnsw": "HNSW",
    "gpu-flat": "GPU_BRUTE_FORCE",
    "gpu-ivf-flat": "GPU_IVF_FLAT",
    "gpu-ivf-pq": "GPU_IVF_PQ",
    "gpu-cagra": "GPU_CAGRA",
}
_FIELDS = ("id", "vector", "camera", "captured_at", "identity")
#: Ids per `id in [...]` expression (keeps expressions and messages small).
_IDS_PER_EXPR = 4096
#: Bytes of vectors per insert call (gRPC messages are limited to 64 MiB by default).
_INSERT_BYTES = 16 << 20
#: Milvus's upper bounds on IVF ``nprobe`` (CPU and GPU indexes).
_MAX_NPROBE = 65_536
_MAX_NPROBE_GPU = 2_048
#: Milvus's upper bound on the HNSW search beam ``ef``.
_MAX_EF = 32_768
#: Queries per search call.
_QUERIES_PER_CALL = 1024


class MilvusIndex(IndexBackend):
    """Milvus-backed :class:`~index.base.VectorIndex` (see the module docstring).

    Args:
        dim: vector dimension.
        spec: index spec name (keys of :data:`SPEC_INDEX_TYPES`).
        uri: ``./file.db`` for milvus-lite, ``http(s)://host:19530`` for a server.
        token: ``user:password`` or API key for an authenticated server (never persisted).
        collection: collection name (one per gallery).
        consistency_level: ``Strong`` (default), ``Bounded``, ``Session`` or ``Eventually``.
        nlist, nprobe: IVF lists and lists probed per query.
        pq_m, pq_nbits: IVF-PQ code layout (``pq_m`` must divide ``dim``).
        hnsw_m, ef_construction, ef_search: HNSW graph parameters (``ef`` is raised to ``k``).
        drop_existing: drop a collection of that name first (tests, rebuilds).
        timeout: seconds per call, None for the client default.
        **client_options: passed to ``MilvusClient`` (``db_name``, ``secure``, ``server_pem_path``,
            ``ca_pem_path``, ``client_pem_path``, ``client_key_path``, ``server_name``, ...).
    """

    backend = "milvus"
    label = "Milvus"

    def __init__(
        self,
        dim: int,
        spec: str = "flat",
        *,
        uri: str = "./milvus.db",
        token: str | None = None,
        collection: str = "gallery_1",
        consistency_level: str = "Strong",
        nlist: int = 1024,
        nprobe: int = 32,
        pq_m: int | None = None,
        pq_nbits: int = 8,
        hnsw_m: int = 32,
        ef_construction: int = 100,
        ef_search: int = 128,
        drop_existing: bool = False,
        timeout: float | None = None,
        **client_options: Any,
    ) -> None:
        if spec not in SPEC_INDEX_TYPES:
            raise IndexInputError(f"unknown Milvus spec '{spec}'; choose one of {list(SPEC_INDEX_TYPES)}")
        dim = check_dim(dim)
        if consistency_level not in ("Strong", "Bounded", "Session", "Eventually"):
            raise IndexInputError(
                f"consistency_level must be Strong, Bounded, Session or Eventually, got {consistency_level!r}"
            )
        for name, value in (
            ("nlist", nlist),
            ("nprobe", nprobe),
            ("hnsw_m", hnsw_m),
            ("ef_construction", ef_construction),
            ("ef_search", ef_search),
        ):
            if int(value) < 1:
                raise IndexInputError(f"Milvus option {name} must be >= 1, got {value}")
        self.dim = dim
        self.spec = spec
        self.uri = str(uri)
        self.collection = collection
        self.consistency_level = consistency_level
        self.timeout = timeout
        self._params = {
            "nlist": int(nlist),
            "nprobe": int(nprobe),
            "pq_m": pq_m,
            "pq_nbits": int(pq_nbits),
            "hnsw_m": int(hnsw_m),
            "ef_construction": int(ef_construction),
            "ef_search": int(ef_search),
        }
        if spec in ("ivf-pq", "gpu-ivf-pq") and self.dim % (pq_m or _default_pq_m(self.dim)):
            raise IndexInputError(f"{spec}: pq_m={pq_m} must divide the dimension {self.dim}")
        self._client_options = {k: v for k, v in client_options.items() if k not in ("user", "password")}
        self.capabilities = Capabilities(
            exact=spec == "flat",
            gpu=spec.startswith("gpu-"),
            deletes=True,
            filter_pushdown=True,
            persistent=True,
            max_k=MAX_K,
        )
        self._lock = ReadWriteLock()
        self._client = _connect(self.uri, token, timeout, client_options)
        self._ensure_collection(drop_existing)

    # ------------------------------------------------------------------------------ collection

    def _ensure_collection(self, drop_existing: bool) -> None:
        client = self._client
        try:
            if drop_existing and client.has_collection(self.collection):
                client.drop_collection(self.collection)
            if client.has_collection(self.collection):
                self._check_schema()
                client.load_collection(self.collection)
                return
            from pymilvus import DataType, MilvusClient

            schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
            schema.add_field("camera", DataType.INT64)
            schema.add_field("captured_at", DataType.DOUBLE, nullable=True)
            schema.add_field("identity", DataType.INT64)
            index_params = client.prepare_index_params()
            index_params.add_index(
                field_name="vector",
                index_type=SPEC_INDEX_TYPES[self.spec],
                metric_type="IP",
                params=self._build_params(),
            )
            client.create_collection(
                self.collection,
                schema=schema,
                consistency_level=self.consistency_level,
                timeout=self.timeout,
            )
            # The collection is empty, so there is nothing to wait for: sync=False skips the
            # client's polling loop (it sleeps 0.5 s before its first check).
            client.create_index(self.collection, index_params, timeout=self.timeout, sync=False)
            client.load_collection(self.collection, timeout=self.timeout)
            logger.info("created Milvus collection %s (%s, dim %d)", self.collection, self.spec, self.dim)
        except (IndexInputError, IndexBackendError):
            raise
        except Exception as exc:  # pymilvus raises MilvusException and gRPC errors
            raise IndexBackendError(
                f"Milvus collection '{self.collection}' could not be prepared: {exc}"
            ) from exc

    def _check_schema(self) -> None:
        info = self._client.describe_collection(self.collection)
        fields = {f["name"]: f for f in info.get("fields", [])}
        missing = [name for name in _FIELDS if name not in fields]
        if missing:
            raise IndexInputError(
                f"Milvus collection '{self.collection}' exists without fields {missing}: it was not made by "
                "this index; choose another collection name or pass drop_existing=True"
            )
        existing_dim = int(fields["vector"].get("params", {}).get("dim", -1))
        if existing_dim != self.dim:
            raise IndexInputError(
                f"Milvus collection '{self.collection}' has dimension {existing_dim}, not {self.dim}: "
                "choose another collection name or pass drop_existing=True"
            )

    def _build_params(self) -> dict[str, Any]:
        p = self._params
        if self.spec in ("ivf-flat", "ivf-sq8", "gpu-ivf-flat"):
            return {"nlist": p["nlist"]}
        if self.spec in ("ivf-pq", "gpu-ivf-pq"):
            return {"nlist": p["nlist"], "m": p["pq_m"] or _default_pq_m(self.dim), "nbits": p["pq_nbits"]}
        if self.spec == "hnsw":
            return {"M": p["hnsw_m"], "efConstruction": p["ef_construction"]}
        return {}

    def _search_params(self, k: int, *, widen: bool = False) -> dict[str, Any]:
        """Search parameters; ``widen`` asks for the most thorough search the index type allows."""
        p = self._params
        params: dict[str, Any] = {}
        if self.spec.startswith(("ivf", "gpu-ivf")):
            # Widened: every list. Milvus accepts nprobe up to 65536 (2048 on GPU) and scans at
            # most nlist lists; the server's nlist may differ from ours (milvus-lite uses its own).
            params["nprobe"] = (
                (_MAX_NPROBE_GPU if self.spec.startswith("gpu") else _MAX_NPROBE) if widen else p["nprobe"]
            )
        elif self.spec == "hnsw":
            ef = max(p["ef_search"], k)
            params["ef"] = min(_MAX_EF, max(ef, 16 * ef if widen else ef))
        elif self.spec == "gpu-cagra":
            params["itopk_size"] = max(128, k) * (4 if widen else 1)
        return {"metric_type": "IP", "params": params}

    def tune(self, **search_options: Any) -> None:
        """Change search-time knobs: ``nprobe`` (IVF) and ``ef_search`` (HNSW)."""
        unknown = sorted(set(search_options) - {"nprobe", "ef_search"})
        if unknown:
            raise IndexInputError(f"tune() accepts ['ef_search', 'nprobe'], not {unknown}")
        for name, value in search_options.items():
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise IndexInputError(f"{name} must be a positive integer, got {value!r}")
        with self._lock.write():
            self._params.update({name: int(value) for name, value in search_options.items()})

    # --------------------------------------------------------------------------------- queries

    def __len__(self) -> int:
        with self._lock.read():
            return self._count()

    def _count(self) -> int:
        rows = self._call("count", self._client.query, self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean array: which of ``ids`` are in the collection."""
        ids = as_ids(ids)
        with self._lock.read():
            return np.isin(ids, self._present(ids))

    def _present(self, ids: np.ndarray) -> np.ndarray:
        found: list[int] = []
        unique = np.unique(ids)
        for start in range(0, len(unique), _IDS_PER_EXPR):
            chunk = unique[start : start + _IDS_PER_EXPR]
            rows = self._call(
                "query",
                self._client.query,
                self.collection,
                filter=_in_expr("id", chunk),
                output_fields=["id"],
            )
            found.extend(int(r["id"]) for r in rows)
        return np.array(sorted(found), dtype=np.int64)

    def search(self, queries: Any, k: int, *, filter: SearchFilter | None = None) -> SearchResult:
        """Top-k items by cosine similarity, the filter pushed down as a Milvus expression."""
        q, k = self._check_search(queries, k, filter)
        nq = len(q)
        base_expr = _filter_expr(filter) if filter is not None else ""
        allowed = filter.allowed_ids if filter is not None else None
        if nq == 0 or (allowed is not None and len(allowed) == 0):
            return SearchResult.empty(nq, k)
        # One expression per allow-list chunk; the top-k of the chunks are merged.
        if allowed is None:
            exprs = [base_expr]
        else:
            exprs = [
                " and ".join(e for e in (base_expr, _in_expr("id", allowed[s : s + _IDS_PER_EXPR])) if e)
                for s in range(0, len(allowed), _IDS_PER_EXPR)
            ]
        scores = np.full((nq, 0), PAD_SCORE, dtype=np.float32)
        ids = np.full((nq, 0), -1, dtype=np.int64)
        with self._lock.read():
            for expr in exprs:
                s, i = self._search_expr(q, k, expr)
                scores, ids = _merge_top_k(np.concatenate([scores, s], 1), np.concatenate([ids, i], 1), k)
            short = np.flatnonzero((ids >= 0).sum(axis=1) < k)
            if short.size and not self.capabilities.exact:
                # An approximate index can miss filtered items (probed lists, a graph walk): redo
                # the short queries as thoroughly as the index allows before calling them short.
                redo_s = np.full((len(short), 0), PAD_SCORE, dtype=np.float32)
                redo_i = np.full((len(short), 0), -1, dtype=np.int64)
                for expr in exprs:
                    s, i = self._search_expr(q[short], k, expr, widen=True)
                    redo_s, redo_i = _merge_top_k(
                        np.concatenate([redo_s, s], 1), np.concatenate([redo_i, i], 1), k
                    )
                better = (redo_i >= 0).sum(axis=1) > (ids[short] >= 0).sum(axis=1)
                scores[short[better]], ids[short[better]] = redo_s[better], redo_i[better]
        return SearchResult(scores=scores, ids=ids, short=(ids >= 0).sum(axis=1) < k)

    def _search_expr(
        self, q: np.ndarray, k: int, expr: str, *, widen: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = np.full((len(q), k), PAD_SCORE, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        for start in range(0, len(q), _QUERIES_PER_CALL):
            hits = self._call(
                "search",
                self._client.search,
                self.collection,
                data=[row for row in q[start : start + _QUERIES_PER_CALL]],
                limit=k,
                filter=expr,
                output_fields=["id"],
                search_params=self._search_params(k, widen=widen),
                anns_field="vector",
            )
            for row, row_hits in enumerate(hits, start=start):
                n = min(k, len(row_hits))
                if n:
                    ids[row, :n] = [int(h["id"]) for h in row_hits[:n]]
                    scores[row, :n] = [float(h["distance"]) for h in row_hits[:n]]
        return scores, ids

    # ------------------------------------------------------------------------------- mutations

    def add(self, ids: Any, vectors: Any, *, attributes: AttributesLike | None = None) -> None:
        """Insert new items (ids must be new and unique); vectors are renormalised to unit length."""
        ids, x, attrs = self._check_add(ids, vectors, attributes)
        if len(ids) == 0:
            return
        with self._lock.write():
            self._reject_present(self._present(ids))
            per_call = max(1, _INSERT_BYTES // (4 * self.dim + 64))
            for start in range(0, len(ids), per_call):
                sl = slice(start, start + per_call)
                rows = [
                    {
                        "id": int(i),
                        "vector": v,
                        "camera": int(c),
                        "captured_at": None if math.isnan(t) else float(t),
                        "identity": int(p),
                    }
                    for i, v, c, t, p in zip(
                        ids[sl],
                        x[sl],
                        attrs.camera[sl],
                        attrs.captured_at[sl],
                        attrs.identity[sl],
                        strict=True,
                    )
                ]
                self._call("insert", self._client.insert, self.collection, rows)

    def remove(self, ids: Any) -> int:
        """Delete items by id; returns how many were present (unknown ids are ignored)."""
        ids = as_ids(ids, what="ids to remove")
        if len(ids) == 0:
            return 0
        with self._lock.write():
            present = self._present(ids)
            for start in range(0, len(present), _IDS_PER_EXPR):
                chunk = present[start : start + _IDS_PER_EXPR]
                self._call("delete", self._client.delete, self.collection, ids=chunk.tolist())
            return len(present)

    def flush(self) -> None:
        """Seal the collection's growing segments so that they are indexed.

        Searches see unflushed data anyway; but milvus-lite scans growing segments in Python, so
        after a bulk load a flush makes its searches 10-50x faster. On a cluster, flush after bulk
        loads only (every flush makes a segment).
        """
        with self._lock.read():
            self._call("flush", self._client.flush, self.collection)

    def reset(self) -> None:
        """Drop and recreate the collection (everything removed, index parameters kept)."""
        with self._lock.write():
            self._ensure_collection(drop_existing=True)

    def drop(self) -> None:
        """Delete the collection from the server (the object is unusable afterwards)."""
        with self._lock.write():
            self._call("drop", self._client.drop_collection, self.collection)

    def close(self) -> None:
        """Close the client connection."""
        self._client.close()

    # ----------------------------------------------------------------------------- persistence

    def save(self, path: str | Path, *, last_seq: int = 0) -> snapshot.Manifest:
        """Flush the collection and write a manifest (the data stays on the server)."""
        last_seq = check_last_seq(last_seq)
        with self._lock.read():
            self._call("flush", self._client.flush, self.collection)
            count = self._count()
        options = {
            "uri": self.uri,
            "collection": self.collection,
            "consistency_level": self.consistency_level,
            **self._params,
            **{k: v for k, v in self._client_options.items() if isinstance(v, str | int | float | bool)},
        }
        return self._write_snapshot(path, {}, count=count, last_seq=last_seq, options=options)

    @snapshot_loader
    def load(cls, path: str | Path, *, token: str | None = None, **overrides: Any) -> MilvusIndex:
        """Reconnect to the collection a manifest describes.

        Args:
            path: snapshot folder written by :meth:`save`.
            token: credentials (not stored in the manifest).
            **overrides: options to change (e.g. ``uri`` when the server moved).

        Raises:
            SnapshotError: unreadable manifest, or the collection no longer exists on the server.
        """
        manifest = cls._verify_snapshot(path)
        options = {**manifest.options, **overrides}
        uri, collection = str(options.pop("uri")), str(options.pop("collection"))
        client = _connect(
            uri,
            token,
            options.get("timeout"),
            {k: v for k, v in options.items() if k not in _INDEX_OPTION_NAMES},
        )
        try:
            exists = client.has_collection(collection)
        finally:
            client.close()
        if not exists:
            raise SnapshotError(
                f"Milvus collection '{collection}' named by the snapshot at {path} does not exist on {uri}: "
                "rebuild the index from the database"
            )
        index = cls(manifest.dim, manifest.spec, uri=uri, token=token, collection=collection, **options)
        count = len(index)
        if count != manifest.count:
            logger.info(
                "Milvus collection %s holds %d items, the snapshot recorded %d at last_seq=%d "
                "(the server may be ahead of the snapshot)",
                collection,
                count,
                manifest.count,
                manifest.last_seq,
            )
        return index

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            if self.timeout is not None:
                kwargs.setdefault("timeout", self.timeout)
            return fn(*args, **kwargs)
        except Exception as exc:  # MilvusException, grpc.RpcError, connection errors
            raise IndexBackendError(f"Milvus {what} on collection '{self.collection}' failed: {exc}") from exc

    def __repr__(self) -> str:
        return (
            f"MilvusIndex(spec={self.spec!r}, dim={self.dim}, collection={self.collection!r}, "
            f"uri={self.uri!r})"
        )


_INDEX_OPTION_NAMES = frozenset(
    {
        "consistency_level",
        "nlist",
        "nprobe",
        "pq_m",
        "pq_nbits",
        "hnsw_m",
        "ef_construction",
        "ef_search",
        "drop_existing",
        "timeout",
    }
)


def _connect(uri: str, token: str | None, timeout: float | None, options: dict[str, Any]) -> Any:
    try:
        from pymilvus import MilvusClient
    except ImportError as exc:
        raise IndexBackendError(
            "the Milvus backend needs pymilvus (and milvus-lite for local files): "
            "pip install 'reid-denoiserep[milvus]'"
        ) from exc
    try:
        return MilvusClient(uri=uri, token=token or "", timeout=timeout, **options)
    except Exception as exc:
        # Never echo the token; the URI is safe to show.
        raise IndexBackendError(f"cannot connect to Milvus at {uri}: {exc}") from exc


def _default_pq_m(dim: int) -> int:
    target = max(1, dim // 8)
    return next(m for m in range(target, 0, -1) if dim % m == 0)


def _in_expr(field: str, values: np.ndarray) -> str:
    return f"{field} in [{', '.join(str(int(v)) for v in values)}]"


def _filter_expr(flt: SearchFilter) -> str:
    """The Milvus boolean expression for a filter's attribute conditions (allowed ids aside)."""
    parts: list[str] = []
    if flt.cameras is not None:
        parts.append(_in_expr("camera", np.array(sorted(flt.cameras))) if flt.cameras else "id < 0")
    if flt.exclude_cameras:
        parts.append(f"camera not in [{', '.join(str(c) for c in sorted(flt.exclude_cameras))}]")
    if flt.time_from is not None:
        parts.append(f"captured_at >= {flt.time_from!r}")
    if flt.time_to is not None:
        parts.append(f"captured_at <= {flt.time_to!r}")
    if flt.exclude_identity is not None:
        parts.append(f"identity != {flt.exclude_identity}")
    return " and ".join(parts)


def _merge_top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.concatenate([scores, np.full((len(scores), pad), PAD_SCORE, np.float32)], 1)
        ids = np.concatenate([ids, np.full((len(ids), pad), -1, np.int64)], 1)
    return scores.astype(np.float32), ids
