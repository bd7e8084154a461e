"""mAP / CMC / mINP: hand-computed cases for every rule, an independent per-query reference, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evaluation.distance import distance_matrix
from evaluation.metrics import (
    EvaluationError,
    _sorted_hits_numpy,
    _sorted_hits_torch,
    evaluate_distmat,
    evaluate_features,
)

# --------------------------------------------------------------------------------------------------
# An independent, per-query implementation of the torchreid/fast-reid algorithm (stable sort so that
# ties follow the gallery order), and of the Market-1501 devkit's trapezoid AP (compute_AP.m).
# --------------------------------------------------------------------------------------------------


def per_query_reference(distmat, q_pids, g_pids, q_camids, g_camids, *, max_rank=50, ap_mode="standard",
                        same_camera_filter=True):
    aps, inps, cmcs = [], [], []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i], kind="stable")
        removed = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        if not same_camera_filter:
            removed[:] = False
        hits = (g_pids[order] == q_pids[i])[~removed].astype(np.float64)
        if hits.sum() == 0:
            continue
        cum = np.cumsum(hits)
        positions = np.flatnonzero(hits)  # 0-based ranks of the hits
        if ap_mode == "standard":
            ap = np.mean([cum[p] / (p + 1.0) for p in positions])
        else:
            ap, old_recall, old_precision, found = 0.0, 0.0, 1.0, 0
            for j, h in enumerate(hits):  # the devkit's loop, one kept item at a time
                found += int(h)
                recall, precision = found / hits.sum(), found / (j + 1.0)
                ap += (recall - old_recall) * (old_precision + precision) / 2.0
                old_recall, old_precision = recall, precision
        aps.append(ap)
        inps.append(hits.sum() / (positions[-1] + 1.0))
        curve = (cum[:max_rank] > 0).astype(np.float64)
        cmcs.append(np.pad(curve, (0, max_rank - curve.size), constant_values=1.0))
    return {
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        "cmc_curve": np.mean(cmcs, axis=0),
        "num_valid_queries": len(aps),
        "num_skipped_queries": distmat.shape[0] - len(aps),
    }


def random_problem(seed: int, num_q: int = 40, num_g: int = 300, num_ids: int = 25, num_cams: int = 4):
    rng = np.random.default_rng(seed)
    dist = rng.random((num_q, num_g))  # continuous: tie-free with probability 1
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids, num_g)
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    # Make positives a little closer so that the metrics are far from trivial.
    dist[q_pids[:, None] == g_pids[None, :]] *= 0.6
    return dist, q_pids, g_pids, q_cams, g_cams


def assert_matches_reference(result: dict, ref: dict, tol: float = 1e-6) -> None:
    assert result["mAP"] == pytest.approx(ref["mAP"], abs=tol)
    assert result["mINP"] == pytest.approx(ref["mINP"], abs=tol)
    np.testing.assert_allclose(result["cmc_curve"], ref["cmc_curve"], atol=tol)
    assert result["num_valid_queries"] == ref["num_valid_queries"]
    assert result["num_skipped_queries"] == ref["num_skipped_queries"]


# --------------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------------

# One query (identity 1, camera 0). Gallery, already in distance order:
#   0.1 id 2 | 0.2 id 1 cam 1 (hit) | 0.3 id 3 | 0.4 id 1 cam 2 (hit)
# hits at ranks 2 and 4:
#   standard AP = (1/2 + 2/4) / 2 = 0.5
#   devkit AP   = 1/2 * [(0/1 + 1/2)/2 + (1/3 + 2/4)/2] = 1/2 * (1/4 + 5/12) = 1/3
#   INP = 2 / 4 = 0.5; CMC: rank-1 = 0, rank-2.. = 1
BASE_DIST = np.array([[0.1, 0.2, 0.3, 0.4]])
BASE_G_PIDS = np.array([2, 1, 3, 1])
BASE_G_CAMS = np.array([0, 1, 0, 2])


def test_hand_computed_standard_ap_mINP_and_cmc():
    r = evaluate_distmat(BASE_DIST, np.array([1]), BASE_G_PIDS, np.array([0]), BASE_G_CAMS, max_rank=4)
    assert r["mAP"] == pytest.approx(0.5)
    assert r["mINP"] == pytest.approx(0.5)
    assert r["cmc_curve"] == pytest.approx([0.0, 1.0, 1.0, 1.0])
    assert r["cmc"] == {"1": 0.0, "4": 1.0}
    assert r["num_valid_queries"] == 1 and r["num_skipped_queries"] == 0
    assert (r["protocol"], r["ap_mode"], r["rerank"]) == ("market1501", "standard", False)


def test_hand_computed_devkit_ap_differs_from_standard():
    r = evaluate_distmat(BASE_DIST, np.array([1]), BASE_G_PIDS, np.array([0]), BASE_G_CAMS, ap_mode="devkit")
    assert r["mAP"] == pytest.approx(1.0 / 3.0)
    assert r["ap_mode"] == "devkit"
    # The first hit at rank 1 and the second at rank 2: both definitions give 1.
    r1 = evaluate_distmat(np.array([[0.1, 0.2, 0.3]]), np.array([1]), np.array([1, 1, 2]),
                          np.array([0]), np.array([1, 2, 0]), ap_mode="devkit")
    assert r1["mAP"] == pytest.approx(1.0)
    # A single hit at rank 3: standard 1/3, devkit (0/2 + 1/3)/2 = 1/6.
    r3 = {mode: evaluate_distmat(np.array([[0.1, 0.2, 0.3]]), np.array([1]), np.array([2, 3, 1]),
                                 np.array([0]), np.array([1, 2, 1]), ap_mode=mode)["mAP"]
          for mode in ("standard", "devkit")}
    assert r3 == pytest.approx({"standard": 1.0 / 3.0, "devkit": 1.0 / 6.0})


def test_same_identity_same_camera_items_are_removed_not_counted():
    # Prepend a same-id same-camera item that is the nearest of all: the rule removes it, so the
    # result is exactly the base case; without the rule it is a hit at rank 1.
    dist = np.array([[0.05, 0.1, 0.2, 0.3, 0.4]])
    g_pids = np.array([1, 2, 1, 3, 1])
    g_cams = np.array([0, 0, 1, 0, 2])
    with_rule = evaluate_distmat(dist, np.array([1]), g_pids, np.array([0]), g_cams)
    assert with_rule["mAP"] == pytest.approx(0.5)
    assert with_rule["cmc"]["1"] == 0.0
    without = evaluate_distmat(dist, np.array([1]), g_pids, np.array([0]), g_cams, same_camera_filter=False)
    assert without["mAP"] == pytest.approx((1.0 + 2.0 / 3.0 + 3.0 / 5.0) / 3.0)
    assert without["mINP"] == pytest.approx(3.0 / 5.0)
    # The vehicleid protocol has no camera rule.
    vid = evaluate_distmat(dist, np.array([1]), g_pids, np.array([0]), g_cams, protocol="vehicleid")
    assert vid["mAP"] == pytest.approx(without["mAP"]) and vid["protocol"] == "vehicleid"


def test_different_identity_same_camera_is_an_ordinary_negative():
    # Items of another identity seen by the query's camera stay in the ranking (they are not junk).
    dist = np.array([[0.1, 0.2]])
    r = evaluate_distmat(dist, np.array([1]), np.array([5, 1]), np.array([0]), np.array([0, 1]))
    assert r["mAP"] == pytest.approx(0.5)


def test_skipped_queries_are_counted_and_do_not_enter_the_means():
    dist = np.array([[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    q_pids = np.array([1, 9, 3])  # id 9 is not in the gallery; id 3 only from its own camera
    q_cams = np.array([0, 0, 0])
    r = evaluate_distmat(dist, q_pids, BASE_G_PIDS, q_cams, BASE_G_CAMS)
    assert r["num_valid_queries"] == 1
    assert r["num_skipped_queries"] == 2
    assert r["mAP"] == pytest.approx(0.5)


def test_no_valid_query_is_an_error():
    with pytest.raises(EvaluationError, match="no valid query"):
        evaluate_distmat(BASE_DIST, np.array([9]), BASE_G_PIDS, np.array([0]), BASE_G_CAMS)


def test_distractors_are_negatives():
    # Market's identity 0 (distractors) never matches a person query: two distractors in front of
    # the only hit put it at rank 3.
    dist = np.array([[0.1, 0.2, 0.3]])
    r = evaluate_distmat(dist, np.array([7]), np.array([0, 0, 7]), np.array([0]), np.array([1, 2, 1]))
    assert r["mAP"] == pytest.approx(1.0 / 3.0)
    assert r["cmc_curve"][:3] == pytest.approx([0.0, 0.0, 1.0])


@pytest.mark.parametrize(
    ("g_pids", "expected_rank"),
    [([1, 2, 3], 1), ([2, 1, 3], 2), ([2, 3, 1], 3)],
)
def test_ties_follow_gallery_order(g_pids, expected_rank):
    dist = np.full((1, 3), 0.5)
    r = evaluate_distmat(dist, np.array([1]), np.array(g_pids), np.array([0]), np.array([1, 1, 1]))
    assert r["mAP"] == pytest.approx(1.0 / expected_rank)


def test_ties_inside_a_larger_problem_follow_gallery_order():
    # Rows with and without ties mixed in one chunk: only tied rows take the stable re-sort.
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(3, num_q=30, num_g=200)
    dist = np.round(dist, 2)  # many exact ties
    dist[::2] = np.random.default_rng(1).random((15, 200))  # tie-free rows
    ref = per_query_reference(dist, q_pids, g_pids, q_cams, g_cams)
    assert_matches_reference(evaluate_distmat(dist, q_pids, g_pids, q_cams, g_cams), ref, tol=1e-12)


def test_torch_ranking_path_equals_numpy_path_with_ties():
    # The GPU path (torch stable sort) must give the same sparse hit list as the CPU path.
    rng = np.random.default_rng(5)
    dist = np.round(rng.random((20, 150)), 2).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 10, 20), rng.integers(0, 10, 150)
    a = _sorted_hits_numpy(dist, q_pids, g_pids)
    b = _sorted_hits_torch(torch.from_numpy(dist), torch.from_numpy(q_pids), torch.from_numpy(g_pids))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_cmc_over_several_queries():
    # First hits at ranks 1, 2 and 3.
    dist = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    g_pids = np.array([1, 2, 3])
    r = evaluate_distmat(dist, np.array([1, 2, 3]), g_pids, np.zeros(3, int), np.ones(3, int), max_rank=5)
    assert r["cmc_curve"] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])
    assert r["cmc"] == pytest.approx({"1": 1 / 3, "5": 1.0})
    assert r["mINP"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_mINP_uses_the_hardest_positive():
    # Hits at ranks 1 and 5 of 5: INP = 2/5, AP = (1 + 2/5)/2.
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    r = evaluate_distmat(dist, np.array([1]), np.array([1, 2, 3, 4, 1]), np.array([0]), np.ones(5, int))
    assert r["mINP"] == pytest.approx(0.4)
    assert r["mAP"] == pytest.approx(0.7)


def test_bad_inputs_raise_evaluation_error():
    with pytest.raises(EvaluationError, match="ap_mode"):
        evaluate_distmat(BASE_DIST, np.array([1]), BASE_G_PIDS, np.array([0]), BASE_G_CAMS, ap_mode="voc")
    with pytest.raises(EvaluationError, match="protocol"):
        evaluate_distmat(BASE_DIST, np.array([1]), BASE_G_PIDS, np.array([0]), BASE_G_CAMS, protocol="x")
    with pytest.raises(EvaluationError, match="g_pids"):
        evaluate_distmat(BASE_DIST, np.array([1]), BASE_G_PIDS[:3], np.array([0]), BASE_G_CAMS)
    with pytest.raises(EvaluationError, match="NaN"):
        evaluate_distmat(np.array([[0.1, np.nan, 0.3, 0.4]]), np.array([1]), BASE_G_PIDS, np.array([0]),
                         BASE_G_CAMS)
    with pytest.raises(EvaluationError, match="dimension"):
        evaluate_features(np.ones((2, 3)), np.ones((4, 5)), [1, 2], [1, 2, 3, 4], [0, 0], [1, 1, 1, 1])
    with pytest.raises(EvaluationError, match="NaN"):
        evaluate_features(np.full((2, 3), np.nan), np.ones((4, 3)), [1, 2], [1, 2, 3, 4], [0, 0], [1] * 4)
    with pytest.raises(EvaluationError, match="metric"):
        evaluate_features(np.ones((2, 3)), np.ones((4, 3)), [1, 2], [1, 2, 3, 4], [0, 0], [1] * 4,
                          metric="hamming")


# --------------------------------------------------------------------------------------------------
# Against the independent reference on random, tie-free inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ap_mode", ["standard", "devkit"])
@pytest.mark.parametrize("seed", [0, 1])
def test_distmat_matches_per_query_reference(seed, ap_mode):
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(seed)
    q_pids[0] = 10**6  # an identity absent from the gallery: a skipped query
    ref = per_query_reference(dist, q_pids, g_pids, q_cams, g_cams, ap_mode=ap_mode)
    assert ref["num_skipped_queries"] >= 1
    no_rule = per_query_reference(dist, q_pids, g_pids, q_cams, g_cams, ap_mode=ap_mode,
                                  same_camera_filter=False)
    assert abs(no_rule["mAP"] - ref["mAP"]) > 1e-3  # the camera rule matters on this input
    assert_matches_reference(
        evaluate_distmat(dist, q_pids, g_pids, q_cams, g_cams, ap_mode=ap_mode, same_camera_filter=False),
        no_rule,
    )
    for chunk in (None, 1, 7):
        r = evaluate_distmat(dist, q_pids, g_pids, q_cams, g_cams, ap_mode=ap_mode, chunk_size=chunk)
        assert_matches_reference(r, ref)
    as_tensor = evaluate_distmat(torch.from_numpy(dist), q_pids, g_pids, q_cams, g_cams, ap_mode=ap_mode)
    assert_matches_reference(as_tensor, ref)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "sqeuclidean"])
def test_features_match_reference_on_numpy_distances(metric):
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(15, 16))
    q_pids, g_pids = rng.integers(0, 15, 50), rng.integers(0, 15, 400)
    q = centers[q_pids] + rng.normal(size=(50, 16))
    g = centers[g_pids] + rng.normal(size=(400, 16))
    q_cams, g_cams = rng.integers(0, 3, 50), rng.integers(0, 3, 400)
    if metric == "cosine":
        qn = q / np.linalg.norm(q, axis=1, keepdims=True)
        gn = g / np.linalg.norm(g, axis=1, keepdims=True)
        dist = 1.0 - qn @ gn.T
    else:
        dist = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
        if metric == "euclidean":
            dist = np.sqrt(dist)
    np.testing.assert_allclose(distance_matrix(q, g, metric, device="cpu"), dist, atol=1e-10)
    ref = per_query_reference(dist, q_pids, g_pids, q_cams, g_cams)
    for chunk in (None, 3):
        r = evaluate_features(q, g, q_pids, g_pids, q_cams, g_cams, metric=metric, device="cpu",
                              chunk_size=chunk)
        assert_matches_reference(r, ref)
        assert r["metric"] == metric
    # float32 features go through float32 distances: still the same ranking here.
    r32 = evaluate_features(q.astype(np.float32), g.astype(np.float32), q_pids, g_pids, q_cams, g_cams,
                            metric=metric, device="cpu")
    assert r32["mAP"] == pytest.approx(ref["mAP"], abs=1e-4)


def test_result_shape_and_ranges():
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(4)
    r = evaluate_distmat(dist, q_pids, g_pids, q_cams, g_cams, max_rank=20)
    expected = {"mAP", "cmc", "mINP", "num_valid_queries", "num_skipped_queries", "protocol", "ap_mode",
                "metric", "rerank", "cmc_curve"}
    assert set(r) == expected
    assert list(r["cmc"]) == ["1", "5", "10", "20"]
    assert len(r["cmc_curve"]) == 20
    for v in [r["mAP"], r["mINP"], *r["cmc"].values(), *r["cmc_curve"]]:
        assert isinstance(v, float) and 0.0 <= v <= 1.0
    assert np.all(np.diff(r["cmc_curve"]) >= 0)
    assert r["mINP"] <= r["mAP"] <= 1.0


# Every device torch sees: the CPU here, the GPU too where there is one (the same assertions).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_every_device_matches_the_reference(device):
    rng = np.random.default_rng(21)
    q, g = rng.normal(size=(60, 32)).astype(np.float32), rng.normal(size=(700, 32)).astype(np.float32)
    q_pids, g_pids = rng.integers(0, 30, 60), rng.integers(0, 30, 700)
    q_cams, g_cams = rng.integers(0, 4, 60), rng.integers(0, 4, 700)
    dist = distance_matrix(q, g, "cosine", device="cpu")
    for ap_mode in ("standard", "devkit"):
        ref = per_query_reference(dist, q_pids, g_pids, q_cams, g_cams, ap_mode=ap_mode)
        r = evaluate_features(q, g, q_pids, g_pids, q_cams, g_cams, device=device, ap_mode=ap_mode,
                              chunk_size=16)
        # float32 distances from another device may reorder near-equal values: a loose tolerance.
        assert r["mAP"] == pytest.approx(ref["mAP"], abs=1e-3)
        assert r["num_valid_queries"] == ref["num_valid_queries"]
        exact = evaluate_distmat(torch.from_numpy(dist).to(device), q_pids, g_pids, q_cams, g_cams,
                                 ap_mode=ap_mode)
        assert_matches_reference(exact, ref)


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------

problems = st.tuples(
    st.integers(0, 2**31 - 1), st.integers(1, 12), st.integers(2, 60), st.integers(1, 6), st.integers(1, 3)
)


@settings(max_examples=25, deadline=None)
@given(problems, st.randoms(use_true_random=False), st.sampled_from(["standard", "devkit"]))
def test_invariant_to_gallery_permutation(problem, rnd, ap_mode):
    seed, nq, ng, nids, ncams = problem
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(seed, nq, ng, nids, ncams)
    try:
        a = evaluate_distmat(dist, q_pids, g_pids, q_cams, g_cams, ap_mode=ap_mode)
    except EvaluationError:
        return  # no valid query in this draw: nothing to compare
    perm = np.array(rnd.sample(range(ng), ng))
    b = evaluate_distmat(dist[:, perm], q_pids, g_pids[perm], q_cams, g_cams[perm], ap_mode=ap_mode)
    assert b["mAP"] == pytest.approx(a["mAP"], abs=1e-12)
    assert b["mINP"] == pytest.approx(a["mINP"], abs=1e-12)
    assert b["cmc_curve"] == pytest.approx(a["cmc_curve"], abs=1e-12)
    assert b["num_valid_queries"] == a["num_valid_queries"]


@settings(max_examples=25, deadline=None)
@given(problems, st.integers(0, 10**6), st.sampled_from(["standard", "devkit"]))
def test_moving_a_match_closer_never_hurts(problem, pick, ap_mode):
    seed, nq, ng, nids, ncams = problem
    dist, q_pids, g_pids, q_cams, g_cams = random_problem(seed, nq, ng, nids, ncams)
    positives = np.argwhere((q_pids[:, None] == g_pids[None, :]) & (q_cams[:, None] != g_cams[None, :]))
    if positives.size == 0:
        return
    qi, gi = positives[pick % len(positives)]
    before = evaluate_distmat(dist, q_pids, g_pids, q_cams, g_cams, ap_mode=ap_mode)
    closer = dist.copy()
    closer[qi, gi] *= 0.5  # distances are positive: strictly closer, still tie-free
    after = evaluate_distmat(closer, q_pids, g_pids, q_cams, g_cams, ap_mode=ap_mode)
    assert after["mAP"] >= before["mAP"] - 1e-12
    assert after["mINP"] >= before["mINP"] - 1e-12
    assert np.all(np.array(after["cmc_curve"]) >= np.array(before["cmc_curve"]) - 1e-12)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9), st.sampled_from(["cosine", "euclidean"]))
def test_chunked_equals_unchunked(seed, chunk, metric):
    rng = np.random.default_rng(seed)
    q_pids, g_pids = rng.integers(0, 6, 17), rng.integers(0, 6, 90)
    q, g = rng.normal(size=(17, 8)), rng.normal(size=(90, 8))
    q_cams, g_cams = rng.integers(0, 2, 17), rng.integers(0, 2, 90)
    kw = {"metric": metric, "device": "cpu"}
    try:
        whole = evaluate_features(q, g, q_pids, g_pids, q_cams, g_cams, **kw)
    except EvaluationError:
        return
    parts = evaluate_features(q, g, q_pids, g_pids, q_cams, g_cams, chunk_size=chunk, **kw)
    assert parts["mAP"] == pytest.approx(whole["mAP"], abs=1e-12)
    assert parts["mINP"] == pytest.approx(whole["mINP"], abs=1e-12)
    assert parts["cmc_curve"] == pytest.approx(whole["cmc_curve"], abs=1e-12)
