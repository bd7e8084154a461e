"""k-reciprocal re-ranking against a straightforward loop implementation of the published algorithm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import evaluation.rerank as rerank_module
from evaluation.distance import distance_matrix
from evaluation.metrics import evaluate_distmat, evaluate_features
from evaluation.rerank import (
    RerankError,
    RerankMemoryError,
    _stable_topk,
    available_memory_bytes,
    check_rerank_memory,
    estimate_rerank_bytes,
    re_ranking,
)


def loop_re_ranking(q_g, q_q, g_g, k1=20, k2=6, lam=0.3):
    """Zhong et al. (CVPR 2017), item by item with Python sets, following the reference's conventions:
    the assembled distances are squared, cast to float32 and each item's row scaled to a maximum of 1
    (the reference scales the columns and transposes), and round(k1/2) rounds half to even."""
    nq, ng = q_g.shape
    n = nq + ng
    full = np.block([[q_q, q_g], [q_g.T, g_g]])
    squared = np.square(full).astype(np.float32)
    dist = np.empty((n, n), dtype=np.float32)
    for i in range(n):
        column = squared[:, i]
        dist[i] = column / column.max()
    ranking = [sorted(range(n), key=lambda j, i=i: (dist[i, j], j)) for i in range(n)]

    def nearest(i, k):
        return ranking[i][:k]

    def reciprocal(i, k):
        return [j for j in nearest(i, k + 1) if i in nearest(j, k + 1)]

    half = round(k1 / 2)
    v = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        own = reciprocal(i, k1)
        expanded = set(own)
        for candidate in own:
            theirs = reciprocal(candidate, half)
            if len(set(theirs) & set(own)) > 2.0 / 3.0 * len(theirs):
                expanded.update(theirs)
        members = sorted(expanded)
        weights = np.exp(-dist[i, members])
        v[i, members] = weights / weights.sum()
    if k2 > 1:
        v = np.stack([v[nearest(i, k2)].mean(axis=0) for i in range(n)]).astype(np.float32)
    out = np.empty((nq, ng), dtype=np.float32)
    for i in range(nq):
        for j in range(ng):
            shared = np.minimum(v[i], v[nq + j]).sum()
            jaccard = 1.0 - shared / (2.0 - shared)
            out[i, j] = (1.0 - lam) * jaccard + lam * dist[i, nq + j]
    return out


def clustered_features(seed: int, n: int, dim: int = 8, num_ids: int = 10, noise: float = 0.7):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, num_ids, n)
    centers = rng.normal(size=(num_ids, dim))
    return centers[ids] + noise * rng.normal(size=(n, dim)), ids


def split_distances(x: np.ndarray, nq: int, metric: str = "euclidean"):
    d = distance_matrix(x, x, metric, device="cpu")
    return d[:nq, nq:], d[:nq, :nq], d[nq:, nq:]


@pytest.mark.parametrize(
    ("seed", "nq", "ng", "k1", "k2", "metric"),
    [
        (0, 12, 40, 20, 6, "euclidean"),
        (1, 20, 70, 20, 6, "cosine"),
        (2, 6, 9, 20, 6, "euclidean"),  # fewer items than k1 + 1
        (3, 15, 45, 5, 1, "sqeuclidean"),  # round(2.5) = 2; k2 = 1 skips the query expansion
        (4, 15, 45, 7, 3, "euclidean"),
    ],
)
def test_equals_loop_implementation(seed, nq, ng, k1, k2, metric):
    x, _ = clustered_features(seed, nq + ng)
    q_g, q_q, g_g = split_distances(x, nq, metric)
    expected = loop_re_ranking(q_g, q_q, g_g, k1=k1, k2=k2)
    got = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2)
    assert got.shape == (nq, ng) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)
    # float32 inputs and torch inputs give the same result.
    got32 = re_ranking(*(torch.from_numpy(m.astype(np.float32)) for m in (q_g, q_q, g_g)), k1=k1, k2=k2)
    np.testing.assert_allclose(got32, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_every_device_equals_loop_implementation(device):
    x, _ = clustered_features(12, 90, dim=12)
    q_g, q_q, g_g = split_distances(x, 25, "cosine")
    expected = loop_re_ranking(q_g, q_q, g_g)
    got = re_ranking(q_g, q_q, g_g, device=device)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_lambda_one_is_the_normalised_squared_distance():
    x, _ = clustered_features(7, 30)
    q_g, q_q, g_g = split_distances(x, 10)
    got = re_ranking(q_g, q_q, g_g, lambda_value=1.0)
    full = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    np.testing.assert_allclose(got, (full / full.max(axis=0)).T[:10, 10:], rtol=1e-6)


def test_rerank_improves_clustered_retrieval_and_feeds_the_evaluator():
    # Re-ranking exploits the gallery's neighbourhood structure: on clustered data mAP rises.
    x, ids = clustered_features(8, 160, dim=16, num_ids=12, noise=1.2)
    cams = np.arange(160) % 3
    nq = 40
    plain = evaluate_features(x[:nq], x[nq:], ids[:nq], ids[nq:], cams[:nq], cams[nq:], device="cpu")
    reranked = evaluate_features(x[:nq], x[nq:], ids[:nq], ids[nq:], cams[:nq], cams[nq:], rerank=True,
                                 device="cpu")
    assert reranked["rerank"] is True and plain["rerank"] is False
    assert reranked["mAP"] > plain["mAP"]
    q_g, q_q, g_g = split_distances(x, nq, "cosine")
    direct = evaluate_distmat(re_ranking(q_g, q_q, g_g), ids[:nq], ids[nq:], cams[:nq], cams[nq:])
    assert reranked["mAP"] == pytest.approx(direct["mAP"], abs=1e-6)


def test_memory_guard_refuses_with_sizes_and_advice():
    x, _ = clustered_features(9, 40)
    q_g, q_q, g_g = split_distances(x, 10)
    with pytest.raises(RerankMemoryError) as info:
        re_ranking(q_g, q_q, g_g, max_memory_bytes=1024)
    message = str(info.value)
    assert "10 queries x 30 gallery items" in message
    assert "GiB" in message and "without re-ranking" in message
    assert isinstance(info.value, MemoryError)


def test_memory_guard_default_limit_refuses_msmt17_size(monkeypatch):
    # MSMT17: 11,659 queries x 82,161 gallery items -> ~35 GiB of float32 input distances alone.
    monkeypatch.setattr(rerank_module, "available_memory_bytes", lambda device=None: 16 * 1024**3)
    assert estimate_rerank_bytes(11659, 82161, input_itemsize=4) > 35 * 1024**3
    with pytest.raises(RerankMemoryError, match=r"8\.00 GiB"):
        check_rerank_memory(11659, 82161, input_itemsize=4)
    # Market-1501 fits in the same 8 GiB.
    assert check_rerank_memory(3368, 15913, input_itemsize=4) < 8 * 1024**3


def test_evaluate_features_refuses_before_building_the_matrices(monkeypatch):
    x, ids = clustered_features(10, 50)

    def fail(*args, **kwargs):
        raise AssertionError("distance matrices must not be built for a refused re-ranking")

    monkeypatch.setattr("evaluation.metrics.distance_matrix", fail)
    with pytest.raises(RerankMemoryError):
        evaluate_features(x[:10], x[10:], ids[:10], ids[10:], np.zeros(10), np.ones(40), rerank=True,
                          device="cpu", rerank_max_memory_bytes=4096)


def test_available_memory_is_positive():
    assert available_memory_bytes() > 0


def test_bad_inputs():
    x, _ = clustered_features(11, 20)
    q_g, q_q, g_g = split_distances(x, 5)
    with pytest.raises(RerankError, match="shapes"):
        re_ranking(q_g, q_q[:4, :4], g_g)
    bad = q_g.copy()
    bad[0, 0] = np.nan
    with pytest.raises(RerankError, match="NaN"):
        re_ranking(bad, q_q, g_g)
    with pytest.raises(RerankError, match="lambda"):
        re_ranking(q_g, q_q, g_g, lambda_value=2.0)


def test_stable_topk_breaks_ties_by_index():
    rows = torch.tensor([[0.5, 0.1, 0.5, 0.1, 0.9], [0.3, 0.2, 0.1, 0.4, 0.0]])
    assert _stable_topk(rows, 3).tolist() == [[1, 3, 0], [4, 2, 1]]
