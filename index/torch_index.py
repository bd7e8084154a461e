"""Exact search on the GPU without FAISS: vectors in one device tensor, matrix product + top-k.

At a million items interactive search needs a GPU (FAISS on 16 CPU threads takes ~59 ms per query
for 1M x 768), and exact search there is bound by memory bandwidth: a 1M x 768 float16 gallery is
1.5 GB, which an H100 reads in ~0.6 ms. This backend gets there with plain torch, so it needs no
faiss-gpu wheel; on a CPU (float32) it is an exact flat index like FAISS's.

How the contract (:mod:`index.base`) is met:

- **Storage.** The unit vectors sit in one ``(capacity, dim)`` tensor on the device, in ascending
  id order, with no holes; the ids themselves are a sorted host array, so a result's row number
  maps to its id by indexing. New database ids are larger than all earlier ones, so adding is an
  append; an id smaller than the largest (an item re-added) merges into place, O(n).
- **Search.** Scores of a block of queries against a chunk of rows come from one matrix product
  (float16 on CUDA, float32 on a CPU); each chunk keeps its top candidates and the chunks' winners
  are merged. In half precision a few extra candidates are kept and re-scored in float32 from the
  stored vectors, so the returned scores are the stored vectors' true cosines. Chunks bound the
  score block to ``score_bytes``, so 1,024 queries against a million items never need 2 GB at once.
- **Ids, attributes, filters.** The FAISS backend's :class:`~index.faiss_attributes.AttributeTable`
  holds which ids exist and their camera / time / identity, and turns a :class:`SearchFilter` into
  the allowed ids. Up to ``exact_subset_limit`` allowed items are gathered and searched alone;
  more become a mask on the device that removes the others from every chunk before its top-k.
- **Removal** compacts the tensor (O(n), like FAISS's flat ``remove_ids``: remove in batches).
- **Concurrency.** Searches run concurrently; add/remove/reset exclude them (a writer-preferring
  readers-writer lock), so a search sees the index before or after a mutation, never half of one.
- **Persistence.** ``save`` writes the vectors (in their stored dtype, id order) as ``.npy`` and the
  attribute table as ``.npz`` through :func:`index.snapshot.write_snapshot` (atomic, checksummed).

Example::

    from index import create_index

    gallery = create_index("torch", spec="flat", dim=768, device="cuda")  # float16 on the GPU
    gallery.add(ids, vectors, attributes={"camera": cams})
    scores, ids = gallery.search(queries, k=10)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index import snapshot
from index.backend_base import TableBackedIndex, npz_writer, read_npz
from index.base import (
    PAD_SCORE,
    Attributes,
    AttributesLike,
    Capabilities,
    IndexBackendError,
    IndexInputError,
    ReadWriteLock,
    SearchFilter,
    SearchResult,
    SnapshotError,
    as_ids,
    as_unit_vectors,
    check_dim,
    check_last_seq,
    snapshot_loader,
)
from index.faiss_attributes import AttributeTable

logger = logging.getLogger(__name__)

SPECS = ("flat",)
#: Largest k (the FAISS backends' limit, so a service can switch backends without new errors).
MAX_K = 2048
#: Default budget of one (queries x rows) block of scores.
DEFAULT_SCORE_BYTES = 256 << 20
#: Filters passing at most this many items search those items alone (gathered), else a mask.
DEFAULT_EXACT_SUBSET_LIMIT = 65_536
#: Extra candidates per query kept from half-precision scores and re-scored in float32.
_HALF_EXTRA = 16
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MIN_CAPACITY = 1024


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise IndexInputError(f"device {device!r} is not a torch device (use 'cpu' or 'cuda')") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise IndexBackendError(
                f"device {str(device)!r} was asked for but torch sees no CUDA GPU; use device='cpu' "
                "(or leave device unset to use a GPU only where there is one)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise IndexInputError(f"device {dev} but torch sees {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise IndexInputError(f"device {dev} is not supported: use 'cpu' or 'cuda'")
    return dev


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        # Half precision halves the bytes a search reads; CPUs have no fast float16 matmul.
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise IndexInputError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise IndexInputError(f"dtype {dtype} is not one of {sorted(_DTYPES)}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TorchIndex(TableBackedIndex):
    """Exact (flat) :class:`~index.base.VectorIndex` on a torch device (see the module docstring).

    Args:
        dim: vector dimension.
        spec: ``flat`` (the only spec: exact search).
        device: ``cpu``, ``cuda`` or ``cuda:N``; None uses a GPU when torch sees one.
        dtype: storage and matmul dtype (``float16``, ``bfloat16``, ``float32``); None: float16 on
            CUDA, float32 on a CPU. Only float32 is exact to float rounding; half precision scores
            differ from float32 ones by ~1e-3, so neighbours tied that closely may swap.
        score_bytes: budget of one block of scores (queries x rows) during a search.
        exact_subset_limit: filters passing at most this many items search only those items.
    """

    backend = "torch"
    label = "torch"

    def __init__(
        self,
        dim: int,
        spec: str = "flat",
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        score_bytes: int = DEFAULT_SCORE_BYTES,
        exact_subset_limit: int = DEFAULT_EXACT_SUBSET_LIMIT,
    ) -> None:
        if spec not in SPECS:
            raise IndexInputError(
                f"the torch backend has only spec 'flat' (exact search), not {spec!r}; use the faiss "
                "backend for approximate specs"
            )
        dim = check_dim(dim)
        if int(score_bytes) < 1 << 16:
            raise IndexInputError(f"score_bytes must be at least 65536, got {score_bytes}")
        if int(exact_subset_limit) < 0:
            raise IndexInputError(f"exact_subset_limit must be >= 0, got {exact_subset_limit}")
        self.dim = dim
        self.spec = spec
        self._requested_device = None if device is None else str(device)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self._requested_dtype = None if dtype is None else _dtype_name(self.dtype)
        self.score_bytes = int(score_bytes)
        self.exact_subset_limit = int(exact_subset_limit)
        self.capabilities = Capabilities(
            exact=self.dtype == torch.float32,
            gpu=self.device.type == "cuda",
            deletes=True,
            filter_pushdown=True,
            persistent=False,
            max_k=MAX_K,
        )
        self._lock = ReadWriteLock()
        self._clear_state()

    def _clear_state(self) -> None:
        """Empty the index and release the device memory of its vectors."""
        self._table = AttributeTable(self.dim)
        self._ids = np.zeros(0, dtype=np.int64)  # ascending; row i of _vectors holds id _ids[i]
        self._vectors = torch.empty((_MIN_CAPACITY, self.dim), dtype=self.dtype, device=self.device)

    # ---------------------------------------------------------------------------------- queries

    def ids(self) -> np.ndarray:
        """All item ids, ascending."""
        with self._lock.read():
            return self._ids.copy()

    def vectors_of(self, ids: Any) -> np.ndarray:
        """Stored unit vectors of present ids, as float32 (KeyError for absent ones)."""
        ids = as_ids(ids)
        with self._lock.read():
            rows = self._rows_of(ids)
            if (rows < 0).any():
                raise KeyError(f"ids not in the index: {ids[rows < 0][:5].tolist()}")
            index = torch.from_numpy(rows).to(self.device)
            return self._vectors[index].float().cpu().numpy()

    @property
    def stored_vectors(self) -> torch.Tensor:
        """The ``(n, dim)`` device tensor that searches read, rows in ascending id order.

        For benchmarks and diagnostics: treat it as read-only, and as stale after any mutation
        (adds write into it or replace it, removals compact it).
        """
        with self._lock.read():
            return self._vectors[: len(self._ids)]

    @property
    def capacity(self) -> int:
        """Rows allocated on the device (grows by doubling, shrinks after large removals)."""
        return int(self._vectors.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory of the stored vectors (device), the id array and the attribute table (host)."""
        with self._lock.read():
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            return len(self._ids) * (self.dim * itemsize + 8) + self._table.nbytes

    def _rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id in the vector tensor, ``-1`` where absent."""
        if len(self._ids) == 0 or ids.size == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._ids, ids), len(self._ids) - 1)
        return np.where(self._ids[pos] == ids, pos, -1)

    def search(self, queries: Any, k: int, *, filter: SearchFilter | None = None) -> SearchResult:
        """Top-k items by cosine similarity for each query row (see the module docstring).

        ``queries`` may be a float array-like or a torch tensor (on any device).
        """
        q, k = self._check_search(queries, k, filter)
        nq = q.shape[0]
        with self._lock.read():
            n = len(self._ids)
            if nq == 0 or n == 0:
                return SearchResult.empty(nq, k)
            if filter is None or filter.is_empty:
                scores, rows = self._search_rows(q, k, None)
            else:
                allowed = self._table.allowed_ids(filter)
                if len(allowed) == 0:
                    return SearchResult.empty(nq, k)
                allowed_rows = self._rows_of(allowed)  # every allowed id is present (the table says so)
                if len(allowed_rows) <= self.exact_subset_limit:
                    scores, rows = self._search_subset(q, k, allowed_rows)
                else:
                    mask = torch.zeros(n, dtype=torch.bool, device=self.device)
                    mask[torch.from_numpy(allowed_rows).to(self.device)] = True
                    scores, rows = self._search_rows(q, k, mask)
            ids = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
        return _finish(scores, ids, k)

    def _search_rows(
        self, q: torch.Tensor, k: int, mask: torch.Tensor | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (float32 scores, rows) over all rows (those where ``mask`` holds), in chunks."""
        n = len(self._ids)
        half = self.dtype != torch.float32
        fetch = min(n, k + _HALF_EXTRA if half else k)
        itemsize = max(2, torch.empty((), dtype=self.dtype).element_size())
        chunk_rows = max(fetch, self.score_bytes // (itemsize * q.shape[0]))
        qd = q.to(self.dtype)
        best_s: torch.Tensor | None = None
        best_r: torch.Tensor | None = None
        with torch.inference_mode():
            for start in range(0, n, chunk_rows):
                stop = min(n, start + chunk_rows)
                scores = qd @ self._vectors[start:stop].T
                if mask is not None:
                    scores.masked_fill_(~mask[start:stop], float("-inf"))
                top_s, top_r = torch.topk(scores, min(fetch, stop - start), dim=1)
                top_r += start
                if best_s is None:
                    best_s, best_r = top_s, top_r
                else:
                    assert best_r is not None
                    cand_s = torch.cat([best_s, top_s], dim=1)
                    cand_r = torch.cat([best_r, top_r], dim=1)
                    sel_s, sel = torch.topk(cand_s, min(fetch, cand_s.shape[1]), dim=1)
                    best_s, best_r = sel_s, torch.gather(cand_r, 1, sel)
            assert best_s is not None and best_r is not None
            valid = torch.isfinite(best_s)  # -inf: masked out by the filter
            if half:
                # Re-score the candidates in float32 from the stored vectors: exact cosines of what
                # is stored, and the order among near-ties decided at full precision.
                cand = self._vectors[best_r.clamp_min(0)].float()  # (nq, fetch, dim)
                exact = torch.bmm(cand, q.float().unsqueeze(2)).squeeze(2)
                best_s = exact.masked_fill(~valid, float("-inf"))
            else:
                best_s = best_s.float()
            best_r = best_r.masked_fill(~valid, -1)
            return best_s.cpu().numpy(), best_r.cpu().numpy()

    def _search_subset(self, q: torch.Tensor, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the given rows only (a selective filter): gathered, scored in float32."""
        with torch.inference_mode():
            index = torch.from_numpy(rows).to(self.device)
            scores = q.float() @ self._vectors[index].float().T
            top_s, top_i = torch.topk(scores, min(k, len(rows)), dim=1)
            top_r = index[top_i]
            return top_s.cpu().numpy(), top_r.cpu().numpy()

    # -------------------------------------------------------------------------------- mutations

    def _unit_vectors(self, vectors: Any, *, what: str = "vectors") -> torch.Tensor:
        """Validated, L2-normalised float32 ``(n, dim)`` tensor on the index's device."""
        if isinstance(vectors, torch.Tensor):
            x = vectors.detach()
            if x.ndim == 1 and x.shape[0] == self.dim:
                x = x.reshape(1, self.dim)
            if x.ndim != 2 or x.shape[1] != self.dim:
                raise IndexInputError(
                    f"{what} must have shape (n, {self.dim}) for this index, got {tuple(x.shape)}"
                )
            if x.is_complex() or x.dtype == torch.bool:
                raise IndexInputError(f"{what} must be real numbers, got dtype {x.dtype}")
            x = x.to(self.device, dtype=torch.float32)
            if x.shape[0] == 0:
                return x
            finite = torch.isfinite(x).all(dim=1)
            if not bool(finite.all()):
                rows = torch.nonzero(~finite).flatten()[:5].tolist()
                raise IndexInputError(
                    f"{what} contain NaN or infinite values (rows {rows}); fix the embeddings"
                )
            norms = torch.linalg.vector_norm(x, dim=1)
            if bool((norms == 0).any()):
                rows = torch.nonzero(norms == 0).flatten()[:5].tolist()
                raise IndexInputError(f"{what} contain all-zero rows {rows}: a zero vector has no direction")
            return x / norms[:, None]
        arr = as_unit_vectors(vectors, self.dim, what=what)
        return torch.from_numpy(arr).to(self.device)

    def add(self, ids: Any, vectors: Any, *, attributes: AttributesLike | None = None) -> None:
        """Add new items (ids must be new and unique); vectors are renormalised to unit length.

        ``vectors`` may be a float array-like or a torch tensor (on any device).
        """
        ids, x, attrs = self._check_add(ids, vectors, attributes)
        if len(ids) == 0:
            return
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        x = x[torch.from_numpy(order).to(self.device)].to(self.dtype)
        with self._lock.write():
            self._reject_present_in_table(ids)
            n, m = len(self._ids), len(ids)
            self._reserve(n + m)
            if n == 0 or ids[0] > self._ids[-1]:
                self._vectors[n : n + m] = x  # the usual case: database keys only grow
                self._ids = np.concatenate([self._ids, ids])
            else:
                merged = np.concatenate([self._ids, ids])
                perm = np.argsort(merged, kind="stable")
                stacked = torch.cat([self._vectors[:n], x])
                self._vectors[: n + m] = stacked[torch.from_numpy(perm).to(self.device)]
                self._ids = merged[perm]
            self._table.append(ids, _reorder(attrs, order))

    def _reserve(self, needed: int) -> None:
        capacity = self._vectors.shape[0]
        if needed <= capacity:
            return
        grown = torch.empty((max(needed, 2 * capacity), self.dim), dtype=self.dtype, device=self.device)
        n = len(self._ids)
        grown[:n] = self._vectors[:n]
        self._vectors = grown

    def _remove_vectors(self, removed: np.ndarray) -> None:
        keep = np.ones(len(self._ids), dtype=bool)
        keep[self._rows_of(removed)] = False
        rows = torch.from_numpy(np.flatnonzero(keep)).to(self.device)
        m = int(keep.sum())
        if m < self._vectors.shape[0] // 4 and self._vectors.shape[0] > _MIN_CAPACITY:
            # Give memory back after large removals (a 1M x 768 gallery holds 1.5 GB).
            shrunk = torch.empty((max(_MIN_CAPACITY, 2 * m), self.dim), dtype=self.dtype, device=self.device)
            shrunk[:m] = self._vectors[rows]
            self._vectors = shrunk
        else:
            self._vectors[:m] = self._vectors[rows]  # the gather copies before the write
        self._ids = self._ids[keep]

    # ------------------------------------------------------------------------------ persistence

    def _options(self) -> dict[str, Any]:
        return {
            "device": self._requested_device,
            "dtype": self._requested_dtype,
            "score_bytes": self.score_bytes,
            "exact_subset_limit": self.exact_subset_limit,
        }

    def save(self, path: str | Path, *, last_seq: int = 0) -> snapshot.Manifest:
        """Write an atomic snapshot to the folder ``path`` (see :mod:`index.snapshot`).

        Args:
            path: snapshot folder.
            last_seq: sequence number of the last operation applied to this index, so that a
                loader replays only what came after it.
        """
        last_seq = check_last_seq(last_seq)
        with self._lock.read():
            n = len(self._ids)
            vectors = self._vectors[:n].cpu()
            if self.dtype == torch.bfloat16:  # numpy has no bfloat16: store its exact float32 widening
                vectors = vectors.float()
            array = vectors.numpy()
            arrays = self._table.to_arrays()

            def write_vectors(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    np.save(fh, array, allow_pickle=False)

            return self._write_snapshot(
                path,
                {"index": (".npy", write_vectors), "attributes": (".npz", npz_writer(arrays))},
                count=n,
                last_seq=last_seq,
                options=self._options(),
            )

    @snapshot_loader
    def load(cls, path: str | Path, **overrides: Any) -> TorchIndex:
        """Open a snapshot written by :meth:`save`, verifying its checksums.

        Args:
            path: snapshot folder.
            **overrides: options to change on load (``device="cpu"``, ``dtype="float32"``...).

        Raises:
            SnapshotError: missing, corrupt or inconsistent snapshot (rebuild from the database).
        """
        manifest = cls._verify_snapshot(path)
        options = {**manifest.options, **overrides}
        index = cls(manifest.dim, manifest.spec, **options)
        try:
            vectors = np.load(snapshot.file_path(path, manifest, "index"), allow_pickle=False)
            arrays = read_npz(snapshot.file_path(path, manifest, "attributes"))
            table = AttributeTable.from_arrays(manifest.dim, arrays, store_vectors=False)
        except (OSError, ValueError, KeyError) as exc:
            raise SnapshotError(f"snapshot at {path} could not be read ({exc}): rebuild the index") from exc
        ids = np.asarray(arrays["ids"], dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape != (manifest.count, manifest.dim) or len(ids) != manifest.count:
            raise SnapshotError(
                f"snapshot at {path} is inconsistent: manifest says {manifest.count} x {manifest.dim}, "
                f"vectors are {vectors.shape}, {len(ids)} ids: rebuild the index"
            )
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise SnapshotError(f"snapshot ids at {path} are not strictly ascending: rebuild the index")
        with index._lock.write():
            index._table = table
            index._ids = ids
            index._vectors = torch.empty(
                (max(_MIN_CAPACITY, len(ids)), index.dim), dtype=index.dtype, device=index.device
            )
            index._vectors[: len(ids)] = torch.from_numpy(vectors).to(index.device, dtype=index.dtype)
        logger.info(
            "loaded torch snapshot from %s: %d items on %s (%s), last_seq=%d",
            path,
            len(ids),
            index.device,
            _dtype_name(index.dtype),
            manifest.last_seq,
        )
        return index

    def __repr__(self) -> str:
        return (
            f"TorchIndex(spec={self.spec!r}, dim={self.dim}, n={len(self)}, device={self.device}, "
            f"dtype={_dtype_name(self.dtype)})"
        )


# ------------------------------------------------------------------------------------- helpers


def _reorder(attributes: Attributes, order: np.ndarray) -> Attributes:
    """Attribute columns permuted like the ids were (they arrive in the caller's order)."""
    return Attributes(**{name: getattr(attributes, name)[order] for name in Attributes.FIELDS})


def _finish(scores: np.ndarray, ids: np.ndarray, k: int) -> SearchResult:
    """Pad to k, order by score then id (deterministic among ties), padding last."""
    nq = scores.shape[0]
    if scores.shape[1] < k:
        extra = k - scores.shape[1]
        scores = np.concatenate([scores, np.full((nq, extra), PAD_SCORE, np.float32)], axis=1)
        ids = np.concatenate([ids, np.full((nq, extra), -1, np.int64)], axis=1)
    scores = np.where(ids >= 0, scores, PAD_SCORE).astype(np.float32)
    # Padding sorts last: its score is -inf; among equal scores the smaller id first.
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
    scores = np.take_along_axis(scores, order, axis=1)
    ids = np.ascontiguousarray(np.take_along_axis(ids, order, axis=1), dtype=np.int64)
    return SearchResult(scores=scores, ids=ids, short=(ids >= 0).sum(axis=1) < k)
