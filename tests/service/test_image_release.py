"""Stored upload bytes go when the last active item using them does (issue 18, item 3), never sooner.

Through the real app (SQLite and PostgreSQL): deleting items and galleries, uploads of the same
content in two galleries, ingested files (never removed: they are the data set's), the orphan
sweep, and both orders of a release racing an upload of the same content.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect

from service import image_release
from service.db import migrate
from service.db.session import create_db_engine
from service.db.tables import Item
from service.imaging.store import ImageStore
from tests.service.conftest import jpeg_bytes, wait_for_job


def gallery(client: TestClient, name: str = "door") -> int:
    r = client.post("/v1/galleries", json={"name": name, "model": "person"})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def upload(client: TestClient, gid: int, *seeds: int) -> list[dict[str, Any]]:
    files = [("image", (f"{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in seeds]
    r = client.post(f"/v1/galleries/{gid}/items", files=files)
    assert r.status_code == 201, r.text
    return list(r.json()["items"])


def store(client: TestClient) -> ImageStore:
    return client.app.state.service.images


def stored_file(client: TestClient, item: dict[str, Any]) -> Path:
    return store(client).path_for(item["content_hash"], "JPEG")


def thumbnails(client: TestClient, item: dict[str, Any]) -> list[Path]:
    h = item["content_hash"]
    return list((store(client).thumbs / h[:2]).glob(f"{h}-*.jpg"))


def test_deleting_the_last_item_of_a_content_removes_its_bytes_and_thumbnails(client: TestClient) -> None:
    g1, g2 = gallery(client, "g1"), gallery(client, "g2")
    a1, b1 = upload(client, g1, 1, 2)
    (a2,) = upload(client, g2, 1)  # the same pixels in another gallery: one stored file
    assert stored_file(client, a1) == stored_file(client, a2) and stored_file(client, a1).is_file()
    for item, gid in ((a1, g1), (a2, g2)):
        assert client.get(f"/v1/galleries/{gid}/items/{item['id']}/thumbnail").status_code == 200
    assert thumbnails(client, a1)

    assert client.delete(f"/v1/galleries/{g1}/items/{a1['id']}").status_code == 204
    # g2's item still uses the bytes: they stay, and so does what it serves.
    assert stored_file(client, a1).is_file() and thumbnails(client, a1)
    assert client.get(f"/v1/galleries/{g2}/items/{a2['id']}/image").content == jpeg_bytes(1)
    assert client.get(f"/v1/galleries/{g1}/items/{a1['id']}/image").status_code == 404

    assert client.delete(f"/v1/galleries/{g2}/items/{a2['id']}").status_code == 204
    assert not stored_file(client, a1).exists()
    assert not thumbnails(client, a1)
    assert client.get(f"/v1/galleries/{g2}/items/{a2['id']}/thumbnail").status_code == 404
    # Other contents are untouched, and nothing is left beside the stored files.
    assert client.get(f"/v1/galleries/{g1}/items/{b1['id']}/image").content == jpeg_bytes(2)
    assert [p.name for p in store(client).images.rglob("*") if p.is_file()] == [stored_file(client, b1).name]


def test_deleting_a_gallery_removes_the_bytes_only_it_used(client: TestClient) -> None:
    g1, g2 = gallery(client, "g1"), gallery(client, "g2")
    only_g1, shared = upload(client, g1, 3, 4)
    (shared_g2,) = upload(client, g2, 4)
    assert client.delete(f"/v1/galleries/{g1}").status_code == 204
    assert not stored_file(client, only_g1).exists()
    assert stored_file(client, shared).is_file()
    assert client.get(f"/v1/galleries/{g2}/items/{shared_g2['id']}/image").content == jpeg_bytes(4)


def test_deleting_an_ingested_item_leaves_the_data_sets_file(client: TestClient, market_root: Path) -> None:
    gid = gallery(client)
    r = client.post(
        f"/v1/galleries/{gid}/ingest-jobs",
        json={"source": {"layout": "market1501", "root": str(market_root), "split": "gallery"}},
    )
    assert r.status_code == 202, r.text
    assert wait_for_job(client, r.headers["location"])["status"] == "succeeded"
    item = client.get(f"/v1/galleries/{gid}/items", params={"limit": 1}).json()["items"][0]
    with client.app.state.service.sessions() as session:
        path = Path(session.get(Item, item["id"]).source_path)
    before = path.read_bytes()
    assert client.get(f"/v1/galleries/{gid}/items/{item['id']}/thumbnail").status_code == 200
    assert client.delete(f"/v1/galleries/{gid}/items/{item['id']}").status_code == 204
    assert path.read_bytes() == before
    assert not thumbnails(client, item)  # the cached thumbnail is the service's: it goes


def test_the_sweep_removes_old_orphans_only(client: TestClient) -> None:
    gid = gallery(client)
    (kept,) = upload(client, gid, 5)
    images = store(client)
    orphan = images.put(jpeg_bytes(6), "f" * 64, "JPEG")  # stored, its item never committed
    young = images.put(jpeg_bytes(7), "e" * 64, "JPEG")
    leftover = orphan.with_name(f".{orphan.name}.withdrawn-0")  # a release that died half-way
    leftover.write_bytes(b"x")
    old = time.time() - 2 * image_release.ORPHAN_MIN_AGE_S
    for path in (orphan, leftover, stored_file(client, kept)):
        os.utime(path, (old, old))

    removed = image_release.sweep_orphans(client.app.state.service.sessions, images)
    assert removed == 1
    assert not orphan.exists() and not leftover.exists()
    assert young.is_file()  # may belong to an upload still on its way to its commit
    assert client.get(f"/v1/galleries/{gid}/items/{kept['id']}/image").content == jpeg_bytes(5)


def test_an_upload_committing_between_the_releases_checks_keeps_its_bytes(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release's first check saw no item; an upload of the same content then committed (and
    found its bytes there) before the withdrawal: the second check sees it and puts them back."""
    gid = gallery(client)
    (first,) = upload(client, gid, 8)
    images = store(client)
    real_withdraw = images.withdraw
    uploaded: list[dict[str, Any]] = []

    def upload_then_withdraw(content_hash: str, image_format: str) -> Path | None:
        monkeypatch.setattr(images, "withdraw", real_withdraw)
        uploaded.extend(upload(client, gid, 8))  # the same content, committed and answered
        return real_withdraw(content_hash, image_format)

    monkeypatch.setattr(images, "withdraw", upload_then_withdraw)
    assert client.delete(f"/v1/galleries/{gid}/items/{first['id']}").status_code == 204
    assert uploaded and stored_file(client, first).is_file()
    assert client.get(f"/v1/galleries/{gid}/items/{uploaded[0]['id']}/image").content == jpeg_bytes(8)


def test_an_upload_whose_bytes_a_release_removed_before_its_commit_stores_them_again(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release ran entirely between the upload's store and its commit: the upload writes again."""
    gid = gallery(client)
    (first,) = upload(client, gid, 9)
    assert client.delete(f"/v1/galleries/{gid}/items/{first['id']}").status_code == 204
    state = client.app.state.service
    real_add = state.writer.add

    def release_then_add(*args: Any, **kwargs: Any) -> Any:
        # The bytes were stored by this very request; nothing active refers to them yet.
        assert (
            image_release.release(
                state.sessions, state.images, [image_release.Content(first["content_hash"], "JPEG", True)]
            )
            == 1
        )
        return real_add(*args, **kwargs)

    monkeypatch.setattr(state.writer, "add", release_then_add)
    (again,) = upload(client, gid, 9)
    assert client.get(f"/v1/galleries/{gid}/items/{again['id']}/image").content == jpeg_bytes(9)


def test_migration_0004_adds_and_drops_the_content_hash_index(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        migrate.upgrade(engine, "0004")
        assert "ix_items_content_hash" in {i["name"] for i in inspect(engine).get_indexes("items")}
        migrate.downgrade(engine, "0003")
        assert "ix_items_content_hash" not in {i["name"] for i in inspect(engine).get_indexes("items")}
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()
