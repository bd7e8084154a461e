"""A search replica of a FAISS index on one GPU, owned by one lock.

FAISS GPU indexes cannot remove vectors, cannot be written to disk directly, are not safe for
concurrent use, and silently ignore the id selector of ``SearchParameters`` (GpuIndexFlat drops
the parameters; GpuIndexIVF reads only ``nprobe``). So the CPU index stays the master copy (it
takes removals and is what snapshots write), and the GPU holds a search replica:

- adds go to both copies;
- removals mark the replica's entries dead (the caller filters them out of results, see
  :class:`~index.faiss_index.FaissIndex`) and the replica is re-uploaded from the master once
  more than ``resync_fraction`` of it is dead;
- every GPU call (search, add, upload) holds :attr:`GpuReplica.lock`, so one thread at a time
  talks to the device.

Storage is fp16 where FAISS supports it: the flat index (``useFloat16``), the IVF coarse
quantizer, and the IVF-PQ lookup tables; IVF-Flat lists stay float32 and IVF-SQ8 is 8-bit anyway.
GPU k-selection is limited to k <= 2048 and nprobe <= 2048.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import faiss
import numpy as np

logger = logging.getLogger(__name__)

#: Largest k (and nprobe) a FAISS GPU index accepts.
GPU_MAX_K = 2048

_resources: dict[int, Any] = {}
_resources_lock = threading.Lock()


def gpu_count() -> int:
    """Number of GPUs FAISS can use (0 with the faiss-cpu wheel)."""
    get = getattr(faiss, "get_num_gpus", None)
    if get is None:
        return 0
    try:
        return int(get())
    except RuntimeError:  # a CUDA build on a machine without a usable driver
        return 0


def _gpu_resources(device: int) -> Any:
    # One StandardGpuResources per device for the process: each one reserves scratch memory.
    with _resources_lock:
        if device not in _resources:
            _resources[device] = faiss.StandardGpuResources()
        return _resources[device]


def to_device(index: faiss.Index, device: int, fp16: bool) -> faiss.Index:
    """Copy a CPU index (flat or IVF, trained or not) to GPU ``device``."""
    options = faiss.GpuClonerOptions()
    options.useFloat16 = fp16
    if hasattr(options, "useFloat16CoarseQuantizer"):
        options.useFloat16CoarseQuantizer = fp16
    # An IVF index may be copied before it is trained (training then runs on the GPU).
    return faiss.index_cpu_to_gpu(_gpu_resources(device), device, index, options)


def to_host(index: faiss.Index) -> faiss.Index:
    """Copy a GPU index back to the CPU."""
    return faiss.index_gpu_to_cpu(index)


class GpuReplica:
    """Search-only copy of the CPU master index on one GPU.

    Args:
        master: the CPU index: ``IndexIDMap2`` over ``IndexFlatIP``, or a trained ``IndexIVF``.
        device: CUDA device number.
        fp16: store vectors / lookup tables in half precision where FAISS allows it.
        resync_fraction: re-upload once this fraction of the replica's entries is dead.
        device_index: an already populated GPU copy of ``master`` to adopt (after GPU training).
    """

    def __init__(
        self,
        master: faiss.Index,
        device: int,
        *,
        fp16: bool = True,
        resync_fraction: float = 0.05,
        device_index: faiss.Index | None = None,
    ) -> None:
        self.device = device
        self.fp16 = fp16
        self.resync_fraction = resync_fraction
        self.lock = threading.Lock()
        self._index: faiss.Index | None = None
        self._position_ids: np.ndarray | None = None  # flat replica: position -> our id (-1 dead)
        self._dead = 0
        self.resync(master, device_index=device_index)

    # ------------------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        """Entries held on the device, dead ones included."""
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def dead(self) -> int:
        """Entries removed from the master but still on the device."""
        return self._dead

    def resync(self, master: faiss.Index, *, device_index: faiss.Index | None = None) -> None:
        """Replace the device copy with a fresh upload of ``master``."""
        with self.lock:
            self._index = None  # free device memory before allocating the new copy
            if isinstance(master, faiss.IndexIDMap2 | faiss.IndexIDMap):
                # GPU flat indexes do not take ids; keep the position -> id map on the host.
                inner = faiss.downcast_index(master.index)
                self._index = device_index or to_device(inner, self.device, self.fp16)
                self._position_ids = faiss.vector_to_array(master.id_map).astype(np.int64)
            else:
                self._index = device_index or to_device(master, self.device, self.fp16)
                self._position_ids = None
            self._dead = 0
        logger.debug("GPU replica on device %d holds %d vectors", self.device, self.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors (already added to the master)."""
        with self.lock:
            assert self._index is not None
            if self._position_ids is None:
                self._index.add_with_ids(vectors, ids)
            else:
                self._index.add(vectors)
                self._position_ids = np.concatenate([self._position_ids, ids])

    def remove(self, ids: np.ndarray) -> bool:
        """Mark ids dead; returns True when the replica should be re-uploaded from the master."""
        with self.lock:
            if self._position_ids is not None:
                hit = np.isin(self._position_ids, ids)
                self._position_ids[hit] = -1
                self._dead += int(hit.sum())
            else:
                # IVF replicas return our ids directly; the caller drops the removed ones.
                self._dead += len(ids)
            return self._dead > max(1024, self.resync_fraction * max(self.ntotal, 1))

    def search(
        self, queries: np.ndarray, k: int, *, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw top-k from the device: scores and our ids (``-1`` for padding and dead flat entries).

        Dead IVF entries still come back with their ids; the caller filters them.
        """
        k = min(k, GPU_MAX_K)
        with self.lock:
            assert self._index is not None
            params = None
            if nprobe is not None and self._position_ids is None:
                params = faiss.SearchParametersIVF(nprobe=int(min(nprobe, GPU_MAX_K)))
            scores, labels = self._index.search(queries, k, params=params)
            position_ids = self._position_ids
        if position_ids is not None:
            valid = labels >= 0
            labels = np.where(valid, position_ids[np.where(valid, labels, 0)], -1)
        return scores, labels
