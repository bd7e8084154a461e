"""Distance matrices between feature sets: cosine, euclidean and squared euclidean, in bounded chunks.

One torch implementation serves the CPU and the GPU, so both give the same numbers up to float
rounding. Features are computed in float32 unless they arrive in float64 (then float64 is kept, so a
caller who wants exact float64 distances gets them).

Definitions (the contract of ``reid evaluate-features``):

- ``cosine``: 1 - <x/|x|, y/|y|>; zero vectors are left at zero (their distance to everything is 1).
- ``euclidean``: |x - y| (plain, not squared).
- ``sqeuclidean``: |x - y|^2.

The euclidean forms use |x|^2 + |y|^2 - 2<x, y>, clamped at 0 so rounding never yields a negative
squared distance (and never a NaN under the square root).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

Metric = Literal["cosine", "euclidean", "sqeuclidean"]
METRICS: tuple[str, ...] = ("cosine", "euclidean", "sqeuclidean")

#: Default working-set budget of one chunk of a distance/ranking computation.
DEFAULT_CHUNK_BYTES = 256 * 1024**2


class DistanceError(ValueError):
    """Features or a metric that no distance can be computed from."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to compute on: the one asked for, else CUDA when torch sees a GPU, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistanceError(
            f"device {str(device)!r} was asked for, but torch sees no CUDA GPU; use device='cpu'"
        )
    return dev


def check_metric(metric: str) -> str:
    """Return ``metric`` if it is one we compute, else raise a DistanceError naming the valid ones."""
    if metric not in METRICS:
        raise DistanceError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    return metric


def compute_dtype(*arrays: np.ndarray | torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (half precision is widened)."""
    for a in arrays:
        if a.dtype in (np.float64, torch.float64):
            return torch.float64
    return torch.float32


def as_tensor(x: np.ndarray | torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor on ``device`` with ``dtype``, sharing memory with a CPU numpy array where possible."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=dtype)


class PreparedGallery:
    """Gallery features prepared once (normalised or with squared norms) for many query chunks.

    Args:
        gallery: (n, d) features.
        metric: one of :data:`METRICS`.
        device: where the products are computed.
        dtype: the compute dtype (see :func:`compute_dtype`).
    """

    def __init__(self, gallery: torch.Tensor, metric: str, device: torch.device, dtype: torch.dtype):
        self.metric = check_metric(metric)
        g = gallery.to(device=device, dtype=dtype)
        if metric == "cosine":
            g = torch.nn.functional.normalize(g, dim=1)
            self.sq_norms = None
        else:
            self.sq_norms = (g * g).sum(dim=1)
        self.features = g
        self.device = device
        self.dtype = dtype

    def distances(self, queries: torch.Tensor) -> torch.Tensor:
        """(b, n) distances from a chunk of queries to the whole gallery."""
        q = queries.to(device=self.device, dtype=self.dtype)
        # addmm fuses the product with the constant term, so the (b, n) block is written once.
        if self.metric == "cosine":
            q = torch.nn.functional.normalize(q, dim=1)
            one = torch.ones((), dtype=self.dtype, device=self.device)
            return torch.addmm(one, q, self.features.T, alpha=-1.0)
        assert self.sq_norms is not None
        d = torch.addmm(self.sq_norms[None, :], q, self.features.T, alpha=-2.0)
        d.add_((q * q).sum(dim=1, keepdim=True))
        d.clamp_(min=0.0)
        if self.metric == "euclidean":
            d.sqrt_()
        return d


def rows_per_chunk(num_columns: int, bytes_per_cell: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many rows of a (rows x num_columns) working set fit in ``budget_bytes`` (at least one)."""
    return max(1, int(budget_bytes // max(1, num_columns * bytes_per_cell)))


def iter_distance_chunks(
    query: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    metric: str = "cosine",
    *,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield ``(query_rows, distances)`` for consecutive chunks of queries against the whole gallery.

    Only one (chunk x gallery) block exists at a time, so memory stays bounded at any gallery size.
    """
    check_metric(metric)
    dev = resolve_device(device)
    dtype = compute_dtype(query, gallery)
    q = as_tensor(query, torch.device("cpu") if isinstance(query, np.ndarray) else query.device, dtype)
    prepared = PreparedGallery(as_tensor(gallery, dev, dtype), metric, dev, dtype)
    n_q, n_g = q.shape[0], prepared.features.shape[0]
    step = chunk_size or rows_per_chunk(n_g, bytes_per_cell=3 * torch.finfo(dtype).bits // 8)
    with torch.inference_mode():
        for start in range(0, n_q, step):
            rows = slice(start, min(start + step, n_q))
            yield rows, prepared.distances(q[rows])


def distance_matrix(
    query: np.ndarray | torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    metric: str = "cosine",
    *,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    as_numpy: bool = True,
) -> np.ndarray | torch.Tensor:
    """The full (n_query x n_gallery) distance matrix, computed in chunks.

    Args:
        query: (m, d) features (numpy or torch).
        gallery: (n, d) features with the same d.
        metric: ``cosine``, ``euclidean`` or ``sqeuclidean``.
        device: where to compute (default: CUDA if available, else CPU).
        chunk_size: query rows per chunk (default: sized to a ~256 MB working set).
        as_numpy: return a numpy array on the CPU (default) or a tensor on ``device``.
    """
    check_features_pair(query, gallery)
    dev = resolve_device(device)
    dtype = compute_dtype(query, gallery)
    out_device = torch.device("cpu") if as_numpy else dev
    out = torch.empty((query.shape[0], gallery.shape[0]), dtype=dtype, device=out_device)
    for rows, block in iter_distance_chunks(query, gallery, metric, device=dev, chunk_size=chunk_size):
        out[rows] = block.to(out_device)
    return out.numpy() if as_numpy else out


def check_features_pair(query: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor) -> None:
    """Raise DistanceError unless both are 2-D float arrays of the same width without NaN or inf."""
    for name, x in (("query", query), ("gallery", gallery)):
        if x.ndim != 2:
            raise DistanceError(f"{name} features must be a 2-D (n, d) array, got shape {tuple(x.shape)}")
        is_float = (
            x.is_floating_point() if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating)
        )
        if not is_float:
            raise DistanceError(f"{name} features must be floating point, got dtype {x.dtype}")
        finite = bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
        if not finite:
            raise DistanceError(f"{name} features contain NaN or infinite values; fix the feature extraction")
    if query.shape[1] != gallery.shape[1]:
        raise DistanceError(
            f"query features have dimension {query.shape[1]} but gallery features {gallery.shape[1]}: "
            "they must come from the same model"
        )
