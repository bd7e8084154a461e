"""The service on the Milvus backend (milvus-lite, a local file under the test's folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import jpeg_bytes, make_settings, wait_for_job
from tests.service.test_recovery import assert_index_matches_database, upload

pytest.importorskip("pymilvus", reason="the milvus extra is not installed")
pytestmark = pytest.mark.milvus


def test_milvus_backend_end_to_end(
    tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path, market_root: Path
) -> None:
    settings = make_settings(
        tmp_path,
        database_url,
        model_dirs,
        datasets_root,
        index_backend="milvus",
        milvus_uri=str(tmp_path / "milvus.db"),
    )
    deleted: set[int] = set()
    with TestClient(create_app(settings)) as c:
        gid = c.post("/v1/galleries", json={"name": "g", "model": "person"}).json()["id"]
        assert c.get(f"/v1/galleries/{gid}").json()["index"]["backend"] == "milvus"
        ids = upload(c, gid, [1, 2, 3])
        r = c.post(
            f"/v1/galleries/{gid}/items",
            data={"camera": "cam-9", "identity": "z"},
            files=[("image", ("4.jpg", jpeg_bytes(4), "image/jpeg"))],
        )
        cam9 = r.json()["items"][0]["id"]
        files = [("image", ("q.jpg", jpeg_bytes(2), "image/jpeg"))]
        hits = c.post(f"/v1/galleries/{gid}/search", files=files, data={"k": "2"}).json()["queries"][0][
            "results"
        ]
        assert hits[0]["item_id"] == ids[1]
        hits = c.post(f"/v1/galleries/{gid}/search", files=files, data={"k": "5", "cameras": "cam-9"}).json()
        assert [h["item_id"] for h in hits["queries"][0]["results"]] == [cam9]
        assert c.delete(f"/v1/galleries/{gid}/items/{ids[0]}").status_code == 204
        deleted.add(ids[0])
        job = wait_for_job(
            c,
            c.post(
                f"/v1/galleries/{gid}/ingest-jobs",
                json={"source": {"layout": "market1501", "root": str(market_root)}},
            ).headers["location"],
        )
        assert job["status"] == "succeeded", job
        assert_index_matches_database(c, gid, deleted)

    # Restart: the collection and its snapshot manifest are reused, then the log is replayed.
    with TestClient(create_app(settings)) as c:
        assert_index_matches_database(c, gid, deleted)
        more = upload(c, gid, [5])
        assert c.delete(f"/v1/galleries/{gid}/items/{more[0]}").status_code == 204
        deleted.add(more[0])

    # Without the snapshot the collection is rebuilt from the database.
    shutil.rmtree(settings.data_dir / "snapshots")
    with TestClient(create_app(settings)) as c:
        assert_index_matches_database(c, gid, deleted)
        assert c.delete(f"/v1/galleries/{gid}").status_code == 204
