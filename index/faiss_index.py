"""The in-process FAISS backend: one :class:`FaissIndex` for every spec, on CPU or GPU.

How the contract is met:

- **Ids and attributes.** FAISS keeps vectors and int64 ids; an :class:`AttributeTable` beside it
  keeps which ids are alive and their camera / time / identity, so duplicate checks, ``contains``
  and filters are vectorised lookups.
- **Filters.** The table turns a :class:`SearchFilter` into the sorted array of allowed ids. If at
  most ``exact_subset_limit`` items pass, those items are searched exhaustively (exact, and cheaper
  than searching the index). Otherwise a FAISS id selector (``IDSelectorBatch``, or a bitmap for
  large allow lists) goes into ``SearchParameters`` on the CPU; on the GPU, where FAISS ignores
  selectors, results are over-fetched and post-filtered, growing the fetch until ``k`` pass or the
  device limit is reached. A filter passing a fraction s of the items widens IVF ``nprobe`` and
  HNSW ``efSearch`` by 1/s (HNSW at most 16x), so filtered recall stays near unfiltered recall.
  Whenever an approximate search returns fewer than ``min(k, allowed)`` items, the missing
  queries are re-run exhaustively (every IVF list, or exact search for HNSW), so ``short`` means
  that the items really are not there, never that the index missed them.
- **Removal.** ``flat`` and IVF remove vectors for real (``remove_ids``; for flat this moves the
  vectors after the removed ones, O(n) per call, so remove in batches). HNSW cannot remove: removed
  ids become tombstones excluded by a selector, and the graph is rebuilt from its own stored
  vectors once tombstones exceed ``rebuild_fraction``.
- **Training.** IVF specs behave as ``flat`` (exact) until ``train_min`` vectors exist, then train
  on a seeded sample and move everything into the IVF index (see :mod:`index.faiss_specs`).
- **Concurrency.** Searches run concurrently (FAISS releases the GIL); add/remove/reset/training
  are serialised and exclude searches (a writer-preferring readers-writer lock), so a search sees
  the index before or after a mutation, never half of one. On the GPU every device call also
  holds the replica's lock (see :mod:`index.faiss_gpu`).
- **Persistence.** ``save`` writes the CPU index with ``faiss.write_index`` and the attribute
  table as ``.npz`` through :func:`index.snapshot.write_snapshot` (atomic, checksummed).

Example::

    from index import SearchFilter, create_index

    gallery = create_index("faiss", spec="flat", dim=384)
    gallery.add(ids, vectors, attributes={"camera": cams, "captured_at": times})
    scores, ids = gallery.search(queries, k=10, filter=SearchFilter(exclude_cameras={3}))
    gallery.save("snapshots/gallery-1", last_seq=op_seq)
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from index import faiss_gpu, snapshot
from index.backend_base import TableBackedIndex, npz_writer, read_npz
from index.base import (
    PAD_SCORE,
    AttributesLike,
    Capabilities,
    IndexBackendError,
    IndexInputError,
    IndexNotTrainedError,
    ReadWriteLock,
    SearchFilter,
    SearchResult,
    SnapshotError,
    check_dim,
    check_last_seq,
    snapshot_loader,
)
from index.faiss_attributes import AttributeTable
from index.faiss_specs import (
    MAX_K,
    SPECS,
    TRAINED_SPECS,
    FaissOptions,
    build_flat,
    build_hnsw,
    build_ivf,
    nlist_for,
    pq_nbits_for,
)

logger = logging.getLogger(__name__)

#: Vectors per chunk when moving many vectors at once (training, rebuilds, exact subset search).
_CHUNK = 65_536
#: Allow lists longer than this use a bitmap selector (O(1) lookups) when ids are small enough.
_BITMAP_MIN_IDS = 65_536
_BITMAP_MAX_BYTES = 128 << 20
#: Fewest vectors an IVF spec can be trained on (one list, FAISS's 39 points per centroid).
_MIN_TRAIN_VECTORS = 39
#: Most a filter may widen an HNSW beam (efSearch); beyond that the exhaustive fallback answers.
_MAX_EF_WIDENING = 16
#: Past this growth over the training size, the IVF quantizer is too coarse: warn once.
_RETRAIN_GROWTH = 8


class FaissIndex(TableBackedIndex):
    """FAISS-backed :class:`~index.base.VectorIndex` (see the module docstring for how it works).

    Args:
        dim: vector dimension.
        spec: one of ``flat``, ``ivf-flat``, ``ivf-sq8``, ``ivf-pq``, ``hnsw``.
        **options: fields of :class:`~index.faiss_specs.FaissOptions`.
    """

    backend = "faiss"
    label = "FAISS"

    def __init__(self, dim: int, spec: str = "flat", **options: Any) -> None:
        if spec not in SPECS:
            raise IndexInputError(f"unknown FAISS spec '{spec}'; choose one of {list(SPECS)}")
        self.dim = check_dim(dim)
        self.spec = spec
        self.options = FaissOptions.from_kwargs(spec, self.dim, options)
        self._lock = ReadWriteLock()
        self._use_gpu = self._resolve_gpu()
        self.capabilities = Capabilities(
            exact=spec == "flat" and not (self._use_gpu and self.options.gpu_fp16),
            gpu=self._use_gpu,
            deletes=True,
            filter_pushdown=not self._use_gpu,
            persistent=False,
            max_k=MAX_K,
        )
        self._clear_state()

    def _resolve_gpu(self) -> bool:
        wanted = self.options.gpu
        if wanted is False or self.spec == "hnsw":
            if wanted and self.spec == "hnsw":
                raise IndexInputError("spec 'hnsw' runs on the CPU only; use gpu=None or False")
            return False
        available = faiss_gpu.gpu_count()
        if wanted and available == 0:
            raise IndexBackendError(
                "gpu=True but FAISS sees no GPU: install the faiss-gpu wheel on a CUDA machine, "
                "or pass gpu=None to use the CPU"
            )
        if available and self.options.gpu_device >= available:
            raise IndexInputError(f"gpu_device={self.options.gpu_device} but FAISS sees {available} GPU(s)")
        return available > 0

    def _clear_state(self) -> None:
        """Empty the index; a trained spec goes back to untrained (it retrains on new data)."""
        store = self.spec == "ivf-pq" and self.options.rerank
        self._table = AttributeTable(self.dim, store_vectors=store)
        self._cpu: faiss.Index = (
            build_hnsw(self.dim, self.options) if self.spec == "hnsw" else build_flat(self.dim)
        )
        self._trained = self.spec not in TRAINED_SPECS
        self._nlist: int | None = None
        self._trained_size = 0
        self._growth_warned = False
        self._tombstones = np.zeros(0, dtype=np.int64)  # HNSW only: removed ids still in the graph
        self._replica: faiss_gpu.GpuReplica | None = None
        if self._use_gpu:
            self._replica = faiss_gpu.GpuReplica(
                self._cpu,
                self.options.gpu_device,
                fp16=self.options.gpu_fp16,
                resync_fraction=self.options.gpu_resync_fraction,
            )

    # ----------------------------------------------------------------------------------- queries

    @property
    def is_trained(self) -> bool:
        """False while a trained spec still holds too few vectors and answers like ``flat``."""
        return self._trained

    @property
    def nlist(self) -> int | None:
        """IVF lists once trained, else None."""
        return self._nlist

    @property
    def nbytes(self) -> int:
        """Approximate host memory of the index, its attribute table and stored vectors."""
        with self._lock.read():
            return _index_nbytes(self._cpu) + self._table.nbytes

    def ids(self) -> np.ndarray:
        """All item ids, ascending."""
        with self._lock.read():
            return self._table.ids()

    def tune(self, **search_options: Any) -> None:
        """Change search-time knobs on a live index: ``nprobe``, ``ef_search``, ``rerank_factor``,
        ``exact_subset_limit`` (recall against speed; nothing is rebuilt)."""
        allowed = {"nprobe", "ef_search", "rerank_factor", "exact_subset_limit"}
        unknown = sorted(set(search_options) - allowed)
        if unknown:
            raise IndexInputError(f"tune() accepts {sorted(allowed)}, not {unknown}")
        merged = {**self.options.to_json(), **search_options}
        options = FaissOptions.from_kwargs(self.spec, self.dim, merged)
        with self._lock.write():
            self.options = options
            if isinstance(self._cpu, faiss.IndexIVF):
                self._cpu.nprobe = min(options.nprobe, self._cpu.nlist)

    def search(self, queries: Any, k: int, *, filter: SearchFilter | None = None) -> SearchResult:
        """Top-k items by cosine similarity for each query row (see the module docstring)."""
        q, k = self._check_search(queries, k, filter)
        nq = len(q)
        with self._lock.read():
            if nq == 0 or len(self._table) == 0:
                return SearchResult.empty(nq, k)
            allowed: np.ndarray | None = None
            if filter is not None and not filter.is_empty:
                allowed = self._table.allowed_ids(filter)
                if len(allowed) == 0:
                    return SearchResult.empty(nq, k)
                if len(allowed) <= self.options.exact_subset_limit:
                    scores, ids = self._search_subset(q, k, allowed)
                    return _finish(scores, ids, k)
            scores, ids = self._search_index(q, k, allowed)
            return _finish(scores, ids, k)

    def _search_index(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        rerank = self._table.store_vectors and self._trained
        fetch = min(k * self.options.rerank_factor, MAX_K * self.options.rerank_factor) if rerank else k
        if self._replica is not None:
            scores, ids = self._search_replica(q, fetch, allowed)
        else:
            scores, ids = self._search_cpu(q, fetch, allowed)
        if rerank:
            scores, ids = self._rerank(q, ids, k)
        else:
            scores, ids = scores[:, :k], ids[:, :k]
        # An approximate search can miss items that exist (filtered-out IVF lists, a graph walk
        # that found too few allowed nodes, dead GPU entries): redo those queries exhaustively.
        available = len(allowed) if allowed is not None else len(self._table)
        missing = np.flatnonzero((ids >= 0).sum(axis=1) < min(k, available))
        if missing.size:
            redo_scores, redo_ids = self._search_exhaustive(q[missing], k, allowed)
            scores, ids = scores.copy(), ids.copy()
            scores[missing], ids[missing] = redo_scores, redo_ids
        return scores, ids

    def _search_cpu(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None, *, exhaustive: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        keep_alive: list[Any] = []  # SWIG selectors do not own what they point to
        selector = None
        if allowed is not None:
            selector = _selector_for(allowed, keep_alive)
        elif len(self._tombstones):
            inner = faiss.IDSelectorBatch(self._tombstones)
            keep_alive.append(inner)
            selector = faiss.IDSelectorNot(inner)
        # A filter passing a fraction s of the items leaves ~s of what a search visits: widen the
        # search by 1/s so it still meets as many allowed items as an unfiltered one would.
        widen = len(self._table) / len(allowed) if allowed is not None else 1.0
        if self.spec == "hnsw":
            ef = max(self.options.ef_search, k)
            params = faiss.SearchParametersHNSW(efSearch=int(min(ef * widen, ef * _MAX_EF_WIDENING)))
        elif self._trained and self._nlist is not None:
            nprobe = self._nlist if exhaustive else min(math.ceil(self.options.nprobe * widen), self._nlist)
            params = faiss.SearchParametersIVF(nprobe=nprobe)
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        scores, ids = self._cpu.search(q, k, params=params)
        del keep_alive
        return scores, ids

    def _search_replica(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        # GPU FAISS ignores id selectors: over-fetch, drop dead/filtered ids, fetch more if short.
        assert self._replica is not None
        limit = min(faiss_gpu.GPU_MAX_K, self._replica.ntotal)
        fetch = min(limit, k + self._replica.dead) if allowed is None else min(limit, 4 * k)
        fetch = max(fetch, min(k, limit))
        want = min(k, len(allowed) if allowed is not None else len(self._table))
        nprobe = min(self.options.nprobe, self._nlist) if self._nlist else None
        while True:
            raw_scores, raw_ids = self._replica.search(q, fetch, nprobe=nprobe)
            if allowed is None:
                keep = (raw_ids >= 0) & self._table.contains(raw_ids)
            else:
                keep = (raw_ids >= 0) & _isin_sorted(raw_ids, allowed)
            if keep.sum(axis=1).min() >= want or fetch >= limit:
                break
            fetch = min(limit, fetch * 4)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept entries first, in rank order
        scores = np.take_along_axis(raw_scores, order, axis=1)
        ids = np.take_along_axis(np.where(keep, raw_ids, -1), order, axis=1)
        scores = np.where(ids >= 0, scores, PAD_SCORE).astype(np.float32)
        return _pad(scores, ids, k)

    def _search_exhaustive(
        self, q: np.ndarray, k: int, allowed: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if self._trained and self._nlist is not None:
            # Every IVF list scanned: complete (and exact for ivf-flat).
            fetch = k * self.options.rerank_factor if self._table.store_vectors else k
            scores, ids = self._search_cpu(q, fetch, allowed, exhaustive=True)
            return self._rerank(q, ids, k) if self._table.store_vectors else (scores[:, :k], ids[:, :k])
        return self._search_subset(q, k, allowed if allowed is not None else self._table.ids())

    def _search_subset(self, q: np.ndarray, k: int, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the given items, in chunks so memory stays bounded."""
        best_scores = np.full((len(q), 0), PAD_SCORE, dtype=np.float32)
        best_ids = np.full((len(q), 0), -1, dtype=np.int64)
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            scores = q @ self._vectors_of(chunk).T
            best_scores = np.concatenate([best_scores, scores.astype(np.float32)], axis=1)
            best_ids = np.concatenate([best_ids, np.broadcast_to(chunk, scores.shape)], axis=1)
            best_scores, best_ids = _top_k(best_scores, best_ids, k)
        return _pad(best_scores, best_ids, k)

    def _rerank(self, q: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores for candidate ids from the stored vectors, best k kept."""
        rows = self._table.rows_of(candidates)
        valid = rows >= 0
        safe_rows = np.where(valid, rows, 0)  # any real row; invalid entries are masked below
        out_scores = np.empty(candidates.shape, dtype=np.float32)
        step = max(1, _CHUNK // max(1, candidates.shape[1]))  # bound the (queries, candidates, d) block
        for start in range(0, len(q), step):
            sl = slice(start, start + step)
            out_scores[sl] = np.einsum("qd,qcd->qc", q[sl], self._table.vectors_at(safe_rows[sl]))
        out_scores[~valid] = PAD_SCORE
        return _top_k(out_scores, np.where(valid, candidates, -1), k)

    def _vectors_of(self, ids: np.ndarray) -> np.ndarray:
        if self._table.store_vectors:
            return self._table.vectors_of(ids)
        # IDMap2 (flat, hnsw) and IVF with a hashtable direct map can reconstruct by id; for
        # ivf-sq8 this is the 8-bit decoded vector (scores within ~1e-2 of the true ones).
        return self._cpu.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    # --------------------------------------------------------------------------------- mutations

    def add(self, ids: Any, vectors: Any, *, attributes: AttributesLike | None = None) -> None:
        """Add new items (ids must be new and unique); vectors are renormalised to unit length."""
        ids, x, attrs = self._check_add(ids, vectors, attributes)
        if len(ids) == 0:
            return
        with self._lock.write():
            self._reject_present_in_table(ids)
            if len(self._tombstones) and np.isin(ids, self._tombstones).any():
                # The graph still holds the old vectors of these ids: purge before re-adding.
                self._rebuild_hnsw()
            self._cpu.add_with_ids(x, ids)
            if self._replica is not None:
                self._replica.add(ids, x)
            self._table.append(ids, attrs, x if self._table.store_vectors else None)
            if not self._trained and len(self._table) >= self.options.effective_train_min(self.spec):
                self._train()
            elif self._trained_size and not self._growth_warned:
                self._warn_if_outgrown()

    def _warn_if_outgrown(self) -> None:
        if len(self._table) > _RETRAIN_GROWTH * self._trained_size:
            self._growth_warned = True
            logger.warning(
                "%s index trained on %d vectors now holds %d: its %d lists are too coarse; "
                "rebuild it from the database (reset + add) to retrain",
                self.spec,
                self._trained_size,
                len(self._table),
                self._nlist,
            )

    def _remove_vectors(self, removed: np.ndarray) -> None:
        if self.spec == "hnsw":
            self._tombstones = np.union1d(self._tombstones, removed)
            if len(self._tombstones) > self.options.rebuild_fraction * self._cpu.ntotal:
                self._rebuild_hnsw()
        else:
            # FAISS's wrapper picks the selector the index needs (an array for IVF hashtables).
            self._cpu.remove_ids(removed)
        if self._replica is not None and self._replica.remove(removed):
            self._replica.resync(self._cpu)

    def train(self) -> None:
        """Train a trained spec now, on the vectors it holds, instead of waiting for ``train_min``.

        Useful after a bulk load that is smaller than ``train_min``. A no-op for specs that need
        no training and for an index that is already trained.

        Raises:
            IndexNotTrainedError: fewer vectors than one IVF list needs (39).
        """
        with self._lock.write():
            if self._trained:
                return
            if len(self._table) < _MIN_TRAIN_VECTORS:
                raise IndexNotTrainedError(
                    f"{self.spec} needs at least {_MIN_TRAIN_VECTORS} vectors to train, it holds "
                    f"{len(self._table)}; it answers exactly (like flat) until then"
                )
            self._train()

    def _train(self) -> None:
        """Train the IVF structure on the vectors held so far and move them into it."""
        flat = faiss.downcast_index(self._cpu.index)
        ids = faiss.vector_to_array(self._cpu.id_map).astype(np.int64)
        vectors = faiss.vector_to_array(flat.codes).view(np.float32).reshape(-1, self.dim)
        n = len(ids)
        nlist = nlist_for(n, self.options.nlist)
        rng = np.random.default_rng(self.options.seed)
        sample_size = min(n, self.options.train_sample)
        sample = vectors[np.sort(rng.choice(n, sample_size, replace=False))] if sample_size < n else vectors
        nbits = None if self._use_gpu else pq_nbits_for(sample_size, self.options.pq_nbits)
        ivf = build_ivf(self.spec, self.dim, nlist, self.options, pq_nbits=nbits)
        logger.info("training %s: %d lists on %d of %d vectors", self.spec, nlist, sample_size, n)
        if self._use_gpu:
            # k-means and the bulk add are much faster on the device; the CPU master is then a copy.
            device_index = faiss_gpu.to_device(ivf, self.options.gpu_device, self.options.gpu_fp16)
            device_index.train(sample)
            _add_in_chunks(device_index, vectors, ids)
            master = faiss_gpu.to_host(device_index)  # already the concrete IndexIVF* type
            master.set_direct_map_type(faiss.DirectMap.Hashtable)
            master.nprobe = min(self.options.nprobe, nlist)
            self._cpu = master
            self._replica = faiss_gpu.GpuReplica(
                master,
                self.options.gpu_device,
                fp16=self.options.gpu_fp16,
                resync_fraction=self.options.gpu_resync_fraction,
                device_index=device_index,
            )
        else:
            ivf.train(sample)
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
            _add_in_chunks(ivf, vectors, ids)
            self._cpu = ivf
        self._trained = True
        self._nlist = nlist
        self._trained_size = n

    def _rebuild_hnsw(self) -> None:
        """Rebuild the HNSW graph from its own stored vectors without the tombstoned ones."""
        alive = self._table.ids()
        logger.info("rebuilding HNSW graph: %d items, %d tombstones", len(alive), len(self._tombstones))
        fresh = build_hnsw(self.dim, self.options)
        for start in range(0, len(alive), _CHUNK):
            chunk = alive[start : start + _CHUNK]
            fresh.add_with_ids(self._cpu.reconstruct_batch(chunk), chunk)
        self._cpu = fresh
        self._tombstones = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------------------- persistence

    def save(self, path: str | Path, *, last_seq: int = 0) -> snapshot.Manifest:
        """Write an atomic snapshot to the folder ``path`` (see :mod:`index.snapshot`).

        Args:
            path: snapshot folder.
            last_seq: sequence number of the last operation applied to this index, so that a
                loader replays only what came after it.
        """
        last_seq = check_last_seq(last_seq)
        with self._lock.read():
            cpu, arrays = self._cpu, self._table.to_arrays()
            arrays["tombstones"] = self._tombstones.copy()

            def write_index(tmp: Path) -> None:
                faiss.write_index(cpu, str(tmp))

            options = self.options.to_json()
            options.update(trained=self._trained, nlist=self._nlist, trained_size=self._trained_size)
            return self._write_snapshot(
                path,
                {"index": (".faiss", write_index), "attributes": (".npz", npz_writer(arrays))},
                count=len(self._table),
                last_seq=last_seq,
                options=options,
            )

    @snapshot_loader
    def load(cls, path: str | Path, **overrides: Any) -> FaissIndex:
        """Open a snapshot written by :meth:`save`, verifying its checksums.

        Args:
            path: snapshot folder.
            **overrides: options to change on load (e.g. ``gpu=False``, ``nprobe=64``).

        Raises:
            SnapshotError: missing, corrupt or inconsistent snapshot (rebuild from the database).
        """
        manifest = cls._verify_snapshot(path)
        saved = dict(manifest.options)
        trained = bool(saved.pop("trained", False))
        nlist = saved.pop("nlist", None)
        trained_size = int(saved.pop("trained_size", 0))
        saved.update(overrides)
        index = cls(manifest.dim, manifest.spec, **saved)
        try:
            cpu = faiss.read_index(str(snapshot.file_path(path, manifest, "index")))
            arrays = read_npz(snapshot.file_path(path, manifest, "attributes"))
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise SnapshotError(f"snapshot at {path} could not be read ({exc}): rebuild the index") from exc
        if cpu.d != manifest.dim:
            raise SnapshotError(f"snapshot index has dimension {cpu.d}, the manifest says {manifest.dim}")
        # read_index returns the concrete type; re-wrapping it (downcast_index) would leave the
        # owning wrapper to be garbage-collected and free the index under the new one.
        if isinstance(cpu, faiss.IndexIVF) and cpu.direct_map.type != faiss.DirectMap.Hashtable:
            cpu.set_direct_map_type(faiss.DirectMap.Hashtable)
        store = index._table.store_vectors
        if store and "vectors" not in arrays:
            raise SnapshotError(
                f"snapshot at {path} has no stored vectors but rerank is on; load with rerank=False"
            )
        try:
            table = AttributeTable.from_arrays(manifest.dim, arrays, store_vectors=store)
        except KeyError as exc:
            raise SnapshotError(
                f"snapshot attributes at {path} lack column {exc}: rebuild the index"
            ) from exc
        tombstones = np.asarray(arrays.get("tombstones", np.zeros(0)), dtype=np.int64)
        if len(table) != manifest.count or cpu.ntotal != len(table) + len(tombstones):
            raise SnapshotError(
                f"snapshot at {path} is inconsistent: manifest count {manifest.count}, attribute rows "
                f"{len(table)}, index vectors {cpu.ntotal} ({len(tombstones)} tombstones): rebuild the index"
            )
        with index._lock.write():
            index._cpu = cpu
            index._table = table
            index._tombstones = tombstones
            index._trained = trained or manifest.spec not in TRAINED_SPECS
            index._nlist = int(nlist) if nlist is not None else None
            index._trained_size = trained_size
            if index._use_gpu:
                index._replica = faiss_gpu.GpuReplica(
                    cpu,
                    index.options.gpu_device,
                    fp16=index.options.gpu_fp16,
                    resync_fraction=index.options.gpu_resync_fraction,
                )
        logger.info(
            "loaded %s snapshot from %s: %d items, last_seq=%d",
            manifest.spec,
            path,
            len(table),
            manifest.last_seq,
        )
        return index

    def __repr__(self) -> str:
        state = "" if self._trained else ", untrained"
        return f"FaissIndex(spec={self.spec!r}, dim={self.dim}, n={len(self)}, gpu={self._use_gpu}{state})"


# ------------------------------------------------------------------------------------- helpers


def _selector_for(allowed: np.ndarray, keep_alive: list[Any]) -> Any:
    """A FAISS id selector for the sorted id array ``allowed`` (kept alive through ``keep_alive``)."""
    if len(allowed) >= _BITMAP_MIN_IDS:
        max_id = int(allowed[-1])
        if max_id // 8 + 1 <= _BITMAP_MAX_BYTES:
            mask = np.zeros(max_id + 1, dtype=bool)
            mask[allowed] = True
            bitmap = np.packbits(mask, bitorder="little")  # FAISS reads bit (id & 7) of byte id >> 3
            keep_alive.append(bitmap)
            return faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    return faiss.IDSelectorBatch(allowed)


def _isin_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(sorted_ids, values), len(sorted_ids) - 1)
    return sorted_ids[pos] == values


def _top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns per row, ordered by score (ties by id, so results are deterministic)."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, part, axis=1)
        ids = np.take_along_axis(ids, part, axis=1)
    order = np.lexsort((ids, -scores), axis=1)
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if scores.shape[1] >= k:
        return scores[:, :k], ids[:, :k]
    extra = k - scores.shape[1]
    scores = np.concatenate([scores, np.full((len(scores), extra), PAD_SCORE, np.float32)], axis=1)
    ids = np.concatenate([ids, np.full((len(ids), extra), -1, np.int64)], axis=1)
    return scores, ids


def _finish(scores: np.ndarray, ids: np.ndarray, k: int) -> SearchResult:
    scores, ids = _pad(scores, ids, k)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    scores = np.where(ids >= 0, scores, PAD_SCORE).astype(np.float32)
    return SearchResult(scores=scores, ids=ids, short=(ids >= 0).sum(axis=1) < k)


def _add_in_chunks(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    chunks = range(0, len(ids), _CHUNK)
    for start in tqdm(chunks, desc="indexing", unit="chunk", disable=len(chunks) < 8, leave=False):
        index.add_with_ids(
            np.ascontiguousarray(vectors[start : start + _CHUNK]),
            np.ascontiguousarray(ids[start : start + _CHUNK]),
        )


def _index_nbytes(index: faiss.Index) -> int:
    # Serialised size is a good proxy for memory (codes, ids, lists or graph) and works for every
    # index type; counting through a callback writer avoids materialising gigabytes.
    total = 0

    def count(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total
