"""The VehicleID protocol: seeded random single-image galleries, repeated, with mean and std."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.metrics import EvaluationError, evaluate_features, vehicleid_protocol


def vehicle_features(seed: int = 0, num_ids: int = 40, per_id: int = 5, dim: int = 16, noise: float = 1.0):
    rng = np.random.default_rng(seed)
    pids = np.repeat(np.arange(100, 100 + num_ids), per_id)
    centers = rng.normal(size=(num_ids, dim))
    feats = centers[pids - 100] + noise * rng.normal(size=(pids.size, dim))
    return feats.astype(np.float32), pids


def test_same_seed_same_result_and_std_reported():
    feats, pids = vehicle_features()
    a = vehicleid_protocol(feats, pids, trials=4, seed=3, device="cpu")
    b = vehicleid_protocol(feats, pids, trials=4, seed=3, device="cpu")
    assert a == b
    assert a["num_trials"] == 4 and a["seed"] == 3 and a["test_size"] == 40
    assert len(a["trials"]) == 4
    maps = [t["mAP"] for t in a["trials"]]
    assert a["mAP"] == pytest.approx(np.mean(maps))
    assert a["mAP_std"] == pytest.approx(np.std(maps))
    assert a["mAP_std"] > 0  # different random galleries give different numbers
    assert set(a["cmc_std"]) == set(a["cmc"])
    assert a["cmc"]["1"] == pytest.approx(np.mean([t["rank1"] for t in a["trials"]]))
    assert a["cmc_std"]["5"] == pytest.approx(np.std([t["rank5"] for t in a["trials"]]))
    assert "mINP_std" in a
    for t in a["trials"]:
        assert t["num_gallery"] == 40  # one image per identity
        assert t["num_valid_queries"] == 40 * 4  # all the others are queries
    assert a["protocol"] == "vehicleid"


def test_different_seeds_differ_and_each_trial_is_reproducible_alone():
    feats, pids = vehicle_features()
    a = vehicleid_protocol(feats, pids, trials=3, seed=0, device="cpu")
    b = vehicleid_protocol(feats, pids, trials=3, seed=1, device="cpu")
    assert [t["mAP"] for t in a["trials"]] != [t["mAP"] for t in b["trials"]]
    # Trial t depends only on (seed, t): a longer run starts with the same trials.
    longer = vehicleid_protocol(feats, pids, trials=5, seed=0, device="cpu")
    assert longer["trials"][:3] == a["trials"]


def test_test_size_draws_that_many_identities_and_refuses_more_than_available():
    feats, pids = vehicle_features(num_ids=40)
    r = vehicleid_protocol(feats, pids, trials=3, seed=0, test_size=15, device="cpu")
    assert r["test_size"] == 15
    assert all(t["num_gallery"] == 15 and t["num_valid_queries"] == 15 * 4 for t in r["trials"])
    with pytest.raises(EvaluationError, match="only 40"):
        vehicleid_protocol(feats, pids, trials=1, test_size=41, device="cpu")


def test_camera_rule_does_not_apply():
    # Every image from the same camera: the Market rule would skip every query; VehicleID keeps them.
    feats, pids = vehicle_features(num_ids=10, per_id=3, noise=0.0)
    camids = np.zeros_like(pids)
    r = vehicleid_protocol(feats, pids, camids, trials=2, device="cpu")
    assert r["num_skipped_queries"] == 0
    assert r["mAP"] == pytest.approx(1.0) and r["mAP_std"] == pytest.approx(0.0)  # identical features
    with pytest.raises(EvaluationError, match="no valid query"):
        evaluate_features(
            feats[:10], feats[10:], pids[:10], pids[10:], camids[:10], camids[10:], device="cpu"
        )


def test_single_image_identities_are_gallery_distractors():
    feats, pids = vehicle_features(num_ids=10, per_id=3)
    lone_feats = np.random.default_rng(9).normal(size=(5, feats.shape[1])).astype(np.float32)
    feats = np.concatenate([feats, lone_feats])
    pids = np.concatenate([pids, np.arange(500, 505)])
    r = vehicleid_protocol(feats, pids, trials=2, device="cpu")
    assert all(t["num_gallery"] == 15 and t["num_valid_queries"] == 20 for t in r["trials"])


def test_bad_arguments():
    feats, pids = vehicle_features(num_ids=5, per_id=1)
    with pytest.raises(EvaluationError, match="no query"):
        vehicleid_protocol(feats, pids, trials=1, device="cpu")
    feats, pids = vehicle_features(num_ids=5)
    with pytest.raises(EvaluationError, match="trials"):
        vehicleid_protocol(feats, pids, trials=0, device="cpu")
    with pytest.raises(EvaluationError, match="pids"):
        vehicleid_protocol(feats, pids[:-1], trials=1, device="cpu")
