"""Memory of image decoding per request: a pixel budget read from the headers, and no full-size image kept."""

from __future__ import annotations

import io
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import service.imaging.preparation as preparation
from service.app import create_app
from service.imaging.preparation import prefetched_batches, prepare_bytes
from service.settings import Settings
from tests.service.conftest import jpeg_bytes, make_settings

PROBLEM = "application/problem+json"


def palette_png(size: tuple[int, int]) -> bytes:
    """A one-colour palette PNG: a few KB of body for width x height pixels once decoded."""
    buf = io.BytesIO()
    Image.new("P", size, 3).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[weakref.ref[Image.Image]]:
    """A weak reference to every full-size image the thread road decodes, in order."""
    refs: list[weakref.ref[Image.Image]] = []
    real = preparation.decode_image

    def tracking(data: bytes, **kwargs: Any) -> Any:
        out = real(data, **kwargs)
        refs.append(weakref.ref(out.image))
        return out

    monkeypatch.setattr(preparation, "decode_image", tracking)
    return refs


def alive(refs: list[weakref.ref[Image.Image]]) -> int:
    return sum(r() is not None for r in refs)


def make_client(tmp_path: Path, model_dirs: dict[str, Path], **overrides: Any) -> TestClient:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'reid.sqlite3'}", model_dirs, **overrides)
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def small_budget(tmp_path: Path, model_dirs: dict[str, Path]) -> Iterator[tuple[TestClient, int]]:
    """The app with room for two 32x64 queries per request (2 x 2048 pixels), and a gallery id."""
    with make_client(tmp_path, model_dirs, max_request_pixels=5000) as client:
        gid = client.post("/v1/galleries", json={"name": "g", "model": "person"}).json()["id"]
        yield client, gid


def files(images: list[bytes], ext: str = "jpg") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"q{i}.{ext}", data, "application/octet-stream")) for i, data in enumerate(images)]


def test_a_search_over_the_request_pixel_budget_gets_413_naming_the_total_and_the_limit(
    small_budget: tuple[TestClient, int], decodes: list[weakref.ref[Image.Image]]
) -> None:
    client, gid = small_budget
    r = client.post(f"/v1/galleries/{gid}/search", files=files([jpeg_bytes(1), jpeg_bytes(2)]))
    assert r.status_code == 200, r.text  # 4,096 pixels: under the budget
    assert len(r.json()["queries"]) == 2 and len(decodes) == 2
    r = client.post(f"/v1/galleries/{gid}/search", files=files([jpeg_bytes(i) for i in range(3)]))
    assert r.status_code == 413, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["type"] == "/problems/too-many-pixels"
    assert "3 images" in body["detail"] and "6,144 pixels" in body["detail"] and "5,000" in body["detail"]
    assert "fewer or smaller images" in body["detail"]
    assert len(decodes) == 2  # refused from the headers: none of the three was decoded


def test_an_upload_over_the_budget_gets_413_and_stores_nothing(small_budget: tuple[TestClient, int]) -> None:
    client, gid = small_budget
    r = client.post(f"/v1/galleries/{gid}/items", files=files([jpeg_bytes(i) for i in range(3)]))
    assert r.status_code == 413, r.text
    assert r.json()["type"] == "/problems/too-many-pixels"
    assert client.get(f"/v1/galleries/{gid}/items").json()["items"] == []
    r = client.post(f"/v1/galleries/{gid}/items", files=files([jpeg_bytes(1), jpeg_bytes(2)]))
    assert r.status_code == 201, r.text


def test_the_default_budget_refuses_the_issues_palette_pngs_before_decoding_any(
    tmp_path: Path, model_dirs: dict[str, Path], decodes: list[weakref.ref[Image.Image]]
) -> None:
    # Issue 18: 32 palette PNGs of 6300x6300 (157 KB) took the server from 1.8 to 6.2 GB. Five of
    # 6000x6000 are 180 M pixels, each under the per-image limit (40 M), together over 160 M.
    png = palette_png((6000, 6000))
    assert len(png) < 100_000
    with make_client(tmp_path, model_dirs) as client:
        assert client.app.state.service.settings.max_request_pixels == 4 * Settings().max_image_pixels
        gid = client.post("/v1/galleries", json={"name": "g", "model": "person"}).json()["id"]
        r = client.post(f"/v1/galleries/{gid}/search", files=files([png] * 5, "png"))
    assert r.status_code == 413, r.text
    assert "180,000,000 pixels" in r.json()["detail"] and "160,000,000" in r.json()["detail"]
    assert decodes == []


def test_a_batch_keeps_at_most_one_full_size_image_alive(decodes: list[weakref.ref[Image.Image]]) -> None:
    """Only the small tensors outlive the decode step, whatever the batch size."""
    peak = 0

    def preprocess(image: Image.Image) -> torch.Tensor:
        nonlocal peak
        peak = max(peak, alive(decodes))  # the image being resized, and any kept from before
        return torch.from_numpy(np.array(image.resize((8, 16)))).permute(2, 0, 1)

    images = [palette_png((600 + i, 400)) for i in range(8)] + [jpeg_bytes(i, (300, 200)) for i in range(4)]

    def prepare(i: int) -> preparation.Prepared[int]:
        return prepare_bytes(i, images[i], name=f"{i}.img", max_pixels=10**6, preprocessors={1: preprocess})

    with ThreadPoolExecutor(1) as pool:  # one decode thread: at most one image in the decode step
        (batch,) = prefetched_batches(pool, list(range(len(images))), prepare, batch_size=12, prefetch=0)
    assert [p.error for p in batch] == [None] * 12 and len(decodes) == 12
    assert peak == 1
    assert alive(decodes) == 0  # the batch holds tensors, header facts and bytes only
    assert [p.width for p in batch[:8]] == [600 + i for i in range(8)] and batch[0].image_format == "PNG"
    # A model that joins later decodes the kept bytes again, one image at a time, and keeps none.
    for p in batch:
        p.tensor_for(2, preprocess, 10**6)
    assert peak == 1 and alive(decodes) == 0 and len(decodes) == 24
