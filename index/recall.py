"""Recall@k of an approximate index against exact search, the number every approximate spec reports.

recall@k = |approximate top-k  ∩  exact top-k| / |exact top-k|, averaged over queries. When the
reference is given as vectors, an approximate hit whose exact score ties the k-th exact score also
counts, so ties at the boundary do not read as misses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from index.base import PAD_SCORE, SearchFilter, VectorIndex, as_ids, as_unit_vectors

_CHUNK = 65_536
_TIE_EPS = 1e-6


def exact_top_k(
    vectors: np.ndarray, queries: np.ndarray, k: int, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force cosine top-k (scores, ids) of ``queries`` against ``vectors``, chunked.

    Args:
        vectors: ``(n, d)`` gallery vectors (renormalised here).
        queries: ``(nq, d)`` query vectors (renormalised here).
        k: neighbours per query.
        ids: ``(n,)`` ids of the vectors; row numbers when None.
    """
    dim = np.asarray(vectors).shape[1]
    x = as_unit_vectors(vectors, dim)
    q = as_unit_vectors(queries, dim, what="queries")
    ids = np.arange(len(x), dtype=np.int64) if ids is None else as_ids(ids)
    best_s = np.full((len(q), 0), PAD_SCORE, dtype=np.float32)
    best_i = np.full((len(q), 0), -1, dtype=np.int64)
    for start in range(0, len(x), _CHUNK):
        s = q @ x[start : start + _CHUNK].T
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(ids[start : start + _CHUNK], s.shape)], axis=1)
        keep = min(k, cand_s.shape[1])
        part = np.argpartition(-cand_s, keep - 1, axis=1)[:, :keep]
        best_s, best_i = np.take_along_axis(cand_s, part, 1), np.take_along_axis(cand_i, part, 1)
    order = np.lexsort((best_i, -best_s), axis=1)
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def measure_recall(
    index: VectorIndex,
    reference: VectorIndex | np.ndarray | tuple[np.ndarray, np.ndarray],
    queries: Any,
    k: int,
    *,
    filter: SearchFilter | None = None,
) -> float:
    """Mean recall@k of ``index`` against exact search.

    Args:
        index: the index under test.
        reference: an exact index (e.g. ``flat``) holding the same items, or the items' vectors:
            an ``(n, d)`` array whose ids are the row numbers, or an ``(ids, vectors)`` pair.
        queries: ``(nq, d)`` probe queries.
        k: cut-off.
        filter: applied to both searches (index references only).

    Returns:
        Recall in [0, 1]; 1.0 when no query has any true neighbour.
    """
    got = index.search(queries, k, filter=filter).ids
    if isinstance(reference, tuple | np.ndarray):
        ids, vectors = (None, reference) if isinstance(reference, np.ndarray) else reference
        if filter is not None:
            raise ValueError("filters are supported with an index reference only")
        true_s, true_i = exact_top_k(vectors, queries, k, ids)
        x = as_unit_vectors(vectors, np.asarray(vectors).shape[1])
        id_arr = np.arange(len(x), dtype=np.int64) if ids is None else as_ids(ids)
        order = np.argsort(id_arr)
        q = as_unit_vectors(queries, x.shape[1], what="queries")
        hits = total = 0
        for row in range(len(q)):
            truth = true_i[row][true_i[row] >= 0]
            if len(truth) == 0:
                continue
            found = got[row][got[row] >= 0]
            pos = order[np.searchsorted(id_arr, found, sorter=order)] if len(found) else found
            exact_scores = x[pos] @ q[row] if len(found) else np.zeros(0)
            threshold = true_s[row][len(truth) - 1] - _TIE_EPS
            hits += min(len(truth), int((exact_scores >= threshold).sum()))
            total += len(truth)
        return 1.0 if total == 0 else hits / total
    truth_ids = reference.search(queries, k, filter=filter).ids
    hits = total = 0
    for row in range(len(truth_ids)):
        truth = truth_ids[row][truth_ids[row] >= 0]
        hits += len(np.intersect1d(truth, got[row][got[row] >= 0]))
        total += len(truth)
    return 1.0 if total == 0 else hits / total
