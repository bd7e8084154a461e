"""Retrieval metrics for re-identification: mAP, CMC and mINP under the Market-1501 and VehicleID protocols.

Three entry points, from the lowest level up:

1. :func:`evaluate_distmat` ranks a (query x gallery) distance matrix you already have.
2. :func:`evaluate_features` computes the distances itself, chunk by chunk, so the full matrix never
   exists (MSMT17 size, 11,659 x 82,161, runs in a bounded working set) and optionally re-ranks.
3. :func:`vehicleid_protocol` draws the VehicleID query/gallery splits and repeats the evaluation.

All three return the same dictionary (see :func:`evaluate_distmat`); every fraction lies in [0, 1].
:func:`rank_queries` ranks exactly as :func:`evaluate_features` does but returns each query's AP,
first-match rank and top-k list (a :class:`QueryRanking`), for rank-list views of the worst queries.

Definitions, as in torchreid's ``eval_market1501``, fast-reid and TransReID:

- **Market-1501 rule** (``same_camera_filter``): for each query, gallery items with the same identity
  *and* the same camera are removed from its ranking (they are not counted as hits nor as misses).
  A query with no remaining gallery item of its identity is skipped and counted in
  ``num_skipped_queries``. Gallery distractors (Market's identity 0) are ordinary negatives; junk
  images (identity -1) are dropped by the dataset parsers before they reach this module.
- **AP, standard**: mean over the hits of the precision at each hit, i.e. for hits at 1-based ranks
  r_1 < ... < r_n: AP = (1/n) * sum_k k / r_k.
- **AP, devkit**: the official Market-1501 MATLAB devkit's ``compute_AP.m`` (Zheng et al., 2015;
  github.com/zhunzhong07/IDE-baseline-Market-1501, ``market_evaluation/utils/compute_AP.m``), which
  integrates the precision-recall curve with trapezoids: every hit adds
  (1/n) * (precision before it + precision at it) / 2, where the precision before the k-th hit is
  (k-1)/(r_k-1), or 1 when the hit is ranked first. It is never larger than the standard AP.
- **CMC** at rank k: the fraction of valid queries with a hit among their first k (kept) items.
- **mINP** (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook", TPAMI
  2021): INP = n / r_n, the number of hits over the rank of the hardest one; mINP is its mean.
- **Ties**: the gallery is ordered by (distance, gallery index), a stable order, so equal distances
  keep the order in which the gallery was given (as MATLAB's stable ``sort`` in the devkit does).

Ranking runs fully vectorised on chunks of queries: no per-query Python loop over the gallery. On the
CPU, float32 distances are sorted as unique int64 keys (distance bits, gallery index) with numpy's
SIMD sort, which yields exactly the stable order; float64 distances use numpy's quicksort and re-sort
the rare rows that hold equal distances stably. On a GPU ``torch.sort(stable=True)`` is used. After
sorting, only the positions of the query's own identity are kept (a sparse list), from which every
metric follows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from evaluation.distance import (
    DistanceError,
    PreparedGallery,
    as_tensor,
    check_features_pair,
    check_metric,
    compute_dtype,
    distance_matrix,
    resolve_device,
    rows_per_chunk,
)
from evaluation.rerank import RerankError, re_ranking

logger = logging.getLogger(__name__)

AP_MODES: tuple[str, ...] = ("standard", "devkit")
#: Protocol name -> whether the same-identity same-camera gallery items are removed.
PROTOCOLS: dict[str, bool] = {"market1501": True, "vehicleid": False}
#: CMC ranks reported in the ``cmc`` dictionary (those not above ``max_rank``, plus ``max_rank``).
REPORTED_RANKS: tuple[int, ...] = (1, 5, 10, 20, 50, 100)

# Bytes per (query, gallery) cell of the ranking working set: the distances (4-8), the sort order (8),
# the sorted distances for the tie check (4-8), two boolean masks and a margin for temporaries.
_RANK_BYTES_PER_CELL = 32


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated (shapes, NaN, no valid query, unknown option); the message says why."""


@dataclass
class _RankingTotals:
    """Per-query results accumulated over chunks (fast-reid's reset/process/evaluate idea)."""

    max_rank: int
    ap_sum: float = 0.0
    inp_sum: float = 0.0
    num_valid: int = 0
    num_skipped: int = 0
    first_hit_hist: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.first_hit_hist = np.zeros(self.max_rank, dtype=np.int64)

    def add(self, chunk: _ChunkMetrics) -> None:
        """Count the queries of one chunk: the valid ones in the sums, the others as skipped."""
        self.ap_sum += float(chunk.ap.sum())
        self.inp_sum += float(chunk.inp.sum())
        self.num_valid += int(chunk.valid.sum())
        self.num_skipped += int(chunk.valid.size - chunk.valid.sum())
        first_rank = chunk.first_rank
        self.first_hit_hist += np.bincount(first_rank[first_rank < self.max_rank], minlength=self.max_rank)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise EvaluationError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")
    return value


def _as_label_array(name: str, values: Any, length: int) -> np.ndarray:
    """Identity or camera labels as a 1-D numpy array of the given length."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise EvaluationError(f"{name} must be a 1-D array of length {length}, got shape {arr.shape}")
    return arr


def _label_arrays(
    q_pids: Any, g_pids: Any, q_camids: Any, g_camids: Any, num_q: int, num_g: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The identities and cameras of ``num_q`` queries and ``num_g`` gallery items, checked."""
    return (
        _as_label_array("q_pids", q_pids, num_q),
        _as_label_array("g_pids", g_pids, num_g),
        _as_label_array("q_camids", q_camids, num_q),
        _as_label_array("g_camids", g_camids, num_g),
    )


def _stable_order_float32(dist: np.ndarray) -> np.ndarray:
    """Per-row argsort of float32 distances in (distance, index) order, via one int64 key sort.

    Float32 distances tie often (a row of 16k cosine distances near 1 holds dozens of equal values),
    so a stable order matters and numpy's stable argsort is several times slower than its SIMD
    quicksort. Packing an order-preserving integer image of each float (high 32 bits) with the
    column index (low 32 bits) makes every key unique: an unstable sort of the keys then gives
    exactly the stable order, and the low bits are the permutation.
    """
    key = (dist + np.float32(0.0)).view(np.int32).astype(np.int64)  # + 0.0 turns -0.0 into +0.0
    flip = key >> 63  # all ones for negative floats, whose magnitude bits must sort in reverse
    flip &= 0x7FFFFFFF
    key ^= flip
    del flip
    key <<= 32
    key |= np.arange(dist.shape[1], dtype=np.int64)
    key.sort(axis=1)
    key &= 0xFFFFFFFF
    return key


def _stable_order_numpy(dist: np.ndarray) -> np.ndarray:
    """Per-row gallery order of one chunk on the CPU, by (distance, gallery index); refuses NaN."""
    if np.isnan(dist).any():
        raise EvaluationError("the distance matrix contains NaN; check the features or the distance function")
    if dist.dtype == np.float32 and dist.shape[1] < 2**32:
        return _stable_order_float32(np.ascontiguousarray(dist))
    # Wider floats rarely tie: numpy's fast quicksort, and a stable sort for rows holding ties.
    order = np.argsort(dist, axis=1)
    sorted_dist = np.take_along_axis(dist, order, axis=1)
    tie_rows = np.flatnonzero((sorted_dist[:, 1:] == sorted_dist[:, :-1]).any(axis=1))
    del sorted_dist
    if tie_rows.size:
        order[tie_rows] = np.argsort(dist[tie_rows], axis=1, kind="stable")
    return order


def _sorted_hits_numpy(
    dist: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, order: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank one chunk on the CPU and return the sorted positions of each query's identity.

    Returns ``(rows, positions, gallery_indices)`` of every gallery item whose identity equals the
    query's, row-major (so positions ascend within a row), in (distance, gallery index) order.
    ``order`` is :func:`_stable_order_numpy` of ``dist`` when the caller already has it.
    """
    if order is None:
        order = _stable_order_numpy(dist)
    same_id = g_pids[None, :] == q_pids[:, None]
    same_id_sorted = np.take_along_axis(same_id, order, axis=1)
    rows, positions = np.nonzero(same_id_sorted)
    return rows, positions, order[rows, positions]


def _sorted_hits_torch(
    dist: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_sorted_hits_numpy` for a tensor on any device (used on GPUs); returns numpy arrays."""
    if bool(torch.isnan(dist).any()):
        raise EvaluationError("the distance matrix contains NaN; check the features or the distance function")
    order = torch.sort(dist, dim=1, stable=True).indices
    same_id_sorted = (g_pids[None, :] == q_pids[:, None]).gather(1, order)
    rows, positions = same_id_sorted.nonzero(as_tuple=True)
    gallery_idx = order[rows, positions]
    return rows.cpu().numpy(), positions.cpu().numpy(), gallery_idx.cpu().numpy()


@dataclass(frozen=True)
class _ChunkMetrics:
    """Per-query results of one chunk; ``ap``, ``inp`` and ``first_rank`` hold the valid rows only."""

    valid: np.ndarray  # (rows,) bool: the query has a kept gallery item of its identity
    ap: np.ndarray  # (valid,) float64
    inp: np.ndarray  # (valid,) float64
    first_rank: np.ndarray  # (valid,) int64, 0-based rank of the first hit among the kept items


def _chunk_metrics(
    num_rows: int,
    rows: np.ndarray,
    positions: np.ndarray,
    gallery_idx: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    same_camera_filter: bool,
    ap_mode: str,
) -> _ChunkMetrics:
    """AP, INP and first-hit rank of each query of a chunk, from its sorted same-identity positions."""
    if same_camera_filter:
        junk = g_camids[gallery_idx] == q_camids[rows]
    else:
        junk = np.zeros(rows.shape[0], dtype=bool)
    # Removed items all share the query's identity, so they are all in this sparse list: the rank of
    # a hit among the kept items is its sorted position minus the removed items sorted before it.
    junk_cum = np.cumsum(junk)
    row_start = np.searchsorted(rows, np.arange(num_rows), side="left")
    junk_before_row = np.concatenate(([0], junk_cum))[row_start]
    junk_before = junk_cum - junk - junk_before_row[rows]
    hit = ~junk
    hit_rows = rows[hit]
    rank0 = (positions - junk_before)[hit].astype(np.float64)  # 0-based rank among kept items

    num_hits = np.bincount(hit_rows, minlength=num_rows)
    valid = num_hits > 0
    first_hit_index = np.concatenate(([0], np.cumsum(num_hits)))
    hit_number = np.arange(1, hit_rows.shape[0] + 1) - first_hit_index[hit_rows]  # k for the k-th hit

    precision = hit_number / (rank0 + 1.0)
    if ap_mode == "devkit":
        # compute_AP.m: ap += (recall - old_recall) * (old_precision + precision) / 2, where the old
        # precision is the one at the previous kept item, or 1.0 before the first item.
        prev_precision = np.divide(hit_number - 1, rank0, out=np.ones_like(rank0), where=rank0 > 0)
        contribution = (prev_precision + precision) / 2.0
    else:
        contribution = precision
    ap = np.bincount(hit_rows, weights=contribution, minlength=num_rows)[valid] / num_hits[valid]

    first_rank = rank0[first_hit_index[:-1][valid]].astype(np.int64)
    last_rank = rank0[first_hit_index[1:][valid] - 1]
    inp = num_hits[valid] / (last_rank + 1.0)
    return _ChunkMetrics(valid=valid, ap=ap, inp=inp, first_rank=first_rank)


def _rank_in_chunks(
    distances: Callable[[int, int], np.ndarray | torch.Tensor],
    labels: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    device: torch.device,
    *,
    step: int,
    same_camera_filter: bool,
    ap_mode: str,
    max_rank: int,
    desc: str,
) -> _RankingTotals:
    """Rank the queries ``step`` at a time and add up their metrics.

    Args:
        distances: ``distances(start, stop)`` is the (stop - start, num_gallery) block of queries
            ``start:stop``: a tensor on ``device`` when that is a GPU (ranked there), else numpy or a
            CPU tensor (ranked with numpy).
        labels: query identities, gallery identities, query cameras, gallery cameras (checked).
    """
    q_pids, g_pids, q_camids, g_camids = labels
    num_q = q_pids.shape[0]
    on_gpu = device.type != "cpu"
    if on_gpu:
        q_pids_t = torch.as_tensor(q_pids, device=device)
        g_pids_t = torch.as_tensor(g_pids, device=device)
    totals = _RankingTotals(max_rank=max_rank)
    with torch.inference_mode():
        for start in tqdm(range(0, num_q, step), desc=desc, unit="chunk", disable=None, leave=False):
            stop = min(start + step, num_q)
            dist = distances(start, stop)
            if on_gpu:
                assert isinstance(dist, torch.Tensor)
                hits = _sorted_hits_torch(dist, q_pids_t[start:stop], g_pids_t)
            else:
                block = dist.numpy() if isinstance(dist, torch.Tensor) else np.asarray(dist)
                hits = _sorted_hits_numpy(block, q_pids[start:stop], g_pids)
            del dist
            totals.add(
                _chunk_metrics(
                    stop - start, *hits, q_camids[start:stop], g_camids, same_camera_filter, ap_mode
                )
            )
    return totals


def _result(totals: _RankingTotals, *, protocol: str, ap_mode: str, metric: str, rerank: bool) -> dict:
    if totals.num_valid == 0:
        raise EvaluationError(
            f"no valid query: none of the {totals.num_skipped} queries has a gallery item of its identity"
            + (" from another camera" if PROTOCOLS.get(protocol, True) else "")
            + "; check that query and gallery identities overlap and that pids/camids are the right arrays"
        )
    curve = np.cumsum(totals.first_hit_hist) / totals.num_valid
    ranks = [r for r in REPORTED_RANKS if r <= totals.max_rank]
    if totals.max_rank not in ranks:
        ranks.append(totals.max_rank)
    return {
        "mAP": totals.ap_sum / totals.num_valid,
        "cmc": {str(r): float(curve[r - 1]) for r in ranks},
        "mINP": totals.inp_sum / totals.num_valid,
        "num_valid_queries": totals.num_valid,
        "num_skipped_queries": totals.num_skipped,
        "protocol": protocol,
        "ap_mode": ap_mode,
        "metric": metric,
        "rerank": rerank,
        "cmc_curve": [float(c) for c in curve],
    }


def _check_common(protocol: str, ap_mode: str, max_rank: int, same_camera_filter: bool | None) -> bool:
    _check_choice("protocol", protocol, tuple(PROTOCOLS))
    _check_choice("ap_mode", ap_mode, AP_MODES)
    if not isinstance(max_rank, int) or max_rank < 1:
        raise EvaluationError(f"max_rank must be a positive integer, got {max_rank!r}")
    return PROTOCOLS[protocol] if same_camera_filter is None else bool(same_camera_filter)


def evaluate_distmat(
    distmat: np.ndarray | torch.Tensor,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    max_rank: int = 50,
    ap_mode: str = "standard",
    same_camera_filter: bool | None = None,
    protocol: str = "market1501",
    metric: str = "precomputed",
    rerank: bool = False,
    chunk_size: int | None = None,
) -> dict:
    """Evaluate a ranking given as a (num_query x num_gallery) distance matrix (smaller = more similar).

    Args:
        distmat: distances, numpy or torch (a CUDA tensor is ranked on its GPU).
        q_pids, g_pids: identities of queries and gallery items.
        q_camids, g_camids: their cameras.
        max_rank: length of the CMC curve. Ranks beyond the number of kept gallery items count as
            found (every valid query has its hit within the whole list).
        ap_mode: ``standard`` (torchreid/fast-reid/TransReID) or ``devkit`` (Market-1501 devkit).
        same_camera_filter: apply the Market-1501 rule; None (default) means what ``protocol`` says:
            on for ``market1501``, off for ``vehicleid``.
        protocol: ``market1501`` or ``vehicleid``; also recorded in the result.
        metric, rerank: recorded in the result (how ``distmat`` was made).
        chunk_size: queries ranked at once (default: sized to a ~256 MB working set).

    Returns:
        ``{"mAP", "cmc": {"1", "5", "10", ...}, "mINP", "num_valid_queries", "num_skipped_queries",
        "protocol", "ap_mode", "metric", "rerank", "cmc_curve"}``, fractions in [0, 1].
    """
    same_cam = _check_common(protocol, ap_mode, max_rank, same_camera_filter)
    if distmat.ndim != 2:
        raise EvaluationError(
            f"distmat must be 2-D (num_query, num_gallery), got shape {tuple(distmat.shape)}"
        )
    num_q, num_g = distmat.shape
    labels = _label_arrays(q_pids, g_pids, q_camids, g_camids, num_q, num_g)
    device = distmat.device if isinstance(distmat, torch.Tensor) else torch.device("cpu")
    if isinstance(distmat, torch.Tensor) and device.type == "cpu":
        distmat = distmat.detach().numpy()
    totals = _rank_in_chunks(
        lambda start, stop: distmat[start:stop],
        labels,
        device,
        step=chunk_size or rows_per_chunk(num_g, _RANK_BYTES_PER_CELL),
        same_camera_filter=same_cam,
        ap_mode=ap_mode,
        max_rank=max_rank,
        desc="ranking",
    )
    return _result(totals, protocol=protocol, ap_mode=ap_mode, metric=metric, rerank=rerank)


Features = np.ndarray | torch.Tensor


def _check_features(q_feats: Any, g_feats: Any) -> tuple[Features, Features]:
    q = q_feats if isinstance(q_feats, torch.Tensor) else np.asarray(q_feats)
    g = g_feats if isinstance(g_feats, torch.Tensor) else np.asarray(g_feats)
    try:
        check_features_pair(q, g)
    except DistanceError as err:
        raise EvaluationError(str(err)) from None
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise EvaluationError(f"nothing to evaluate: {q.shape[0]} queries and {g.shape[0]} gallery items")
    return q, g


def _check_metric(metric: str) -> None:
    try:
        check_metric(metric)
    except DistanceError as err:
        raise EvaluationError(str(err)) from None


def _resolve_device(device: str | torch.device | None) -> torch.device:
    try:
        return resolve_device(device)
    except DistanceError as err:
        raise EvaluationError(str(err)) from None


def _query_distances(
    q: Features, g: Features, metric: str, device: torch.device
) -> Callable[[int, int], torch.Tensor]:
    """Distances of queries ``start:stop`` to the whole gallery, which is prepared once on ``device``.

    Call the returned function under ``torch.inference_mode()``.
    """
    dtype = compute_dtype(q, g)
    prepared = PreparedGallery(as_tensor(g, device, dtype), metric, device, dtype)
    q_t = q if isinstance(q, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(q))

    def distances(start: int, stop: int) -> torch.Tensor:
        return prepared.distances(q_t[start:stop])

    return distances


def evaluate_features(
    q_feats: Any,
    g_feats: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    metric: str = "cosine",
    rerank: bool = False,
    ap_mode: str = "standard",
    max_rank: int = 50,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    protocol: str = "market1501",
    rerank_max_memory_bytes: int | None = None,
) -> dict:
    """Evaluate query features against gallery features without building the full distance matrix.

    Distances are computed and ranked one chunk of queries at a time on ``device`` (default: CUDA when
    torch sees a GPU, else the CPU), so the working set stays near 256 MB whatever the gallery size.
    With ``rerank=True`` the k-reciprocal re-ranking (:func:`evaluation.rerank.re_ranking`) needs the dense
    query-gallery, query-query and gallery-gallery distances of ``metric``; it refuses with
    :class:`evaluation.rerank.RerankMemoryError` (before computing them) when they would not fit.

    Args:
        q_feats, g_feats: (m, d) and (n, d) float features (numpy or torch).
        q_pids, g_pids, q_camids, g_camids: identities and cameras.
        metric: ``cosine`` (1 - cosine similarity), ``euclidean`` or ``sqeuclidean``.
        rerank: apply k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3).
        ap_mode, max_rank, protocol: as in :func:`evaluate_distmat`.
        device: ``cpu``, ``cuda``, ``cuda:1``... (default: CUDA if available).
        chunk_size: queries per chunk (default: sized to a ~256 MB working set).
        rerank_max_memory_bytes: memory limit of the re-ranking (default: half the available memory).

    Returns:
        The dictionary of :func:`evaluate_distmat`.
    """
    _check_metric(metric)
    same_cam = _check_common(protocol, ap_mode, max_rank, None)
    q, g = _check_features(q_feats, g_feats)
    num_q, num_g = q.shape[0], g.shape[0]
    labels = _label_arrays(q_pids, g_pids, q_camids, g_camids, num_q, num_g)
    dev = _resolve_device(device)

    if rerank:
        return _evaluate_reranked(
            q, g, *labels, metric=metric, ap_mode=ap_mode,
            max_rank=max_rank, device=dev, protocol=protocol, max_memory_bytes=rerank_max_memory_bytes,
        )

    step = chunk_size or rows_per_chunk(num_g, _RANK_BYTES_PER_CELL)
    logger.debug("evaluating %d x %d on %s, %d queries per chunk", num_q, num_g, dev, step)
    totals = _rank_in_chunks(
        _query_distances(q, g, metric, dev),
        labels,
        dev,
        step=step,
        same_camera_filter=same_cam,
        ap_mode=ap_mode,
        max_rank=max_rank,
        desc="evaluating",
    )
    return _result(totals, protocol=protocol, ap_mode=ap_mode, metric=metric, rerank=False)


def _evaluate_reranked(
    q: np.ndarray | torch.Tensor,
    g: np.ndarray | torch.Tensor,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    *,
    metric: str,
    ap_mode: str,
    max_rank: int,
    device: torch.device,
    protocol: str,
    max_memory_bytes: int | None,
) -> dict:
    """Re-rank with k-reciprocal encoding, then evaluate the re-ranked distances."""
    final = _reranked_distances(q, g, metric=metric, device=device, max_memory_bytes=max_memory_bytes)
    return evaluate_distmat(
        final, q_pids, g_pids, q_camids, g_camids, max_rank=max_rank, ap_mode=ap_mode,
        protocol=protocol, metric=metric, rerank=True,
    )


def _reranked_distances(
    q: np.ndarray | torch.Tensor,
    g: np.ndarray | torch.Tensor,
    *,
    metric: str,
    device: torch.device,
    max_memory_bytes: int | None,
) -> np.ndarray:
    """The k-reciprocal re-ranked (num_query x num_gallery) distances of ``metric``, as float32 numpy."""
    from evaluation.rerank import check_rerank_memory

    itemsize = torch.finfo(compute_dtype(q, g)).bits // 8
    # Refuse before the three dense input matrices are built, counting them too.
    check_rerank_memory(
        q.shape[0], g.shape[0], input_itemsize=itemsize, max_memory_bytes=max_memory_bytes, device=device
    )
    q_g = distance_matrix(q, g, metric, device=device, as_numpy=False)
    q_q = distance_matrix(q, q, metric, device=device, as_numpy=False)
    g_g = distance_matrix(g, g, metric, device=device, as_numpy=False)
    try:
        final = re_ranking(q_g, q_q, g_g, max_memory_bytes=max_memory_bytes, device=device)
    except RerankError as err:
        raise EvaluationError(str(err)) from None
    del q_g, q_q, g_g
    return final


@dataclass(frozen=True)
class QueryRanking:
    """Each query's own outcome of a ranking: what the means of :func:`evaluate_features` average.

    Attributes:
        ap: (num_query,) float64 average precision; NaN for a query with no valid match (skipped).
        inp: (num_query,) float64 inverse negative penalty; NaN for a skipped query.
        first_match_rank: (num_query,) int64 1-based rank of the first match among the kept gallery
            items (the whole ranking, not only ``top_indices``); 0 for a skipped query.
        top_indices: (num_query, top_k) int64 gallery indices of the first kept items, best first,
            with the protocol's removed items (same identity and camera under the Market-1501 rule)
            left out; -1 where fewer than ``top_k`` items are kept.
        top_distances: (num_query, top_k) float64 distances of those items (NaN where the index is -1).
        protocol, ap_mode, metric, rerank: how the ranking was made.
    """

    ap: np.ndarray
    inp: np.ndarray
    first_match_rank: np.ndarray
    top_indices: np.ndarray
    top_distances: np.ndarray
    protocol: str
    ap_mode: str
    metric: str
    rerank: bool

    @property
    def valid(self) -> np.ndarray:
        """(num_query,) bool: the queries that count in mAP and CMC."""
        return self.first_match_rank > 0


def _top_kept(
    order: np.ndarray,
    dist: np.ndarray,
    q_pids: np.ndarray,
    g_pids: np.ndarray,
    q_camids: np.ndarray,
    g_camids: np.ndarray,
    same_camera_filter: bool,
    top_k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``top_k`` kept gallery indices of each row of a sorted chunk, and their distances."""
    num_rows, num_g = order.shape
    if same_camera_filter:
        # Only same-identity items are removed, so the first top_k kept ones lie within top_k plus the
        # largest number of removed items any query of the chunk has.
        removed_all = (g_pids[None, :] == q_pids[:, None]) & (g_camids[None, :] == q_camids[:, None])
        width = min(num_g, top_k + int(removed_all.sum(axis=1).max(initial=0)))
        del removed_all
        prefix = order[:, :width]
        removed = (g_pids[prefix] == q_pids[:, None]) & (g_camids[prefix] == q_camids[:, None])
        pick = np.argsort(removed, axis=1, kind="stable")[:, :top_k]  # kept items first, in rank order
        idx = np.take_along_axis(prefix, pick, axis=1).astype(np.int64)
        idx[np.take_along_axis(removed, pick, axis=1)] = -1
    else:
        idx = order[:, :top_k].astype(np.int64)
    if idx.shape[1] < top_k:  # a gallery smaller than top_k
        idx = np.concatenate([idx, np.full((num_rows, top_k - idx.shape[1]), -1, np.int64)], axis=1)
    distances = np.take_along_axis(dist, np.maximum(idx, 0), axis=1).astype(np.float64)
    distances[idx < 0] = np.nan
    return idx, distances


def rank_queries(
    q_feats: Any,
    g_feats: Any,
    q_pids: Any,
    g_pids: Any,
    q_camids: Any,
    g_camids: Any,
    *,
    top_k: int = 10,
    metric: str = "cosine",
    rerank: bool = False,
    ap_mode: str = "standard",
    protocol: str = "market1501",
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    rerank_max_memory_bytes: int | None = None,
) -> QueryRanking:
    """Per-query AP, first-match rank and top-k ranked list, ranked exactly as :func:`evaluate_features`.

    The same distances, the same stable (distance, gallery index) order, the same protocol rule and
    the same AP code as :func:`evaluate_features` with these arguments, so the mean of ``ap`` over the
    valid queries is its ``mAP`` (up to the order of the floating-point sum). Use it to find the
    queries a model gets wrong and to show their rank lists.

    Args:
        q_feats, g_feats, q_pids, g_pids, q_camids, g_camids, metric, rerank, ap_mode, protocol,
            device, chunk_size, rerank_max_memory_bytes: as in :func:`evaluate_features`.
        top_k: length of each query's ranked list in ``top_indices``.

    Returns:
        A :class:`QueryRanking`.
    """
    _check_metric(metric)
    same_cam = _check_common(protocol, ap_mode, 1, None)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise EvaluationError(f"top_k must be a positive integer, got {top_k!r}")
    q, g = _check_features(q_feats, g_feats)
    num_q, num_g = q.shape[0], g.shape[0]
    q_pids_np, g_pids_np, q_cam_np, g_cam_np = _label_arrays(q_pids, g_pids, q_camids, g_camids, num_q, num_g)
    dev = _resolve_device(device)

    step = chunk_size or rows_per_chunk(num_g, _RANK_BYTES_PER_CELL)
    if rerank:
        final = _reranked_distances(q, g, metric=metric, device=dev, max_memory_bytes=rerank_max_memory_bytes)

        def distances(start: int, stop: int) -> np.ndarray:
            return final[start:stop]
    else:
        device_distances = _query_distances(q, g, metric, dev)

        def distances(start: int, stop: int) -> np.ndarray:
            # The device computes the distances evaluate_features ranks; a stable sort of the same
            # values gives the same order on the host as torch.sort(stable=True) on the device.
            with torch.inference_mode():
                return device_distances(start, stop).cpu().numpy()

    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    first_match_rank = np.zeros(num_q, dtype=np.int64)
    top_indices = np.empty((num_q, top_k), dtype=np.int64)
    top_distances = np.empty((num_q, top_k), dtype=np.float64)
    for start in tqdm(range(0, num_q, step), desc="ranking queries", unit="chunk", disable=None, leave=False):
        stop = min(start + step, num_q)
        dist = distances(start, stop)
        order = _stable_order_numpy(dist)
        hits = _sorted_hits_numpy(dist, q_pids_np[start:stop], g_pids_np, order=order)
        chunk = _chunk_metrics(stop - start, *hits, q_cam_np[start:stop], g_cam_np, same_cam, ap_mode)
        rows = start + np.flatnonzero(chunk.valid)
        ap[rows], inp[rows], first_match_rank[rows] = chunk.ap, chunk.inp, chunk.first_rank + 1
        top_indices[start:stop], top_distances[start:stop] = _top_kept(
            order, dist, q_pids_np[start:stop], g_pids_np, q_cam_np[start:stop], g_cam_np, same_cam, top_k
        )
    return QueryRanking(
        ap=ap,
        inp=inp,
        first_match_rank=first_match_rank,
        top_indices=top_indices,
        top_distances=top_distances,
        protocol=protocol,
        ap_mode=ap_mode,
        metric=metric,
        rerank=rerank,
    )


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())  # population std (ddof=0): defined for one trial too


def vehicleid_protocol(
    feats: Any,
    pids: Any,
    camids: Any = None,
    *,
    trials: int = 10,
    seed: int = 0,
    test_size: int | None = None,
    metric: str = "cosine",
    rerank: bool = False,
    ap_mode: str = "standard",
    device: str | torch.device | None = None,
    max_rank: int = 50,
) -> dict:
    """The VehicleID protocol: random single-image galleries, repeated, reported as mean and std.

    Each trial ``t`` uses its own ``numpy.random.Generator`` seeded with ``(seed, t)``, so trials are
    reproducible one by one. In a trial:

    1. if ``test_size`` is given and the features hold more identities, ``test_size`` of them are drawn
       at random (without replacement) for this trial; fewer identities than ``test_size`` is an error;
    2. one image of each identity is drawn at random as its gallery image;
    3. every other image of those identities is a query (an identity with a single image is only a
       gallery item, a distractor for the others).

    The same-camera rule does not apply (VehicleID has no camera labels): ``camids`` is accepted for a
    uniform interface and ignored. The standard deviation is the population one (ddof=0) over trials.

    Returns:
        The dictionary of :func:`evaluate_distmat` with means over trials, plus ``mAP_std``,
        ``cmc_std`` (same keys as ``cmc``), ``mINP_std``, ``trials`` (per trial: ``trial``, ``mAP``,
        ``rank1``, ``rank5``, ``mINP``, ``num_valid_queries``, ``num_gallery``), ``num_trials``,
        ``seed`` and ``test_size`` (the number of identities per trial).
    """
    _check_common("vehicleid", ap_mode, max_rank, None)
    if not isinstance(trials, int) or trials < 1:
        raise EvaluationError(f"trials must be a positive integer, got {trials!r}")
    feats_arr = feats if isinstance(feats, torch.Tensor) else np.asarray(feats)
    if feats_arr.ndim != 2:
        raise EvaluationError(f"features must be a 2-D (n, d) array, got shape {tuple(feats_arr.shape)}")
    pids_np = _as_label_array("pids", pids, feats_arr.shape[0])
    if camids is not None:
        _as_label_array("camids", camids, feats_arr.shape[0])
    identities = np.unique(pids_np)
    if test_size is not None:
        if test_size < 2:
            raise EvaluationError(f"test_size must be at least 2 identities, got {test_size}")
        if identities.size < test_size:
            raise EvaluationError(
                f"test_size={test_size} identities were asked for but the features hold only "
                f"{identities.size}; pass a smaller --test-size or the matching test list"
            )
    num_ids = test_size if test_size is not None else int(identities.size)

    per_trial: list[dict] = []
    summaries: list[dict] = []
    for trial in tqdm(range(trials), desc="VehicleID trials", unit="trial", disable=None, leave=False):
        rng = np.random.default_rng([seed, trial])
        chosen_ids = identities
        if num_ids < identities.size:
            chosen_ids = np.sort(rng.choice(identities, size=num_ids, replace=False))
        candidates = np.flatnonzero(np.isin(pids_np, chosen_ids))
        shuffled = candidates[rng.permutation(candidates.size)]
        # The first occurrence of each identity in a random permutation is a uniform draw among its images.
        _, first = np.unique(pids_np[shuffled], return_index=True)
        gallery_idx = np.sort(shuffled[first])
        query_idx = np.setdiff1d(candidates, gallery_idx, assume_unique=True)
        if query_idx.size == 0:
            raise EvaluationError(
                "every identity has a single image, so the VehicleID protocol has no query; "
                "give the whole test set (several images per identity)"
            )
        zeros_q, zeros_g = np.zeros(query_idx.size, np.int64), np.zeros(gallery_idx.size, np.int64)
        result = evaluate_features(
            feats_arr[query_idx], feats_arr[gallery_idx], pids_np[query_idx], pids_np[gallery_idx],
            zeros_q, zeros_g, metric=metric, rerank=rerank, ap_mode=ap_mode, max_rank=max_rank,
            device=device, protocol="vehicleid",
        )
        summaries.append(result)
        per_trial.append({
            "trial": trial,
            "mAP": result["mAP"],
            "rank1": result["cmc"]["1"],
            "rank5": result["cmc"].get("5", result["cmc_curve"][-1]),
            "mINP": result["mINP"],
            "num_valid_queries": result["num_valid_queries"],
            "num_gallery": int(gallery_idx.size),
        })

    mAP, mAP_std = _mean_std([r["mAP"] for r in summaries])
    mINP, mINP_std = _mean_std([r["mINP"] for r in summaries])
    keys = list(summaries[0]["cmc"])
    cmc_stats = {k: _mean_std([r["cmc"][k] for r in summaries]) for k in keys}
    curve = np.mean([r["cmc_curve"] for r in summaries], axis=0)
    return {
        "mAP": mAP,
        "cmc": {k: m for k, (m, _) in cmc_stats.items()},
        "mINP": mINP,
        "num_valid_queries": round(float(np.mean([r["num_valid_queries"] for r in summaries]))),
        "num_skipped_queries": round(float(np.mean([r["num_skipped_queries"] for r in summaries]))),
        "protocol": "vehicleid",
        "ap_mode": ap_mode,
        "metric": metric,
        "rerank": rerank,
        "cmc_curve": [float(c) for c in curve],
        "mAP_std": mAP_std,
        "cmc_std": {k: s for k, (_, s) in cmc_stats.items()},
        "mINP_std": mINP_std,
        "trials": per_trial,
        "num_trials": trials,
        "seed": seed,
        "test_size": num_ids,
    }


def format_table(result: dict) -> str:
    """A readable multi-line summary of an evaluation result (percentages), for terminals and logs."""
    has_std = "mAP_std" in result

    def pct(key: str, value: float, std: float | None) -> str:
        text = f"{100.0 * value:6.2f}%"
        return f"{key:<10}{text}" + (f"  ± {100.0 * std:.2f}%" if std is not None else "")

    rule = (
        "same-identity same-camera gallery items removed"
        if PROTOCOLS.get(result["protocol"], False)
        else "no camera rule"
    )
    lines = [
        f"protocol  {result['protocol']} ({rule})",
        f"metric    {result['metric']}, re-ranking {'on' if result['rerank'] else 'off'}, "
        f"AP {result['ap_mode']}",
    ]
    if has_std:
        lines.append(
            f"trials    {result['num_trials']} (seed {result['seed']}, {result['test_size']} identities each)"
        )
    lines.append(
        f"queries   {result['num_valid_queries']} valid, {result['num_skipped_queries']} skipped"
    )
    lines.append(pct("mAP", result["mAP"], result.get("mAP_std")))
    lines.append(pct("mINP", result["mINP"], result.get("mINP_std")))
    for rank, value in result["cmc"].items():
        std = result["cmc_std"][rank] if has_std else None
        lines.append(pct(f"rank-{rank}", value, std))
    return "\n".join(lines)
