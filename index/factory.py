"""One factory for every vector index, and one loader for every snapshot.

Backends are imported on first use, so ``import index`` costs neither pymilvus nor a GPU probe.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from index.base import IndexInputError, SnapshotError, VectorIndex
from index.snapshot import read_manifest

# backend name -> (module, class); the module is imported on first use.
_CLASSES = {
    "faiss": ("index.faiss_index", "FaissIndex"),
    "milvus": ("index.milvus_index", "MilvusIndex"),
    "torch": ("index.torch_index", "TorchIndex"),
}
BACKENDS = tuple(_CLASSES)


def backend_class(backend: str) -> type[VectorIndex]:
    """The index class of ``backend``, imported now.

    Raises:
        IndexInputError: unknown backend.
    """
    if backend not in _CLASSES:
        raise IndexInputError(f"unknown index backend '{backend}'; choose one of {list(BACKENDS)}")
    module, name = _CLASSES[backend]
    return getattr(importlib.import_module(module), name)


def create_index(
    backend: str = "faiss", spec: str = "flat", dim: int | None = None, **options: Any
) -> VectorIndex:
    """Build an empty index.

    Args:
        backend: ``faiss`` (in-process, the default), ``milvus`` (milvus-lite file or a server) or
            ``torch`` (exact search as a matrix product on a GPU, no faiss-gpu needed).
        spec: index structure: ``flat`` (exact), ``ivf-flat``, ``ivf-sq8``, ``ivf-pq``, ``hnsw``
            (Milvus also ``gpu-flat``, ``gpu-ivf-flat``, ``gpu-ivf-pq``, ``gpu-cagra``; torch only
            ``flat``).
        dim: vector dimension (required).
        **options: backend options: see :class:`index.faiss_specs.FaissOptions`,
            :class:`index.milvus_index.MilvusIndex` (``uri``, ``token``, ``collection``...) and
            :class:`index.torch_index.TorchIndex` (``device``, ``dtype``: float16 on CUDA).

    Returns:
        A :class:`~index.base.VectorIndex`.
    """
    if dim is None:
        raise IndexInputError("create_index needs dim= (the embedding dimension, e.g. 384 or 768)")
    return backend_class(backend)(dim, spec, **options)


def load_index(path: str | Path, **options: Any) -> VectorIndex:
    """Open the snapshot in folder ``path`` with the backend its manifest names.

    Args:
        path: snapshot folder written by ``save``.
        **options: overrides passed to the backend's ``load`` (``gpu=False``, ``token=...``,
            ``device="cpu"``).

    Raises:
        SnapshotError: missing, corrupt or mismatched snapshot (rebuild from the database).
    """
    backend = read_manifest(path).backend
    if backend not in _CLASSES:
        raise SnapshotError(f"the snapshot names unknown backend '{backend}'; rebuild it from the database")
    return backend_class(backend).load(path, **options)
