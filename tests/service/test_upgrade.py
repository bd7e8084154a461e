"""Model upgrade: re-embed into a standby index while searches go on, switch atomically, switch back."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import ModelSpec
from tests.service.conftest import jpeg_bytes, make_settings, wait_for_job
from tests.service.test_recovery import assert_index_matches_database, upload


def self_match(client: TestClient, gid: int, seed: int) -> int:
    files = [("image", ("q.jpg", jpeg_bytes(seed), "image/jpeg"))]
    r = client.post(f"/v1/galleries/{gid}/search", files=files, data={"k": "1"})
    assert r.status_code == 200, r.text
    return r.json()["queries"][0]["results"][0]["item_id"]


def test_reembed_switch_and_switch_back(
    tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path, market_root: Path
) -> None:
    settings = make_settings(
        tmp_path,
        database_url,
        model_dirs,
        datasets_root,
        models=[
            ModelSpec("person", model_dirs["person"]),
            ModelSpec("person", model_dirs["person_v2"]),
            ModelSpec("vehicle", model_dirs["vehicle"]),
        ],
        ingest_batch_size=4,
    )
    with TestClient(create_app(settings)) as c:
        versions = {m["version"]: m["default"] for m in c.get("/v1/models").json() if m["name"] == "person"}
        assert len(versions) == 2
        v1 = next(v for v, default in versions.items() if not default)
        v2 = next(v for v, default in versions.items() if default)
        gallery = c.post("/v1/galleries", json={"name": "g", "model": "person", "version": v1}).json()
        gid = gallery["id"]
        assert gallery["model_version"] == v1
        ids = upload(c, gid, [1, 2, 3])
        job = wait_for_job(
            c,
            c.post(
                f"/v1/galleries/{gid}/ingest-jobs",
                json={"source": {"layout": "market1501", "root": str(market_root)}},
            ).headers["location"],
        )
        assert job["status"] == "succeeded"

        r = c.post(f"/v1/galleries/{gid}/reembed-jobs", json={"model": "vehicle"})
        assert r.status_code == 422
        r = c.post(f"/v1/galleries/{gid}/reembed-jobs", json={"model": "person", "version": v1})
        assert r.status_code == 409
        assert c.post(f"/v1/galleries/{gid}/switch-model").status_code == 409  # nothing to switch to

        # Searches keep answering (and finding the right item) while the job runs.
        errors: list[str] = []
        stop = threading.Event()

        def searcher() -> None:
            while not stop.is_set():
                if self_match(c, gid, 2) != ids[1]:
                    errors.append("wrong top-1 during the upgrade")

        thread = threading.Thread(target=searcher)
        thread.start()
        try:
            r = c.post(f"/v1/galleries/{gid}/reembed-jobs", json={"model": "person"})
            assert r.status_code == 202, r.text
            job = wait_for_job(c, r.headers["location"])
        finally:
            stop.set()
            thread.join()
        assert job["status"] == "succeeded", job
        assert job["done"] == job["total"] == c.get(f"/v1/galleries/{gid}").json()["count"]
        assert not errors

        gallery = c.get(f"/v1/galleries/{gid}").json()
        assert gallery["model_version"] == v2
        assert gallery["standby"] == {"model": "person", "model_version": v1, "ready": True}
        assert self_match(c, gid, 3) == ids[2]
        assert (
            c.post(
                f"/v1/galleries/{gid}/search",
                files=[("image", ("q.jpg", jpeg_bytes(3), "image/jpeg"))],
                data={"k": "1"},
            ).json()["model_version"]
            == v2
        )

        # Added after the switch: embedded by both models, so switching back keeps it searchable.
        new = upload(c, gid, [50])[0]
        assert c.delete(f"/v1/galleries/{gid}/items/{ids[0]}").status_code == 204
        back = c.post(f"/v1/galleries/{gid}/switch-model", json={"version": v1})
        assert back.status_code == 200 and back.json()["model_version"] == v1
        assert self_match(c, gid, 50) == new
        assert_index_matches_database(c, gid, {ids[0]})

    # After a restart both indexes are there again.
    with TestClient(create_app(settings)) as c:
        assert_index_matches_database(c, gid, {ids[0]})
        assert c.post(f"/v1/galleries/{gid}/switch-model").json()["model_version"] == v2
        assert_index_matches_database(c, gid, {ids[0]})
        assert c.delete(f"/v1/galleries/{gid}/standby").status_code == 204
        assert c.get(f"/v1/galleries/{gid}").json()["standby"] is None
        assert c.post(f"/v1/galleries/{gid}/switch-model").status_code == 409
        assert self_match(c, gid, 50) == new
