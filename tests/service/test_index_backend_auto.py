"""``index_backend=auto``: flat galleries search on the models' GPU when FAISS cannot, others on FAISS.

The GPU is stood in for by the CPU device (the torch backend runs the same code there), by making
:func:`service.app.exact_search_device` answer ``cpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import service.app
from index import faiss_gpu
from service.app import create_app, exact_search_device
from service.settings import Settings
from tests.service.conftest import jpeg_bytes, make_settings
from tests.service.test_recovery import upload


def test_auto_picks_the_gpu_only_where_faiss_cannot_use_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert exact_search_device(Settings(device="cpu")) is None
    monkeypatch.setattr(faiss_gpu, "gpu_count", lambda: 0)
    assert exact_search_device(Settings(device="cuda:1")) == "cuda:1"
    assert exact_search_device(Settings(device="cuda", index_backend="faiss")) is None  # told: obeyed
    monkeypatch.setattr(faiss_gpu, "gpu_count", lambda: 1)  # faiss-gpu searches on the GPU itself
    assert exact_search_device(Settings(device="cuda")) is None


def test_flat_galleries_take_the_exact_device_and_keep_it_across_restarts(
    tmp_path: Path, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.app, "exact_search_device", lambda settings: "cpu")
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'reid.sqlite3'}", model_dirs)
    assert settings.index_backend == "auto"
    with TestClient(create_app(settings)) as client:
        flat = client.post("/v1/galleries", json={"name": "flat", "model": "person"}).json()
        hnsw = client.post(
            "/v1/galleries", json={"name": "hnsw", "model": "person", "index_spec": "hnsw"}
        ).json()
        assert flat["index"]["backend"] == "torch" and hnsw["index"]["backend"] == "faiss"
        ids = {g["id"]: upload(client, g["id"], [1, 2, 3]) for g in (flat, hnsw)}
    with TestClient(create_app(settings)) as client:  # from the snapshots written at shutdown
        for g in (flat, hnsw):
            again = client.get(f"/v1/galleries/{g['id']}").json()
            assert again["index"] == {**g["index"], "size": 3}
            r = client.post(
                f"/v1/galleries/{g['id']}/search",
                files=[("image", ("q.jpg", jpeg_bytes(2), "image/jpeg"))],
                data={"k": "1"},
            )
            assert r.json()["queries"][0]["results"][0]["item_id"] == ids[g["id"]][1]
