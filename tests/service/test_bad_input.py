"""Bad input: each answered with its precise 4xx problem+json, and the service healthy afterwards.

The list of issue 7: a truncated JPEG, a PNG bomb, a text file named ``.jpg``, a 0-byte upload, an
oversized body, a wrong content type, ``k`` of 0 and of 10^9, an unknown gallery or model, a
dataset path outside the allowed roots (plus the path tricks that must not escape them either).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import jpeg_bytes, make_settings

PROBLEM = "application/problem+json"
MAX_BODY = 512 * 1024


def png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of ``width x height`` black pixels: a few kB that decode to ``w*h`` bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = bytes(height * (width + 1))  # each scanline: filter byte 0, then the pixels
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path], datasets_root: Path
) -> Iterator[tuple[TestClient, int, Path]]:
    """One app for the module: a gallery with three items, bodies limited to 512 KiB."""
    tmp = tmp_path_factory.mktemp("bad-input")
    settings = make_settings(
        tmp, f"sqlite:///{tmp / 'reid.sqlite3'}", model_dirs, datasets_root, max_body_bytes=MAX_BODY
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        r = client.post("/v1/galleries", json={"name": "bad-input", "model": "person"})
        assert r.status_code == 201, r.text
        gid = r.json()["id"]
        files = [("image", (f"{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in (1, 2, 3)]
        r = client.post(f"/v1/galleries/{gid}/items", files=files, data={"identity": ["a", "b", "c"]})
        assert r.status_code == 201, r.text
        yield client, gid, tmp


def upload(name: str, data: bytes, media: str = "image/jpeg") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (name, data, media))]


def search_url(gid: int) -> str:
    return f"/v1/galleries/{gid}/search"


def assert_healthy(client: TestClient, gid: int) -> None:
    assert client.get("/health/ready").status_code == 200
    r = client.post(search_url(gid), files=upload("q.jpg", jpeg_bytes(2)), data={"k": "3"})
    assert r.status_code == 200, r.text
    best = r.json()["queries"][0]["results"][0]
    assert best["identity"] == "b" and best["score"] > 0.99  # the very image uploaded as "b"


def ingest(client: TestClient, gid: int, root: str) -> Any:
    return client.post(
        f"/v1/galleries/{gid}/ingest-jobs", json={"source": {"layout": "market1501", "root": root}}
    )


Case = Callable[[TestClient, int, Path], Any]


def _truncated_jpeg(c: TestClient, gid: int, _: Path) -> Any:
    data = jpeg_bytes(5, size=(64, 128))
    return c.post(search_url(gid), files=upload("cut.jpg", data[: len(data) // 2]))


def _png_bomb(c: TestClient, gid: int, _: Path) -> Any:
    bomb = png_bomb(7000, 7000)  # 49 Mpx (> the 40 Mpx default), about 50 kB on the wire
    assert len(bomb) < 100_000
    return c.post(search_url(gid), files=upload("bomb.png", bomb, "image/png"))


def _huge_png_bomb(c: TestClient, gid: int, _: Path) -> Any:
    # 4 Gpx declared: Pillow's own guard refuses it before our limit is even asked.
    header = png_bomb(1, 1)
    ihdr = struct.pack(">IIBBBBB", 65_536, 65_536, 8, 0, 0, 0, 0)
    forged = (
        header[:8] + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    return c.post(search_url(gid), files=upload("bomb.png", forged + header[33:], "image/png"))


def _text_named_jpg(c: TestClient, gid: int, _: Path) -> Any:
    return c.post(search_url(gid), files=upload("photo.jpg", b"this is a text file, not a photo\n"))


def _empty_upload(c: TestClient, gid: int, _: Path) -> Any:
    return c.post(f"/v1/galleries/{gid}/items", files=upload("empty.jpg", b""))


def _oversized_body(c: TestClient, gid: int, _: Path) -> Any:
    return c.post(f"/v1/galleries/{gid}/items", files=upload("big.jpg", jpeg_bytes(1) + bytes(MAX_BODY)))


def _json_to_upload_endpoint(c: TestClient, gid: int, _: Path) -> Any:
    return c.post(search_url(gid), json={"image": "q.jpg", "k": 3})


def _text_to_json_endpoint(c: TestClient, gid: int, _: Path) -> Any:
    body = b'{"name": "typed", "model": "person"}'
    return c.post("/v1/galleries", content=body, headers={"Content-Type": "text/plain"})


def _k(value: str) -> Case:
    def case(c: TestClient, gid: int, _: Path) -> Any:
        return c.post(search_url(gid), files=upload("q.jpg", jpeg_bytes(1)), data={"k": value})

    return case


def _k_by_item(c: TestClient, gid: int, _: Path) -> Any:
    item = c.get(f"/v1/galleries/{gid}/items").json()["items"][0]["id"]
    return c.post(f"/v1/galleries/{gid}/search-by-item", json={"item_id": item, "k": 10**9})


def _unknown_gallery(c: TestClient, gid: int, _: Path) -> Any:
    return c.post(search_url(987_654), files=upload("q.jpg", jpeg_bytes(1)))


def _unknown_model_gallery(c: TestClient, gid: int, _: Path) -> Any:
    return c.post("/v1/galleries", json={"name": "no-model", "model": "giraffe"})


def _unknown_model(c: TestClient, gid: int, _: Path) -> Any:
    return c.get("/v1/models/giraffe")


def _outside_roots(c: TestClient, gid: int, tmp: Path) -> Any:
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    return ingest(c, gid, str(outside))


def _evaluation_outside_roots(c: TestClient, gid: int, tmp: Path) -> Any:
    dataset = {"layout": "market1501", "root": "/"}
    return c.post("/v1/evaluations", json={"model": "person", "dataset": dataset})


def _symlink_escape(c: TestClient, gid: int, tmp: Path) -> Any:
    roots = c.app.state.settings.dataset_roots
    link = roots[0] / "bad-input-escape"
    if not link.is_symlink():
        link.symlink_to(tmp, target_is_directory=True)
    return ingest(c, gid, str(link))


def _dot_dot(c: TestClient, gid: int, tmp: Path) -> Any:
    return ingest(c, gid, "market/../../" + tmp.name)


def _nul_byte(c: TestClient, gid: int, tmp: Path) -> Any:
    return ingest(c, gid, "market\x00/gallery")


def _symlink_loop(c: TestClient, gid: int, tmp: Path) -> Any:
    root = c.app.state.settings.dataset_roots[0]
    a, b = root / "bad-input-loop-a", root / "bad-input-loop-b"
    if not a.is_symlink():
        a.symlink_to(b)
        b.symlink_to(a)
    return ingest(c, gid, str(a))


def _unknown_home(c: TestClient, gid: int, tmp: Path) -> Any:
    return ingest(c, gid, "~no-such-user-here/market")


def _name_too_long(c: TestClient, gid: int, tmp: Path) -> Any:
    return ingest(c, gid, "market/" + "x" * 5000)


CASES: dict[str, tuple[Case, int, str, str]] = {
    # name: (request, status, problem type, words the detail must contain). The last four are the
    # path tricks whose Python error differs between versions (RuntimeError, OSError, or simply no
    # such folder): all must be a 422 about the dataset path, none a 500.
    "truncated JPEG": (_truncated_jpeg, 422, "undecodable-image", "truncated"),
    "PNG bomb": (_png_bomb, 413, "image-too-large", "7000x7000"),
    "PNG bomb past Pillow's guard": (_huge_png_bomb, 413, "image-too-large", "too large"),
    "text file named .jpg": (_text_named_jpg, 415, "unsupported-image", "by its content"),
    "0-byte upload": (_empty_upload, 415, "unsupported-image", "0 bytes"),
    "oversized body": (_oversized_body, 413, "body-too-large", str(MAX_BODY)),
    "JSON sent to an upload endpoint": (_json_to_upload_endpoint, 415, "unsupported-media-type", "multipart"),
    "text sent to a JSON endpoint": (
        _text_to_json_endpoint,
        415,
        "unsupported-media-type",
        "application/json",
    ),
    "k = 0": (_k("0"), 422, "validation", "between 1 and 100"),
    "k = 10^9": (_k(str(10**9)), 422, "validation", "between 1 and 100"),
    "k = 10^9 by item": (_k_by_item, 422, "validation", "between 1 and 100"),
    "unknown gallery": (_unknown_gallery, 404, "not-found", "987654"),
    "unknown model for a gallery": (_unknown_model_gallery, 422, "unknown-model", "served"),
    "unknown model": (_unknown_model, 404, "model-not-found", "giraffe"),
    "dataset outside the roots": (_outside_roots, 403, "dataset-path-forbidden", "outside"),
    "evaluation outside the roots": (_evaluation_outside_roots, 403, "dataset-path-forbidden", "outside"),
    "symbolic link out of a root": (_symlink_escape, 403, "dataset-path-forbidden", "outside"),
    "'..' in a dataset path": (_dot_dot, 403, "dataset-path-forbidden", "'..'"),
    "NUL byte in a dataset path": (_nul_byte, 422, "dataset-path-invalid", "dataset path"),
    "symbolic-link loop": (_symlink_loop, 422, "dataset-path-invalid", "dataset path"),
    # Not expanded at all: whether the user exists is nobody's business.
    "'~user' of nobody": (_unknown_home, 403, "dataset-path-forbidden", "'~'"),
    "dataset path too long": (_name_too_long, 422, "dataset-path-invalid", "dataset path"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_its_problem_and_the_service_stays_healthy(
    service: tuple[TestClient, int, Path], name: str
) -> None:
    client, gid, tmp = service
    make, status, slug, words = CASES[name]
    r = make(client, gid, tmp)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["type"] == f"/problems/{slug}" and body["title"]
    assert words.lower() in body["detail"].lower(), body["detail"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    assert_healthy(client, gid)


def test_no_job_was_created_by_any_refused_request(service: tuple[TestClient, int, Path]) -> None:
    client, _, _ = service
    assert client.get("/v1/jobs").json()["items"] == []


def test_nul_characters_never_reach_the_database_as_a_500(client: TestClient) -> None:
    """PostgreSQL text cannot hold NUL: filters and fields carrying one are a 4xx there, never a 500
    (SQLite stores and compares them, so there a filter simply matches nothing)."""
    gid = client.post("/v1/galleries", json={"name": "nul", "model": "person"}).json()["id"]
    filters = [
        (f"/v1/galleries/{gid}/items", {"identity": "a\x00b"}),
        ("/v1/jobs", {"kind": "ingest\x00"}),
        ("/v1/evaluations", {"model": "person\x00"}),
    ]
    for url, params in filters:
        r = client.get(url, params=params)
        if r.status_code != 200:
            assert r.status_code == 422 and r.headers["content-type"].startswith(PROBLEM), r.text
        else:
            assert r.json()["items"] == []
    r = client.post("/v1/galleries", json={"name": "spec", "model": "person", "index_spec": "fl\x00at"})
    assert r.status_code == 422 and r.json()["type"] == "/problems/validation"
    r = client.post(
        f"/v1/galleries/{gid}/items",
        files=[("image", ("a.jpg", jpeg_bytes(9), "image/jpeg"))],
        data={"identity": "a\x00b"},
    )
    assert r.status_code == 422 and "NUL" in r.json()["detail"]
    r = client.post(
        f"/v1/galleries/{gid}/items",
        files=[("image", ("a.jpg", jpeg_bytes(9), "image/jpeg"))],
        data={"camera": "c" * 201},
    )
    assert r.status_code == 422 and "200 characters" in r.json()["detail"]
    assert client.get("/health/ready").status_code == 200
