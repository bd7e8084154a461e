"""Service evaluations equal the offline numbers (``evaluation.metrics``, i.e. ``reid evaluate-features``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from evaluation.feature_file import load_feature_file
from evaluation.metrics import evaluate_features
from service.evaluation_files import evaluation_dir
from tests.service.conftest import wait_for_job


def offline_features(model_dir: Path, paths: list[str]) -> np.ndarray:
    from training.export import load_model

    model = load_model(model_dir, device="cpu")
    images = []
    for p in paths:
        with Image.open(p) as img:
            images.append(img.convert("RGB"))
    return model.embed_images(images, batch_size=7)


@pytest.mark.parametrize("rerank", [False, True])
def test_market1501_evaluation_equals_offline(
    client: TestClient, market_root: Path, model_dirs: dict[str, Path], tmp_path: Path, rerank: bool
) -> None:
    from training.data.registry import build_dataset

    r = client.post(
        "/v1/evaluations",
        json={
            "model": "person",
            "dataset": {"layout": "market1501", "root": str(market_root)},
            "rerank": rerank,
        },
    )
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/evaluations/{r.json()['id']}"
    ev = wait_for_job(client, r.headers["location"])
    assert ev["status"] == "succeeded", ev
    result = ev["result"]
    assert result["protocol"] == "market1501" and result["model_version"] == ev["model_version"]
    assert result["rerank"] is rerank and 0.0 <= result["mAP"] <= 1.0 and "1" in result["cmc"]

    # 1. The same embeddings (the feature files the job kept) give exactly the same numbers offline.
    folder = evaluation_dir(client.app.state.settings.data_dir, ev["id"])
    q, g = load_feature_file(folder / "query.npz"), load_feature_file(folder / "gallery.npz")
    offline = evaluate_features(q.features, g.features, q.pids, g.pids, q.camids, g.camids, rerank=rerank)
    for key in ("mAP", "mINP", "num_valid_queries", "cmc", "protocol", "ap_mode"):
        assert result[key] == offline[key], key

    # 2. Those embeddings are the model's own: equal (to float tolerance) to embedding the dataset
    # offline with load_model + embed_images, and ranking them gives the same numbers.
    dataset = build_dataset("market1501", market_root)
    np.testing.assert_allclose(
        q.features, offline_features(model_dirs["person"], [s.path for s in dataset.query]), atol=1e-5
    )
    own = offline_features(model_dirs["person"], [s.path for s in dataset.gallery])
    np.testing.assert_allclose(g.features, own, atol=1e-5)
    recomputed = evaluate_features(
        offline_features(model_dirs["person"], [s.path for s in dataset.query]),
        own,
        [s.pid for s in dataset.query],
        [s.pid for s in dataset.gallery],
        [s.camid for s in dataset.query],
        [s.camid for s in dataset.gallery],
        rerank=rerank,
    )
    assert recomputed["mAP"] == pytest.approx(result["mAP"], abs=1e-6)
    assert recomputed["cmc"] == pytest.approx(result["cmc"], abs=1e-6)

    samples = json.loads((folder / "samples.json").read_text())
    assert samples == {"query": [s.path for s in dataset.query], "gallery": [s.path for s in dataset.gallery]}

    listed = client.get("/v1/evaluations", params={"model": "person"}).json()["items"]
    assert [e["id"] for e in listed] == [ev["id"]]
    assert client.get("/v1/evaluations", params={"model": "vehicle"}).json()["items"] == []


def test_vehicleid_evaluation_equals_offline(client: TestClient, datasets_root: Path) -> None:
    from evaluation.metrics import vehicleid_protocol
    from training.data.synthetic import write_synthetic

    root = datasets_root / "vehicleid"
    if not root.exists():
        write_synthetic(root, layout="vehicleid", ids=8, images_per_id=4, seed=3, progress=False)
    r = client.post(
        "/v1/evaluations",
        json={
            "model": "vehicle",
            "dataset": {"layout": "vehicleid", "root": str(root)},
            "trials": 3,
            "seed": 5,
        },
    )
    assert r.status_code == 202, r.text
    ev = wait_for_job(client, r.headers["location"])
    assert ev["status"] == "succeeded", ev
    result = ev["result"]
    assert result["protocol"] == "vehicleid" and result["num_trials"] == 3 and len(result["trials"]) == 3
    fs = load_feature_file(evaluation_dir(client.app.state.settings.data_dir, ev["id"]) / "features.npz")
    offline = vehicleid_protocol(fs.features, fs.pids, fs.camids, trials=3, seed=5)
    for key in ("mAP", "mAP_std", "cmc", "cmc_std", "mINP", "trials"):
        assert result[key] == offline[key], key


def test_evaluation_of_unreadable_dataset_fails_cleanly(client: TestClient, datasets_root: Path) -> None:
    empty = datasets_root / "not-a-market"
    empty.mkdir(exist_ok=True)
    r = client.post(
        "/v1/evaluations", json={"model": "person", "dataset": {"layout": "market1501", "root": str(empty)}}
    )
    # Refused at creation with the parser's message, naming the folder relative to its root.
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "query" in detail.lower() and str(datasets_root) not in detail
