"""FAISS index specs by name, their options, and the rules that size them.

Specs (all inner product on unit vectors, i.e. cosine similarity):

========== ======================================================= ======= =============
spec       structure                                               exact   needs training
========== ======================================================= ======= =============
flat       ``IndexIDMap2(IndexFlatIP)``                            yes     no
ivf-flat   ``IndexIVFFlat``, ids native, hashtable direct map       no      yes
ivf-sq8    ``IndexIVFScalarQuantizer`` (8-bit per dimension)        no      yes
ivf-pq     ``IndexIVFPQ`` (+ exact re-ranking from stored vectors)  no      yes
hnsw       ``IndexIDMap2(IndexHNSWFlat)``, removal by tombstones     no      no
========== ======================================================= ======= =============

A trained spec starts as ``flat`` and is trained once ``train_min`` vectors exist (on a seeded
sample of at most ``train_sample`` of them); until then it answers exactly, like ``flat``. The
number of lists defaults to ``4 * sqrt(n)`` at training time, capped so that every list gets at
least 39 training points (FAISS's own k-means rule). The quantizer is not retrained as the
gallery grows; past ``8x`` the training size the index logs a warning that a rebuild from the
database (``reset`` + re-add) would restore the intended list sizes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import faiss

from index.base import IndexInputError

SPECS = ("flat", "ivf-flat", "ivf-sq8", "ivf-pq", "hnsw")
TRAINED_SPECS = frozenset({"ivf-flat", "ivf-sq8", "ivf-pq"})
#: Largest k a FAISS search accepts, on CPU and GPU alike (the GPU k-selection limit), so that a
#: request valid on a developer's CPU never fails in production on a GPU.
MAX_K = 2048
#: Below this many points per centroid FAISS k-means warns that training is unreliable.
_MIN_POINTS_PER_CENTROID = 39


@dataclass(frozen=True)
class FaissOptions:
    """Tuning knobs of the FAISS backend; every field has a working default.

    Attributes:
        nlist: IVF lists; None sizes it at training time (~4 sqrt(n)).
        nprobe: IVF lists scanned per query.
        train_min: vectors needed before an IVF spec trains; None: 4096 (ivf-pq: 9984, enough
            for 8-bit product-quantizer codebooks).
        train_sample: most vectors used for training (seeded sample).
        pq_m: product-quantizer sub-vectors (must divide dim); None: dim // 8 or the nearest divisor.
        pq_nbits: bits per sub-vector code.
        rerank: ivf-pq only: keep full vectors and re-rank ``rerank_factor * k`` candidates exactly.
        rerank_factor: candidate multiplier for re-ranking.
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW build beam width.
        ef_search: HNSW search beam width (raised to k when k is larger).
        rebuild_fraction: HNSW rebuilds its graph once this fraction of it is tombstones.
        exact_subset_limit: a filter that leaves at most this many items is answered by exact
            search over those items (faster and exact, whatever the spec).
        gpu: True: require a GPU; False: stay on the CPU; None: use one when FAISS sees it.
        gpu_device: CUDA device number.
        gpu_fp16: half-precision storage on the GPU.
        gpu_resync_fraction: re-upload the GPU replica once this fraction of it is removed.
        seed: seed of every random choice (training sample, k-means).
    """

    nlist: int | None = None
    nprobe: int = 32
    train_min: int | None = None
    train_sample: int = 131_072
    pq_m: int | None = None
    pq_nbits: int = 8
    rerank: bool = True
    rerank_factor: int = 4
    hnsw_m: int = 32
    ef_construction: int = 100
    ef_search: int = 128
    rebuild_fraction: float = 0.25
    exact_subset_limit: int = 4096
    gpu: bool | None = None
    gpu_device: int = 0
    gpu_fp16: bool = True
    gpu_resync_fraction: float = 0.05
    seed: int = 0

    @classmethod
    def from_kwargs(cls, spec: str, dim: int, options: dict[str, Any]) -> FaissOptions:
        """Build options from keyword arguments, rejecting unknown names and impossible values."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise IndexInputError(
                f"unknown FAISS option(s) {unknown} for spec '{spec}'; known: {sorted(known)}"
            )
        opts = cls(**options)
        positive = (
            "nprobe",
            "train_sample",
            "pq_nbits",
            "rerank_factor",
            "hnsw_m",
            "ef_construction",
            "ef_search",
            "exact_subset_limit",
        )
        for name in positive:
            if int(getattr(opts, name)) < 1:
                raise IndexInputError(f"FAISS option {name} must be >= 1, got {getattr(opts, name)}")
        if opts.nlist is not None and opts.nlist < 1:
            raise IndexInputError(f"FAISS option nlist must be >= 1, got {opts.nlist}")
        if opts.train_min is not None and opts.train_min < 1:
            raise IndexInputError(f"FAISS option train_min must be >= 1, got {opts.train_min}")
        if spec == "ivf-pq":
            m = opts.pq_m or default_pq_m(dim)
            if dim % m:
                raise IndexInputError(f"ivf-pq: pq_m={m} must divide the dimension {dim}")
            if not 1 <= opts.pq_nbits <= 16:
                raise IndexInputError(f"ivf-pq: pq_nbits must be in [1, 16], got {opts.pq_nbits}")
        for name in ("rebuild_fraction", "gpu_resync_fraction"):
            if not 0 < getattr(opts, name) <= 1:
                raise IndexInputError(f"FAISS option {name} must be in (0, 1], got {getattr(opts, name)}")
        return opts

    def effective_train_min(self, spec: str) -> int:
        """Vectors needed before ``spec`` trains."""
        if self.train_min is not None:
            return self.train_min
        return _MIN_POINTS_PER_CENTROID * 256 if spec == "ivf-pq" else 4096

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_pq_m(dim: int) -> int:
    """Sub-vectors for product quantization: 8 dimensions each when possible (48 for d=384)."""
    target = max(1, dim // 8)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


def nlist_for(n: int, requested: int | None = None) -> int:
    """IVF list count for ``n`` training vectors: ``requested`` or ~4 sqrt(n), >= 39 points each."""
    cap = max(1, n // _MIN_POINTS_PER_CENTROID)
    if requested is not None:
        return max(1, min(requested, n))
    return max(1, min(round(4 * math.sqrt(n)), cap))


def build_flat(dim: int) -> faiss.Index:
    """Exact inner-product index with arbitrary int64 ids."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def build_hnsw(dim: int, opts: FaissOptions) -> faiss.Index:
    """HNSW graph over exact vectors, with arbitrary int64 ids."""
    hnsw = faiss.IndexHNSWFlat(dim, opts.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = opts.ef_construction
    hnsw.hnsw.efSearch = opts.ef_search
    return faiss.IndexIDMap2(hnsw)


def pq_nbits_for(n_train: int, requested: int) -> int:
    """Bits per PQ code: ``requested``, lowered so each codebook centroid gets >= 39 training points.

    Only on the CPU: FAISS GPU IVF-PQ accepts 8-bit codes only, and large galleries train with 8.
    """
    fit = int(math.log2(max(2, n_train // _MIN_POINTS_PER_CENTROID)))
    return max(1, min(requested, fit))


def build_ivf(
    spec: str, dim: int, nlist: int, opts: FaissOptions, *, pq_nbits: int | None = None
) -> faiss.IndexIVF:
    """An untrained IVF index of ``spec`` (ivf-flat / ivf-sq8 / ivf-pq); ``pq_nbits`` overrides the option."""
    quantizer = faiss.IndexFlatIP(dim)
    if spec == "ivf-flat":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    elif spec == "ivf-sq8":
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
    elif spec == "ivf-pq":
        m = opts.pq_m or default_pq_m(dim)
        nbits = opts.pq_nbits if pq_nbits is None else pq_nbits
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = opts.seed
    else:
        raise IndexInputError(f"'{spec}' is not an IVF spec")
    index.cp.seed = opts.seed
    index.nprobe = min(opts.nprobe, nlist)
    return index
