"""k-reciprocal re-ranking (Zhong, Zheng, Cao, Li: "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), numerically equal to the authors' reference algorithm, with a memory guard.

The reference (``re_ranking`` in github.com/zhunzhong07/person-re-ranking, python-version, in the form
that takes distance matrices) works on the (n x n) matrix of all query and gallery items, n = m_q + m_g:

1. ``original = (D ** 2 cast to float32)``, each column divided by its maximum, then transposed; so
   row i of ``original`` is column i of the assembled [[q_q, q_g], [q_g^T, g_g]] matrix, squared and
   scaled to a maximum of 1. The input is squared, as in the reference, whatever the metric.
2. ``R(i, k)``: the k nearest items of i in that row (i itself first). The k-reciprocal set of i is
   ``{j in R(i, k1+1) : i in R(j, k1+1)}``, kept in rank order.
3. Expansion: for each j in that set, if more than 2/3 of j's own reciprocal set with
   k = round(k1/2) (round half to even, as ``np.around``) lies in i's set, j's set is added.
4. ``V[i, j] = exp(-original[i, j])`` over the expanded set, normalised to sum 1.
5. Local query expansion: ``V[i] <- mean of V over R(i, k2)``.
6. Jaccard distance of query i to gallery item j: ``1 - s / (2 - s)`` with ``s = sum_k min(V[i,k], V[j,k])``.
7. Final distance: ``(1 - lambda) * jaccard + lambda * original`` on the query-gallery block.

Where the reference loops over every item in Python and keeps four dense (n x n) float32 matrices,
this implementation is vectorised in torch (the same code on the CPU and on a GPU) and keeps ``V``
sparse (at most (k1+1)(round(k1/2)+2) entries per row before expansion by k2), so besides its inputs
it needs the (m_q x m_g) output, a bounded block of rows and the sparse vectors. Ties in a row are
broken by item index (the reference's unstable ``argsort`` leaves them unspecified); on tie-free inputs
the neighbour sets are identical and the distances equal to float32 rounding.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from evaluation.distance import DEFAULT_CHUNK_BYTES, resolve_device

logger = logging.getLogger(__name__)

#: The paper's parameters (k1, k2, lambda), the defaults of every function here.
K1, K2, LAMBDA = 20, 6, 0.3
#: Fraction of the available memory (RAM, or free GPU memory) re-ranking may plan to use by default.
DEFAULT_MEMORY_FRACTION = 0.5

_GIB = 1024**3
# Entries of (query, gallery item) pairs produced at once by the sparse Jaccard join.
_JOIN_BATCH = 4_000_000


class RerankError(ValueError):
    """Re-ranking inputs that do not fit together (shapes, NaN, parameters); the message says what."""


class RerankMemoryError(MemoryError):
    """The re-ranking problem would not fit in the memory limit; the message gives sizes and what to do."""


def available_memory_bytes(device: torch.device | None = None) -> int:
    """Free memory of ``device``: free GPU memory for CUDA, else the kernel's MemAvailable (or free pages)."""
    if device is not None and device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 * _GIB  # no way to ask: assume a small machine rather than an unbounded one


def _half_k(k1: int) -> int:
    # The reference uses int(np.around(k1 / 2.)): round half to even, which Python's round() also does.
    return round(k1 / 2.0)


def _expansion_width(k1: int) -> int:
    """Upper bound of the expanded k-reciprocal set of one item (before the k2 query expansion)."""
    return (k1 + 1) * (_half_k(k1) + 2)


def estimate_rerank_bytes(
    num_query: int, num_gallery: int, *, k1: int = K1, k2: int = K2, input_itemsize: int = 0
) -> int:
    """Upper bound of the memory :func:`re_ranking` uses, in bytes.

    Args:
        num_query, num_gallery: sizes of the problem, n = num_query + num_gallery.
        k1, k2: re-ranking parameters (they bound the sparse vectors).
        input_itemsize: bytes per element of the three dense input distance matrices when they still
            have to be built (num_query^2 + num_query x num_gallery + num_gallery^2 elements, close to
            n^2); 0 when they already exist.

    Returns:
        inputs + output and its ranking (2 x num_query x num_gallery x 4) + the
        sparse vectors (worst case n x k2 x (k1+1)(round(k1/2)+2) entries of 12 bytes, twice, while
        they are rebuilt) + the neighbour lists + one block of rows.
    """
    n = num_query + num_gallery
    width = _expansion_width(k1)
    sparse = 2 * 12 * n * min(n, width) + 2 * 12 * n * min(n, max(k2, 1) * width)
    neighbours = 8 * n * (max(k1 + 1, k2) + _half_k(k1) + 1)
    inputs = num_query * num_query + num_query * num_gallery + num_gallery * num_gallery
    dense = input_itemsize * inputs + 2 * 4 * num_query * num_gallery
    return int(dense + sparse + neighbours + DEFAULT_CHUNK_BYTES)


def check_rerank_memory(
    num_query: int,
    num_gallery: int,
    *,
    k1: int = K1,
    k2: int = K2,
    input_itemsize: int = 0,
    extra_bytes: int = 0,
    max_memory_bytes: int | None = None,
    device: torch.device | None = None,
) -> int:
    """Raise :class:`RerankMemoryError` when the re-ranking estimate exceeds the limit; return the estimate.

    ``extra_bytes`` adds what the caller will allocate besides (inputs copied to the device). The
    default limit is :data:`DEFAULT_MEMORY_FRACTION` of :func:`available_memory_bytes`.
    """
    need = extra_bytes + estimate_rerank_bytes(
        num_query, num_gallery, k1=k1, k2=k2, input_itemsize=input_itemsize
    )
    if max_memory_bytes is None:
        avail = available_memory_bytes(device)
        limit = int(DEFAULT_MEMORY_FRACTION * avail)
        where = f"{DEFAULT_MEMORY_FRACTION:.0%} of the {avail / _GIB:.1f} GiB available"
    else:
        limit = int(max_memory_bytes)
        where = "the limit given"
    if need > limit:
        n = num_query + num_gallery
        raise RerankMemoryError(
            f"k-reciprocal re-ranking of {num_query} queries x {num_gallery} gallery items needs about "
            f"{need / _GIB:.2f} GiB (dense distances over all {n} items: {n}^2 entries"
            f"{f' of {input_itemsize} bytes' if input_itemsize else ''}, plus the output) but "
            f"{where} is {limit / _GIB:.2f} GiB on {device.type if device is not None else 'cpu'}. "
            "Evaluate without re-ranking, use a machine or GPU with more memory, re-rank a subset of "
            "the gallery, or raise the limit (max_memory_bytes) if you know it fits."
        )
    logger.debug("re-ranking memory estimate %.2f GiB (limit %.2f GiB)", need / _GIB, limit / _GIB)
    return need


def _stable_topk(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest entries of each row in (value, index) order, ties broken by index."""
    values, idx = torch.topk(rows, k, dim=1, largest=False, sorted=True)
    # topk does not order ties; rows where a tie could matter are sorted again, stably.
    bound = values[:, -1:]
    tied = ((rows <= bound).sum(dim=1) != k) | (values[:, 1:] == values[:, :-1]).any(dim=1)
    if bool(tied.any()):
        idx[tied] = torch.sort(rows[tied], dim=1, stable=True).indices[:, :k]
    return idx


class _Problem:
    """The three input matrices seen as the rows of the reference's normalised ``original_dist``."""

    def __init__(self, q_g: torch.Tensor, q_q: torch.Tensor, g_g: torch.Tensor):
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.num_query, self.num_gallery = q_g.shape
        self.n = self.num_query + self.num_gallery
        self.col_max = torch.empty(self.n, dtype=torch.float32, device=q_g.device)

    def raw_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the transposed, squared assembled matrix, before normalisation."""
        nq = self.num_query
        parts = []
        if start < nq:  # query items: column i of [[q_q], [q_g^T]]
            a, b = start, min(stop, nq)
            parts.append(torch.cat([self.q_q[:, a:b].T, self.q_g[a:b, :]], dim=1))
        if stop > nq:  # gallery items: column i of [[q_g], [g_g]]
            a, b = max(start, nq) - nq, stop - nq
            parts.append(torch.cat([self.q_g[:, a:b].T, self.g_g[:, a:b].T], dim=1))
        block = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        # Squared in the input dtype, then float32, as the reference does.
        return torch.square(block).to(torch.float32)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the normalised ``original_dist`` (each divided by its maximum)."""
        return self.raw_rows(start, stop) / self.col_max[start:stop, None]


def _reciprocal_mask(ranks: torch.Tensor) -> torch.Tensor:
    """mask[i, a] = (i is among the neighbours of ranks[i, a]) for a (n x k) neighbour table."""
    n, _k = ranks.shape
    out = torch.empty_like(ranks, dtype=torch.bool)
    step = max(1, (64 * 1024**2) // max(1, 8 * _k * _k))
    for start in range(0, n, step):
        stop = min(start + step, n)
        back = ranks[ranks[start:stop]]  # (b, k, k): neighbours of each neighbour
        me = torch.arange(start, stop, device=ranks.device)[:, None, None]
        out[start:stop] = (back == me).any(dim=2)
    return out


def _row_blocks(n: int, bytes_per_row: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``(start, stop)`` row ranges whose working set stays near DEFAULT_CHUNK_BYTES."""
    step = max(1, DEFAULT_CHUNK_BYTES // max(1, bytes_per_row))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _validate(q_g: torch.Tensor, q_q: torch.Tensor, g_g: torch.Tensor, k1: int, k2: int, lam: float) -> None:
    if q_g.ndim != 2 or q_q.ndim != 2 or g_g.ndim != 2:
        raise RerankError("q_g_dist, q_q_dist and g_g_dist must all be 2-D distance matrices")
    nq, ng = q_g.shape
    if tuple(q_q.shape) != (nq, nq) or tuple(g_g.shape) != (ng, ng):
        raise RerankError(
            f"shapes do not fit: q_g_dist {tuple(q_g.shape)} needs q_q_dist ({nq}, {nq}) and g_g_dist "
            f"({ng}, {ng}), got {tuple(q_q.shape)} and {tuple(g_g.shape)}"
        )
    if nq == 0 or ng == 0:
        raise RerankError(f"nothing to re-rank: {nq} queries and {ng} gallery items")
    for name, m in (("q_g_dist", q_g), ("q_q_dist", q_q), ("g_g_dist", g_g)):
        if not m.is_floating_point():
            raise RerankError(f"{name} must be floating point, got {m.dtype}")
        if not bool(torch.isfinite(m).all()):
            raise RerankError(f"{name} contains NaN or infinite distances")
    if k1 < 1 or k2 < 1:
        raise RerankError(f"k1 and k2 must be at least 1, got k1={k1}, k2={k2}")
    if not 0.0 <= lam <= 1.0:
        raise RerankError(f"lambda_value must lie in [0, 1], got {lam}")


def re_ranking_tensor(
    q_g_dist: np.ndarray | torch.Tensor,
    q_q_dist: np.ndarray | torch.Tensor,
    g_g_dist: np.ndarray | torch.Tensor,
    *,
    k1: int = K1,
    k2: int = K2,
    lambda_value: float = LAMBDA,
    max_memory_bytes: int | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """:func:`re_ranking`, returning a float32 tensor on ``device`` (no copy back to the host)."""
    from_input = device is None and isinstance(q_g_dist, torch.Tensor)
    dev = q_g_dist.device if from_input else resolve_device(device)
    mats = [
        (m if isinstance(m, torch.Tensor) else torch.from_numpy(np.asarray(m))).detach()
        for m in (q_g_dist, q_q_dist, g_g_dist)
    ]
    _validate(*mats, k1, k2, lambda_value)
    nq, ng = mats[0].shape
    # Inputs that live elsewhere are copied to the device: refuse before doing so.
    copies = sum(m.numel() * m.element_size() for m in mats if m.device != dev)
    check_rerank_memory(
        nq, ng, k1=k1, k2=k2, extra_bytes=copies, max_memory_bytes=max_memory_bytes, device=dev
    )
    q_g, q_q, g_g = (m.to(dev) for m in mats)
    with torch.inference_mode():
        return _re_rank(_Problem(q_g, q_q, g_g), k1=k1, k2=k2, lam=lambda_value)


def re_ranking(
    q_g_dist: np.ndarray | torch.Tensor,
    q_q_dist: np.ndarray | torch.Tensor,
    g_g_dist: np.ndarray | torch.Tensor,
    *,
    k1: int = K1,
    k2: int = K2,
    lambda_value: float = LAMBDA,
    max_memory_bytes: int | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """k-reciprocal re-ranking of query-gallery distances (Zhong et al., CVPR 2017).

    Args:
        q_g_dist: (m_q, m_g) query-gallery distances of the chosen metric.
        q_q_dist: (m_q, m_q) query-query distances (zero diagonal, as a distance gives).
        g_g_dist: (m_g, m_g) gallery-gallery distances.
        k1, k2, lambda_value: the paper's parameters (defaults 20, 6, 0.3).
        max_memory_bytes: refuse (RerankMemoryError) when the estimate exceeds this; default half of
            the available memory of the device.
        device: where to compute (default: the inputs' device for tensors, else CUDA when available,
            else the CPU).

    Returns:
        (m_q, m_g) float32 re-ranked distances, as numpy.

    Raises:
        RerankMemoryError: the problem would not fit (the message says how large it is and what to do).
        RerankError: inconsistent shapes, NaN distances or bad parameters.
    """
    out = re_ranking_tensor(
        q_g_dist, q_q_dist, g_g_dist, k1=k1, k2=k2, lambda_value=lambda_value,
        max_memory_bytes=max_memory_bytes, device=device,
    )
    return out.cpu().numpy()


def _re_rank(p: _Problem, *, k1: int, k2: int, lam: float) -> torch.Tensor:
    n, nq, ng = p.n, p.num_query, p.num_gallery
    dev = p.q_g.device
    k_fwd = min(k1 + 1, n)
    k_half = min(_half_k(k1) + 1, n)
    k_qe = min(k2, n)
    k_all = max(k_fwd, k_half, k_qe)
    row_bytes = n * (4 * p.q_g.element_size() + 8)

    # Pass 1: every row's maximum (the normalisation) and its nearest neighbours.
    ranks = torch.empty((n, k_all), dtype=torch.int64, device=dev)
    for start, stop in _row_blocks(n, row_bytes):
        raw = p.raw_rows(start, stop)
        p.col_max[start:stop] = raw.max(dim=1).values
        if bool((p.col_max[start:stop] == 0).any()):
            raise RerankError(
                "an item has distance 0 to every other item; the distances cannot be normalised"
            )
        ranks[start:stop] = _stable_topk(raw / p.col_max[start:stop, None], k_all)
    fwd = ranks[:, :k_fwd]
    half = ranks[:, :k_half]
    fwd_recip = _reciprocal_mask(fwd)  # j = fwd[i, a] is k-reciprocal to i
    half_recip = _reciprocal_mask(half)

    # Pass 2: expanded reciprocal sets and their weights, as padded (n x width) tables.
    width = k_fwd + k_fwd * k_half
    v_idx = torch.full((n, width), n, dtype=torch.int64, device=dev)  # n marks an empty slot
    v_val = torch.zeros((n, width), dtype=torch.float32, device=dev)
    for start, stop in _row_blocks(n, row_bytes):
        cand, cand_ok = fwd[start:stop], fwd_recip[start:stop]  # (b, K)
        sub, sub_ok = half[cand], half_recip[cand]  # (b, K, H): each candidate's own reciprocal set
        in_set = ((sub[..., None] == cand[:, None, None, :]) & cand_ok[:, None, None, :]).any(dim=3)
        overlap = (in_set & sub_ok).sum(dim=2).to(torch.float64)
        size = sub_ok.sum(dim=2).to(torch.float64)
        accept = cand_ok & (overlap > (2.0 / 3.0) * size)  # the reference's float comparison
        entries = torch.cat(
            [
                torch.where(cand_ok, cand, n),
                torch.where(accept[..., None] & sub_ok, sub, n).flatten(1),
            ],
            dim=1,
        )
        entries = torch.sort(entries, dim=1).values
        dup = torch.zeros_like(entries, dtype=torch.bool)
        dup[:, 1:] = entries[:, 1:] == entries[:, :-1]
        entries[dup] = n
        entries = torch.sort(entries, dim=1).values  # unique indices first, empty slots last
        valid = entries < n
        dist = p.rows(start, stop).gather(1, entries.clamp(max=n - 1))
        weight = torch.where(valid, torch.exp(-dist), torch.zeros_like(dist))
        v_idx[start:stop] = entries
        v_val[start:stop] = weight / weight.sum(dim=1, keepdim=True)

    # Local query expansion: V[i] <- mean of V over i's k2 nearest items, kept sparse (COO).
    rows_l, cols_l, vals_l = [], [], []
    qe_row_bytes = k_qe * width * 32
    for start, stop in _row_blocks(n, qe_row_bytes):
        # k2 = 1 leaves V as it is in the reference (not V of the nearest item, which may differ on ties).
        nbrs = ranks[start:stop, :k_qe] if k_qe > 1 else torch.arange(start, stop, device=dev)[:, None]
        idx = v_idx[nbrs].flatten(1)  # (b, k2 * width)
        val = v_val[nbrs].flatten(1)
        row = torch.arange(start, stop, device=dev)[:, None].expand_as(idx)
        keep = idx < n
        key = (row[keep] * n + idx[keep])
        key, order = torch.sort(key)
        uniq, inverse = torch.unique_consecutive(key, return_inverse=True)
        summed = torch.zeros(uniq.shape[0], dtype=torch.float32, device=dev)
        summed.index_add_(0, inverse, val[keep][order])
        rows_l.append(uniq // n)
        cols_l.append(uniq % n)
        vals_l.append(summed / k_qe)
    del v_idx, v_val
    qe_rows, qe_cols, qe_vals = torch.cat(rows_l), torch.cat(cols_l), torch.cat(vals_l)

    # Gallery items' vectors by column (an inverted index), for the Jaccard join.
    g_mask = qe_rows >= nq
    g_cols, g_order = torch.sort(qe_cols[g_mask], stable=True)
    g_rows = (qe_rows[g_mask] - nq)[g_order]
    g_vals = qe_vals[g_mask][g_order]
    col_ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    col_ptr[1:] = torch.cumsum(torch.bincount(g_cols, minlength=n), dim=0)
    col_count = col_ptr[1:] - col_ptr[:-1]

    q_mask = qe_rows < nq
    q_rows, q_cols, q_vals = qe_rows[q_mask], qe_cols[q_mask], qe_vals[q_mask]
    q_ptr = torch.zeros(nq + 1, dtype=torch.int64, device=dev)
    q_ptr[1:] = torch.cumsum(torch.bincount(q_rows, minlength=nq), dim=0)
    pairs = col_count[q_cols]  # join size contributed by each query entry
    pairs_cum = torch.zeros(pairs.shape[0] + 1, dtype=torch.int64, device=dev)
    pairs_cum[1:] = torch.cumsum(pairs, dim=0)

    out = torch.empty((nq, ng), dtype=torch.float32, device=dev)
    max_rows = max(1, DEFAULT_CHUNK_BYTES // (16 * ng))
    # Pairs joined up to the end of each query: blocks of queries are cut where they reach _JOIN_BATCH.
    pairs_upto = pairs_cum[q_ptr].cpu().numpy()
    q_ptr_host = q_ptr.cpu().numpy()
    start = 0
    while start < nq:
        stop = int(np.searchsorted(pairs_upto, pairs_upto[start] + _JOIN_BATCH, side="right")) - 1
        stop = min(max(stop, start + 1), start + max_rows, nq)
        e0, e1 = int(q_ptr_host[start]), int(q_ptr_host[stop])
        counts = pairs[e0:e1]
        total = int(counts.sum())
        shared = torch.zeros((stop - start, ng), dtype=torch.float32, device=dev)
        if total:
            rep = torch.repeat_interleave(torch.arange(e0, e1, device=dev), counts)
            offsets = torch.arange(total, device=dev) - torch.repeat_interleave(
                pairs_cum[e0:e1] - pairs_cum[e0], counts
            )
            pos = col_ptr[q_cols[rep]] + offsets
            mins = torch.minimum(q_vals[rep], g_vals[pos])
            flat = (q_rows[rep] - start) * ng + g_rows[pos]
            shared.view(-1).index_add_(0, flat, mins)
        jaccard = 1.0 - shared / (2.0 - shared)
        original = p.rows(start, stop)[:, nq:]
        out[start:stop] = jaccard * (1.0 - lam) + original * lam
        start = stop
    return out


def rerank_candidates(query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Re-ranked distances of one query's short list, as a search re-ranks its top candidates.

    The candidates are the whole gallery of this small problem, so ``k1`` is capped at their number
    minus one and ``k2`` at ``k1``; distances are cosine (``1 - similarity`` of unit vectors), computed
    on the CPU, where a few dozen candidates cost less than a trip to a GPU.

    Args:
        query: ``(d,)`` unit vector.
        candidates: ``(n, d)`` unit vectors.

    Returns:
        ``(n,)`` float32 re-ranked distances, lower first.
    """
    q = query[None].astype(np.float32)
    g = np.asarray(candidates, dtype=np.float32)
    k1 = max(1, min(K1, len(g) - 1))
    q_q = np.zeros((1, 1), np.float32)  # the query's distance to itself
    return re_ranking(1.0 - q @ g.T, q_q, 1.0 - g @ g.T, k1=k1, k2=max(1, min(K2, k1)), device="cpu")[0]
