"""Every path a client names stays inside the dataset roots, and no answer leaks server paths or files.

Through the real app: a manifest option naming a file outside the roots, a manifest inside a root
listing images outside it (ingestion and evaluation), '~' in a path, and the 403 text itself.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.service.test_api import create_gallery

SECRET_LINE = "root:$6$not-a-real-hash:19000:0:99999:7:::"


@pytest.fixture()
def secret_file(tmp_path: Path) -> Path:
    """A file outside every dataset root, with a first line nobody may read through the API."""
    path = tmp_path / "outside" / "shadow"
    path.parent.mkdir()
    path.write_text(SECRET_LINE + "\n")
    return path


def _ingest(client: TestClient, gid: int, source: dict) -> object:
    return client.post(f"/v1/galleries/{gid}/ingest-jobs", json={"source": source})


def _assert_no_leak(response: object, *secrets: str) -> None:
    text = response.text  # type: ignore[attr-defined]
    for secret in secrets:
        assert secret not in text, text


def test_a_manifest_outside_the_roots_is_refused_without_reading_it(client, datasets_root, secret_file):
    (datasets_root / "empty").mkdir(exist_ok=True)
    gid = create_gallery(client)["id"]
    for manifest in (str(secret_file), "../" * 8 + str(secret_file).lstrip("/")):
        r = _ingest(client, gid, {"layout": "folder", "root": "empty", "options": {"manifest": manifest}})
        assert r.status_code == 403, r.text
        assert r.json()["type"].endswith("dataset-path-forbidden")
        _assert_no_leak(r, SECRET_LINE, "root:", str(datasets_root))
    # Whether a path outside exists is not revealed either: the same answer for a missing file.
    missing = _ingest(
        client,
        gid,
        {"layout": "folder", "root": "empty", "options": {"manifest": str(secret_file) + ".nope"}},
    )
    assert missing.status_code == 403
    existing = _ingest(
        client, gid, {"layout": "folder", "root": "empty", "options": {"manifest": str(secret_file)}}
    )
    assert missing.json()["detail"] == existing.json()["detail"]


def _manifest_listing(folder: Path, images: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "manifest.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "identity", "camera", "split"])
        for i, image in enumerate(images):
            writer.writerow([str(image), f"{i // 2:04d}", f"c{i % 2}", "query" if i % 2 else "gallery"])
    return path


@pytest.fixture()
def outside_images(tmp_path: Path, market_root: Path) -> list[Path]:
    """Real crops copied to a folder outside the roots."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    sources = sorted((market_root / "bounding_box_test").glob("*.jpg"))[:6]
    return [Path(shutil.copy(p, outside / p.name)) for p in sources]


def test_ingestion_and_evaluation_refuse_a_manifest_listing_images_outside(
    client, datasets_root, outside_images
):
    _manifest_listing(datasets_root / "leaky", outside_images)
    source = {
        "layout": "folder",
        "root": "leaky",
        "split": "gallery",
        "options": {"manifest": "manifest.csv"},
    }
    gid = create_gallery(client)["id"]
    r = _ingest(client, gid, source)
    assert r.status_code == 403 and "outside the allowed dataset roots" in r.json()["detail"], r.text
    e = client.post(
        "/v1/evaluations",
        json={
            "model": "person",
            "dataset": {"layout": "folder", "root": "leaky", "options": {"manifest": "manifest.csv"}},
        },
    )
    assert e.status_code == 403, e.text
    _assert_no_leak(e, str(outside_images[0].parent))


def test_home_folders_are_not_expanded_and_403s_print_no_server_path(client, datasets_root):
    gid = create_gallery(client)["id"]
    for root in ("~root", "~/data", "~nobody-here/x"):
        r = _ingest(client, gid, {"layout": "market1501", "root": root})
        assert r.status_code == 403 and "'~'" in r.json()["detail"], r.text
    r = _ingest(client, gid, {"layout": "market1501", "root": "/etc"})
    assert r.status_code == 403
    _assert_no_leak(r, str(datasets_root), str(datasets_root.resolve()))


def test_parser_errors_name_paths_relative_to_the_root(client, datasets_root):
    (datasets_root / "not-market").mkdir(exist_ok=True)
    gid = create_gallery(client)["id"]
    r = _ingest(client, gid, {"layout": "market1501", "root": "not-market"})
    assert r.status_code == 422, r.text
    assert "not-market" in r.json()["detail"]
    _assert_no_leak(r, str(datasets_root), str(datasets_root.resolve()))
