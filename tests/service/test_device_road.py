"""The GPU decoding road of uploads, evaluation and re-embedding jobs, exercised on the CPU.

On a GPU machine :func:`service.imaging.preparation.device_stage_for` returns a stage that decodes JPEGs
with nvJPEG and resizes them on the device. Here it is replaced by the same
:class:`DeviceBatchStage` on the CPU device (torchvision's decoder, tensor resize), which runs every
step of that road except the CUDA calls: these tests check that each caller takes the road, that
its embeddings are the Pillow road's to within the documented tolerance, and that bad images still
get their own answers.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import service.imaging.preparation
from evaluation.feature_file import load_feature_file
from service.api.uploads import embed_prepared
from service.app import create_app
from service.evaluation_files import evaluation_dir
from service.imaging.preparation import DeviceBatchStage, prepare_bytes
from service.settings import ModelSpec
from tests.service.conftest import jpeg_bytes, make_settings, wait_for_job
from tests.service.test_recovery import upload

#: Cosine between the tensor road's and Pillow's embeddings (the resize filters differ slightly).
MIN_COSINE = 0.999


class CountingStage(DeviceBatchStage):
    """The device stage on the CPU device, counting the images it finished."""

    images = 0

    def __call__(self, batch):  # type: ignore[no-untyped-def]
        CountingStage.images += len(batch)
        return super().__call__(batch)


def _cpu_stage_for(road: str):
    def factory(models, *, jpeg_decoder, max_pixels):  # the signature of device_stage_for
        if jpeg_decoder == "pil":  # as the real one: the operator chose Pillow everywhere
            return None
        return CountingStage(
            {model_id: m.preprocess_tensors for model_id, m in models.items()},
            {model_id: m.preprocess for model_id, m in models.items()},
            device=torch.device("cpu"),
            jpeg_decoder=road,
            max_pixels=max_pixels,
        )

    return factory


@pytest.fixture(params=["gpu", "cpu"])
def road(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Every caller of device_stage_for gets the CPU stand-in of the GPU road ``gpu`` or ``cpu``."""
    CountingStage.images = 0
    monkeypatch.setattr(service.imaging.preparation, "device_stage_for", _cpu_stage_for(request.param))
    yield request.param


@pytest.fixture
def make_client(tmp_path: Path, model_dirs: dict[str, Path], datasets_root: Path):
    def make(**overrides) -> TestClient:
        settings = make_settings(
            tmp_path, f"sqlite:///{tmp_path / 'reid.sqlite3'}", model_dirs, datasets_root, **overrides
        )
        return TestClient(create_app(settings), raise_server_exceptions=False)

    return make


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(seed))).save(buf, "PNG")
    return buf.getvalue()


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _search_scores(client: TestClient, gid: int, files: list) -> list[list[tuple[int, float]]]:
    r = client.post(f"/v1/galleries/{gid}/search", files=files, data={"k": "5"})
    assert r.status_code == 200, r.text
    return [[(h["item_id"], h["score"]) for h in q["results"]] for q in r.json()["queries"]]


def test_uploads_take_the_device_road_and_find_what_pillow_finds(
    road: str, make_client, model_dirs: dict[str, Path], tmp_path: Path
) -> None:
    files = [
        ("image", ("a.jpg", jpeg_bytes(1), "image/jpeg")),
        ("image", ("b.png", _png(2), "image/png")),  # the Pillow road in the same request
        ("image", ("c.jpg", jpeg_bytes(3), "image/jpeg")),
    ]
    with make_client(jpeg_decoder="pil") as plain:
        gid = plain.post("/v1/galleries", json={"name": "g", "model": "person"}).json()["id"]
        ids = upload(plain, gid, [1, 2, 3, 4, 5, 6])
        expected = _search_scores(plain, gid, files)
    assert CountingStage.images == 0  # stand-in installed, but "pil" never asks for the stage
    with make_client() as client:
        got = _search_scores(client, gid, files)
        assert CountingStage.images == 3
        # Each query finds itself first; the scores are Pillow's to within the filters' difference.
        assert [q[0][0] for q in got] == [q[0][0] for q in expected] == ids[:3]
        for g, e in zip(got, expected, strict=True):
            assert {i for i, _ in g} == {i for i, _ in e}
            np.testing.assert_allclose([s for _, s in g], [s for _, s in e], atol=2e-3)

        # Adding items on the device road stores the image's real facts.
        item = client.post(
            f"/v1/galleries/{gid}/items", files=[("image", ("n.jpg", jpeg_bytes(9, (40, 80)), "image/jpeg"))]
        ).json()["items"][0]
        assert (item["width"], item["height"]) == (40, 80)
        r = client.post(f"/v1/galleries/{gid}/search", files=[files[0]], data={"k": "1"})
        assert r.json()["queries"][0]["results"][0]["item_id"] == ids[0]


@pytest.mark.parametrize(
    ("data", "status", "slug"),
    [
        (b"", 415, "unsupported-image"),
        (b"not an image at all", 415, "unsupported-image"),
        (jpeg_bytes(4)[:-200], 422, "undecodable-image"),  # truncated: Pillow judges it
        (jpeg_bytes(5, (3000, 3000)), 413, "image-too-large"),  # refused from the header alone
    ],
)
def test_bad_uploads_keep_their_answers_on_the_device_road(
    road: str, make_client, data: bytes, status: int, slug: str
) -> None:
    with make_client(max_image_pixels=2_000_000) as client:
        gid = client.post("/v1/galleries", json={"name": "g", "model": "person"}).json()["id"]
        r = client.post(f"/v1/galleries/{gid}/search", files=[("image", ("x.jpg", data, "image/jpeg"))])
        assert r.status_code == status, r.text
        assert r.json()["type"].endswith(slug)
        assert "x.jpg" in r.json()["detail"]


def test_evaluation_job_takes_the_device_road(
    road: str, make_client, market_root: Path, tmp_path: Path
) -> None:
    results = {}
    features = {}
    for decoder in ("pil", "gpu"):
        with make_client(jpeg_decoder=decoder) as client:
            r = client.post(
                "/v1/evaluations",
                json={"model": "person", "dataset": {"layout": "market1501", "root": str(market_root)}},
            )
            ev = wait_for_job(client, r.headers["location"])
            assert ev["status"] == "succeeded", ev
            results[decoder] = ev["result"]
            folder = evaluation_dir(client.app.state.settings.data_dir, ev["id"])
            features[decoder] = load_feature_file(folder / "gallery.npz").features
    assert results["pil"]["jpeg_decoding"] == "pil"
    assert results["gpu"]["jpeg_decoding"] == road
    assert CountingStage.images == results["gpu"]["num_query"] + results["gpu"]["num_gallery"]
    assert float(_cosines(features["pil"], features["gpu"]).min()) >= MIN_COSINE
    assert results["gpu"]["mAP"] == pytest.approx(results["pil"]["mAP"], abs=0.02)


def test_reembed_job_takes_the_device_road(
    road: str, make_client, model_dirs: dict[str, Path]
) -> None:
    models = [ModelSpec("person", model_dirs["person"]), ModelSpec("person", model_dirs["person_v2"])]
    with make_client(models=models, ingest_batch_size=4) as client:
        versions = {m["version"]: m["default"] for m in client.get("/v1/models").json()}
        old = next(v for v, default in versions.items() if not default)
        gid = client.post("/v1/galleries", json={"name": "g", "model": "person", "version": old}).json()["id"]
        ids = upload(client, gid, list(range(10, 17)))
        before = CountingStage.images
        r = client.post(f"/v1/galleries/{gid}/reembed-jobs", json={"model": "person"})
        job = wait_for_job(client, r.headers["location"])
        assert job["status"] == "succeeded", job
        assert CountingStage.images - before == len(ids)
        r = client.post(
            f"/v1/galleries/{gid}/search", files=[("image", ("q.jpg", jpeg_bytes(12), "image/jpeg"))]
        )
        assert r.json()["model_version"] != old
        assert r.json()["queries"][0]["results"][0]["item_id"] == ids[2]


def test_a_model_that_joined_later_embeds_uploads_prepared_for_the_others(
    model_dirs: dict[str, Path],
) -> None:
    """embed_prepared preprocesses, from the kept bytes, uploads that took another model's road."""
    from training.export import load_model

    model = load_model(model_dirs["person"], device="cpu")
    data = jpeg_bytes(21)
    # Prepared for the tensor road of another model: no PIL image, no tensor for this one.
    prepared = [
        prepare_bytes("q.jpg", data, name="q.jpg", max_pixels=10**6, preprocessors={}, jpeg_decoder="gpu")
    ]
    assert prepared[0].encoded is not None and not prepared[0].tensors

    async def embed(tensor: torch.Tensor) -> np.ndarray:
        return model.embed(tensor[None]).numpy()[0]

    with ThreadPoolExecutor(2) as pool:
        state = SimpleNamespace(
            decoder=SimpleNamespace(pool=pool), settings=SimpleNamespace(max_image_pixels=10**6)
        )
        runtime = SimpleNamespace(model=model, batcher=SimpleNamespace(embed=embed))
        vectors = asyncio.run(embed_prepared(state, runtime, 5, prepared))  # type: ignore[arg-type]
    expected = model.embed_images([Image.open(io.BytesIO(data)).convert("RGB")])
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
