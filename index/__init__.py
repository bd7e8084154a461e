"""Vector indexes (FAISS, Milvus, torch) behind one contract, and their snapshots. Depends on nothing of ours.

``create_index(backend, spec, dim, **options)`` builds any index; every index follows the
:class:`VectorIndex` contract of :mod:`index.base`. Backend classes (``FaissIndex``,
``MilvusIndex``, ``TorchIndex``) are imported lazily, so ``import index`` never imports pymilvus.
"""

from __future__ import annotations

from typing import Any

from index.base import (
    Attributes,
    Capabilities,
    IndexBackendError,
    IndexInputError,
    IndexNotTrainedError,
    SearchFilter,
    SearchResult,
    SnapshotError,
    VectorIndex,
)
from index.factory import create_index, load_index
from index.recall import measure_recall
from index.snapshot import Manifest, read_manifest

__all__ = [
    "Attributes",
    "Capabilities",
    "FaissIndex",
    "IndexBackendError",
    "IndexInputError",
    "IndexNotTrainedError",
    "Manifest",
    "MilvusIndex",
    "SearchFilter",
    "SearchResult",
    "SnapshotError",
    "TorchIndex",
    "VectorIndex",
    "create_index",
    "load_index",
    "measure_recall",
    "read_manifest",
]


def __getattr__(name: str) -> Any:
    # Lazy backends: FAISS loads its native library, Milvus its gRPC client.
    if name == "FaissIndex":
        from index.faiss_index import FaissIndex

        return FaissIndex
    if name == "MilvusIndex":
        from index.milvus_index import MilvusIndex

        return MilvusIndex
    if name == "TorchIndex":
        from index.torch_index import TorchIndex

        return TorchIndex
    raise AttributeError(f"module 'index' has no attribute {name!r}")
