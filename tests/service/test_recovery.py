"""Nothing acknowledged is lost: snapshots + log replay, rebuilds, and a server killed mid-ingestion."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.service.conftest import jpeg_bytes


def upload(client: TestClient | httpx.Client, gallery_id: int, seeds: list[int]) -> list[int]:
    files = [("image", (f"{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in seeds]
    r = client.post(f"/v1/galleries/{gallery_id}/items", files=files, data={"identity": "u"})
    assert r.status_code == 201, r.text
    return [i["id"] for i in r.json()["items"]]


def active_items(client: TestClient | httpx.Client, gallery_id: int) -> list[dict]:
    items, cursor = [], None
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/galleries/{gallery_id}/items", params=params).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def assert_index_matches_database(
    client: TestClient | httpx.Client, gallery_id: int, deleted: set[int]
) -> None:
    """Every active item finds itself first; deleted items are never returned; no duplicates."""
    items = active_items(client, gallery_id)
    ids = {i["id"] for i in items}
    assert not ids & deleted
    hashes = [i["content_hash"] for i in items]
    assert len(hashes) == len(set(hashes)), "an image was stored twice"
    gallery = client.get(f"/v1/galleries/{gallery_id}").json()
    assert gallery["count"] == len(items) == gallery["index"]["size"]
    for item in items:
        r = client.post(
            f"/v1/galleries/{gallery_id}/search-by-item",
            json={"item_id": item["id"], "k": len(items) + 5, "exclude_self": False},
        )
        assert r.status_code == 200, r.text
        found = [h["item_id"] for h in r.json()["queries"][0]["results"]]
        assert found[0] == item["id"]
        assert set(found) == ids and not set(found) & deleted


def operation_seqs(settings: Settings) -> list[int]:
    from sqlalchemy import select

    from service.db.session import create_db_engine
    from service.db.tables import Operation

    engine = create_db_engine(settings.resolved_database_url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(select(Operation.seq).order_by(Operation.seq)))
    finally:
        engine.dispose()


def test_snapshot_replay_and_rebuild(settings: Settings) -> None:
    snapshot_dir = settings.data_dir / "snapshots"
    deleted: set[int] = set()
    with TestClient(create_app(settings)) as c:
        gid = c.post("/v1/galleries", json={"name": "g", "model": "person"}).json()["id"]
        first = upload(c, gid, [1, 2, 3, 4])
        assert c.delete(f"/v1/galleries/{gid}/items/{first[0]}").status_code == 204
        deleted.add(first[0])
    folder = snapshot_dir / "g1-m1"
    assert (folder / "manifest.json").is_file()  # written at shutdown
    old_snapshot = snapshot_dir.parent / "old-snapshot"
    shutil.copytree(folder, old_snapshot)

    with TestClient(create_app(settings)) as c:
        assert c.get(f"/v1/galleries/{gid}").json()["last_snapshot"]["count"] == 3
        assert_index_matches_database(c, gid, deleted)
        upload(c, gid, [5, 6])
        assert c.delete(f"/v1/galleries/{gid}/items/{first[1]}").status_code == 204
        deleted.add(first[1])

    # The older of the two recorded snapshots is still usable, so only the operations it holds
    # (4 adds and 1 delete) were pruned from the log.
    assert operation_seqs(settings) == [6, 7, 8]

    # An older snapshot: the operations after its last_seq (2 adds, 1 delete) are replayed.
    shutil.rmtree(folder)
    shutil.copytree(old_snapshot, folder)
    with TestClient(create_app(settings)) as c:
        assert_index_matches_database(c, gid, deleted)

    # A corrupt snapshot: rebuilt from the stored embeddings.
    data_file = next(p for p in folder.iterdir() if p.name.startswith("index-"))
    data_file.write_bytes(data_file.read_bytes()[:-16] + b"\0" * 16)
    with TestClient(create_app(settings)) as c:
        assert_index_matches_database(c, gid, deleted)

    # No snapshot at all: rebuilt as well.
    shutil.rmtree(folder)
    with TestClient(create_app(settings)) as c:
        assert_index_matches_database(c, gid, deleted)
        upload(c, gid, [7])
        assert_index_matches_database(c, gid, deleted)
    # Sequence numbers keep growing after pruning emptied the log (a snapshot's last_seq relies on it).
    assert operation_seqs(settings) and min(operation_seqs(settings)) > 8


# --------------------------------------------------------------------------- a real server, SIGKILLed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def reid_serve(
    args: list[str], env: dict[str, str], log: Path
) -> Iterator[tuple[subprocess.Popen, httpx.Client]]:
    """`reid serve` in its own process group; yields once /health/ready answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "reid_cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"reid serve exited early:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(httpx.TransportError):
                if client.get("/health/ready").status_code == 200:
                    break
            assert time.monotonic() < deadline, f"reid serve did not become ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield proc, client
    finally:
        client.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.mark.slow
def test_sigkill_mid_ingestion_loses_nothing(
    tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path, market_root: Path
) -> None:
    args = [
        "--model",
        f"person={model_dirs['person']}",
        "--database-url",
        database_url,
        "--data-dir",
        str(tmp_path / "data"),
        "--dataset-root",
        str(datasets_root),
        "--device",
        "cpu",
    ]
    slow = {
        "REID_INGEST_BATCH_SIZE": "3",
        "REID_INGEST_BATCH_PAUSE_S": "0.4",
        "REID_SNAPSHOT_INTERVAL_S": "0.3",
        "REID_DECODE_THREADS": "2",
    }
    log = tmp_path / "serve.log"
    deleted: set[int] = set()
    with reid_serve(args, slow, log) as (proc, c):
        gid = c.post("/v1/galleries", json={"name": "g", "model": "person"}).json()["id"]
        uploaded = upload(c, gid, [101, 102, 103])
        assert c.delete(f"/v1/galleries/{gid}/items/{uploaded[0]}").status_code == 204
        deleted.add(uploaded[0])
        r = c.post(
            f"/v1/galleries/{gid}/ingest-jobs",
            json={"source": {"layout": "market1501", "root": str(market_root)}},
        )
        assert r.status_code == 202
        job_url = r.headers["location"]
        deadline = time.monotonic() + 60
        while True:
            job = c.get(job_url).json()
            snap = c.get(f"/v1/galleries/{gid}").json()["last_snapshot"]
            if job["done"] >= 6 and snap is not None and snap["count"] >= 5:
                break
            assert job["status"] == "running" or job["status"] == "queued", job
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        ingested = [i for i in active_items(c, gid) if i["source_path"]]
        assert c.delete(f"/v1/galleries/{gid}/items/{ingested[0]['id']}").status_code == 204
        deleted.add(ingested[0]["id"])
        acknowledged = {i["id"] for i in active_items(c, gid)}
        total = job["total"]
        assert c.get(job_url).json()["status"] == "running"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    with reid_serve(args, {"REID_INGEST_BATCH_SIZE": "8"}, log) as (_, c):
        job = c.get(job_url).json()
        deadline = time.monotonic() + 60
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
            job = c.get(job_url).json()
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        items = active_items(c, gid)
        ids = {i["id"] for i in items}
        assert acknowledged <= ids, "an acknowledged item was lost"
        # Each gallery image once, except the deleted one, which the resumed job does not bring back.
        ingested_paths = [i["source_path"] for i in items if i["source_path"]]
        assert len(ingested_paths) == len(set(ingested_paths)) == total - 1
        assert ingested[0]["source_path"] not in ingested_paths
        assert_index_matches_database(c, gid, deleted)


def test_snapshot_of_a_deleted_gallery_is_never_loaded(settings: Settings) -> None:
    snapshot_dir = settings.data_dir / "snapshots"
    with TestClient(create_app(settings)) as c:
        gid = c.post("/v1/galleries", json={"name": "a", "model": "person"}).json()["id"]
        upload(c, gid, [1, 2, 3])
    stale = snapshot_dir.parent / "stale"
    shutil.copytree(snapshot_dir / f"g{gid}-m1", stale)
    with TestClient(create_app(settings)) as c:
        assert c.delete(f"/v1/galleries/{gid}").status_code == 204
        assert not (snapshot_dir / f"g{gid}-m1").exists()
        new = c.post("/v1/galleries", json={"name": "b", "model": "person"}).json()["id"]
    # As if the folder had outlived its gallery (a crash between the database delete and the
    # folder removal). SQLite hands the freed id to the next gallery, so the folder has its name.
    shutil.rmtree(snapshot_dir / f"g{new}-m1", ignore_errors=True)
    shutil.copytree(stale, snapshot_dir / f"g{new}-m1")
    with TestClient(create_app(settings)) as c:
        gallery = c.get(f"/v1/galleries/{new}").json()
        assert gallery["count"] == 0 and gallery["index"]["size"] == 0
        assert_index_matches_database(c, new, set())
