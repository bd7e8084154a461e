"""The API through the real app (lifespan included), on SQLite and PostgreSQL."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import jpeg_bytes, make_settings, wait_for_job

PROBLEM = "application/problem+json"


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    assert body["title"] and body["type"] and body["instance"]
    assert "Traceback" not in response.text
    return body


def create_gallery(client: TestClient, name: str = "lobby", model: str = "person") -> dict:
    r = client.post("/v1/galleries", json={"name": name, "model": model})
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/v1/galleries/{r.json()['id']}"
    return r.json()


def upload(client: TestClient, gallery_id: int, seeds: list[int], **data) -> list[dict]:
    files = [("image", (f"{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in seeds]
    r = client.post(f"/v1/galleries/{gallery_id}/items", files=files, data=data)
    assert r.status_code == 201, r.text
    return r.json()["items"]


def search(client: TestClient, gallery_id: int, seeds: list[int], **data) -> list[list[dict]]:
    files = [("image", (f"q{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in seeds]
    r = client.post(f"/v1/galleries/{gallery_id}/search", files=files, data=data)
    assert r.status_code == 200, r.text
    return [q["results"] for q in r.json()["queries"]]


def ingest(client: TestClient, gallery_id: int, root: Path, **headers) -> tuple[str, dict]:
    r = client.post(
        f"/v1/galleries/{gallery_id}/ingest-jobs",
        json={"source": {"layout": "market1501", "root": str(root), "split": "gallery"}},
        headers=headers,
    )
    assert r.status_code == 202, r.text
    return r.headers["location"], r.json()


def test_health_and_models(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "ok"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"models": True, "indexes": True, "jobs": True, "database": True}
    models = client.get("/v1/models").json()
    assert {(m["name"], m["kind"]) for m in models} == {("person", "person"), ("vehicle", "vehicle")}
    person = client.get("/v1/models/person").json()
    assert len(person["version"]) == 12 and person["input_size"] == [64, 32] and person["default"]
    assert_problem(client.get("/v1/models/nobody"), 404)


def test_gallery_lifecycle_and_pagination(client: TestClient) -> None:
    created = [create_gallery(client, f"g{i}", "person" if i % 2 else "vehicle") for i in range(5)]
    assert created[0]["count"] == 0 and created[0]["model"] == "vehicle"
    assert created[1]["model_version"] == client.get("/v1/models/person").json()["version"]
    assert_problem(client.post("/v1/galleries", json={"name": "g0", "model": "person"}), 409)
    assert_problem(client.post("/v1/galleries", json={"name": "x", "model": "nobody"}), 422)
    assert_problem(
        client.post("/v1/galleries", json={"name": "x", "model": "person", "index_spec": "bogus"}), 422
    )
    assert client.get("/v1/galleries").json()["next_cursor"] is None

    seen, cursor = [], None
    while True:
        page = client.get(
            "/v1/galleries", params={"limit": 2, **({"cursor": cursor} if cursor else {})}
        ).json()
        seen += [g["id"] for g in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [g["id"] for g in created]
    assert_problem(client.get("/v1/galleries", params={"cursor": "garbage!"}), 400)

    gid = created[1]["id"]
    assert search(client, gid, [1], k=5) == [[]]  # an empty gallery answers with no results
    upload(client, gid, [1, 2])
    assert client.get(f"/v1/galleries/{gid}").json()["count"] == 2
    assert client.delete(f"/v1/galleries/{gid}").status_code == 204
    assert_problem(client.get(f"/v1/galleries/{gid}"), 404)
    assert_problem(client.delete(f"/v1/galleries/{gid}"), 404)
    # The name is free again and the new gallery starts empty.
    assert create_gallery(client, "g1")["count"] == 0


def test_items_upload_search_delete(client: TestClient) -> None:
    gid = create_gallery(client)["id"]
    items = upload(
        client,
        gid,
        [10, 11, 12],
        identity=["a", "b", "c"],
        camera="cam-1",
        captured_at=["2026-01-01T00:00:00Z", "1767225600", "2026-01-03T00:00:00+00:00"],
    )
    assert [i["identity"] for i in items] == ["a", "b", "c"]
    assert {i["camera"] for i in items} == {"cam-1"}
    assert items[1]["captured_at"].startswith("2026-01-01T00:00:00")
    more = upload(client, gid, [13], identity="d", camera="cam-2", captured_at="2026-02-01T00:00:00Z")

    # Searching with a stored image finds that very item first, with similarity ~1.
    for seed, item in zip([10, 11, 12, 13], [*items, *more], strict=True):
        top = search(client, gid, [seed], k=2)[0][0]
        assert top["item_id"] == item["id"] and top["score"] > 0.9999
        assert top["thumbnail_url"] == f"/v1/galleries/{gid}/items/{item['id']}/thumbnail"

    # One result list per query image, best first.
    results = search(client, gid, [12, 10], k=4)
    assert [r[0]["item_id"] for r in results] == [items[2]["id"], items[0]["id"]]
    assert all(
        len(r) == 4 and [h["score"] for h in r] == sorted((h["score"] for h in r), reverse=True)
        for r in results
    )

    # Filters: camera, time window, excluded identity.
    assert {h["camera"] for h in search(client, gid, [13], k=10, cameras="cam-1")[0]} == {"cam-1"}
    both = search(client, gid, [13], k=10, cameras="cam-1,cam-2")[0]
    assert both[0]["item_id"] == more[0]["id"] and len(both) == 4
    window = search(
        client, gid, [10], k=10, time_from="2026-01-01T12:00:00Z", time_to="2026-01-31T00:00:00Z"
    )[0]
    assert [h["identity"] for h in window] == ["c"]
    assert "a" not in {h["identity"] for h in search(client, gid, [10], k=10, exclude_identity="a")[0]}
    reranked = search(client, gid, [11], k=3, rerank="true")[0]
    assert reranked[0]["item_id"] == items[1]["id"] and len(reranked) == 3

    # Search by stored item excludes the item itself unless asked.
    by_item = client.post(
        f"/v1/galleries/{gid}/search-by-item", json={"item_id": items[0]["id"], "k": 10}
    ).json()
    assert items[0]["id"] not in [h["item_id"] for h in by_item["queries"][0]["results"]]
    by_item = client.post(
        f"/v1/galleries/{gid}/search-by-item", json={"item_id": items[0]["id"], "k": 1, "exclude_self": False}
    ).json()
    assert by_item["queries"][0]["results"][0]["item_id"] == items[0]["id"]

    # Get, list with filters, thumbnail, original.
    assert client.get(f"/v1/galleries/{gid}/items/{items[0]['id']}").json()["identity"] == "a"
    listed = client.get(f"/v1/galleries/{gid}/items", params={"camera": "cam-1", "limit": 2}).json()
    assert [i["id"] for i in listed["items"]] == [items[0]["id"], items[1]["id"]] and listed["next_cursor"]
    thumb = client.get(items[0]["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert client.get(f"/v1/galleries/{gid}/items/{items[0]['id']}/image").content == jpeg_bytes(10)

    # Deleted items are gone from search, listing and get; a second delete is a 404.
    assert client.delete(f"/v1/galleries/{gid}/items/{items[0]['id']}").status_code == 204
    assert items[0]["id"] not in [h["item_id"] for h in search(client, gid, [10], k=10)[0]]
    assert client.get(f"/v1/galleries/{gid}").json()["count"] == 3
    assert_problem(client.delete(f"/v1/galleries/{gid}/items/{items[0]['id']}"), 404)
    assert items[0]["id"] not in [i["id"] for i in client.get(f"/v1/galleries/{gid}/items").json()["items"]]
    everything = client.get(f"/v1/galleries/{gid}/items", params={"include_deleted": "true"}).json()["items"]
    assert {i["status"] for i in everything} == {"active", "deleted"}


def test_bad_requests_are_problems(client: TestClient, tmp_path: Path) -> None:
    gid = create_gallery(client)["id"]
    upload(client, gid, [1])
    url = f"/v1/galleries/{gid}/search"
    ok = [("image", ("q.jpg", jpeg_bytes(1), "image/jpeg"))]

    assert_problem(client.get("/no/such/route"), 404)
    assert_problem(client.put("/v1/galleries"), 405)
    body = assert_problem(client.post("/v1/galleries", json={"name": ""}), 422)
    assert {e["location"] for e in body["errors"]} >= {"body.name", "body.model"}
    assert_problem(client.post(url, data={"k": "3"}), 422)  # no image
    for k in ("0", "1000000000", "-1"):
        assert_problem(client.post(url, files=ok, data={"k": k}), 422)
    assert_problem(client.post(url, files=ok, data={"k": "ten"}), 422)
    assert_problem(client.post(url, files=[("image", ("x.jpg", b"hello, not an image", "image/jpeg"))]), 415)
    assert_problem(client.post(url, files=[("image", ("x.jpg", b"", "image/jpeg"))]), 415)
    assert_problem(client.post(url, files=[("image", ("x.jpg", jpeg_bytes(2)[:200], "image/jpeg"))]), 422)
    assert_problem(client.post(url, files=ok, data={"time_from": "yesterday"}), 422)
    assert_problem(client.post(url, files=ok, data={"time_from": "2026-02-01", "time_to": "2026-01-01"}), 422)
    assert_problem(client.post("/v1/galleries/999/search", files=ok), 404)
    assert_problem(client.post(f"/v1/galleries/{gid}/search-by-item", json={"item_id": 999}), 404)
    too_many = [("image", (f"{i}.jpg", jpeg_bytes(i), "image/jpeg")) for i in range(33)]
    assert_problem(client.post(url, files=too_many), 422)
    assert_problem(client.post(f"/v1/galleries/{gid}/items", files=ok, data={"identity": ["a", "b"]}), 422)
    assert_problem(client.get("/v1/jobs/12345"), 404)
    assert_problem(client.get("/v1/evaluations/12345"), 404)
    # Still healthy afterwards.
    assert client.get("/health/ready").status_code == 200


def test_dataset_paths_are_confined(client: TestClient, datasets_root: Path, tmp_path: Path) -> None:
    gid = create_gallery(client)["id"]
    outside = tmp_path / "outside"
    shutil.copytree(datasets_root / "market", outside)
    escape = datasets_root / "escape"
    if not escape.exists():
        escape.symlink_to(outside, target_is_directory=True)

    def post(root: str):
        return client.post(
            f"/v1/galleries/{gid}/ingest-jobs", json={"source": {"layout": "market1501", "root": root}}
        )

    assert_problem(post(str(outside)), 403)
    assert_problem(post(str(escape)), 403)  # a symbolic link leading out
    assert_problem(post(str(datasets_root / "market" / ".." / ".." / outside.name)), 403)
    assert_problem(post("../outside"), 403)
    assert_problem(post(str(datasets_root / "missing")), 422)
    r = client.post(f"/v1/galleries/{gid}/ingest-jobs", json={"source": {"layout": "nope", "root": "market"}})
    assert "available" in assert_problem(r, 422)["detail"]
    r = client.post(
        "/v1/evaluations", json={"model": "person", "dataset": {"layout": "market1501", "root": str(outside)}}
    )
    assert_problem(r, 403)
    assert client.get("/v1/jobs").json()["items"] == []


def test_ingest_job_idempotent_and_resumable(
    client: TestClient, market_root: Path, datasets_root: Path
) -> None:
    gid = create_gallery(client)["id"]
    location, accepted = ingest(client, gid, market_root, **{"Idempotency-Key": "ingest-1"})
    assert accepted["status"] in ("queued", "running") and location == f"/v1/jobs/{accepted['id']}"
    # The same key and request: the same job, not a second one.
    again_location, again = ingest(client, gid, market_root, **{"Idempotency-Key": "ingest-1"})
    assert again_location == location and again["id"] == accepted["id"]
    r = client.post(
        f"/v1/galleries/{gid}/ingest-jobs",
        headers={"Idempotency-Key": "ingest-1"},
        json={"source": {"layout": "market1501", "root": str(market_root), "split": "query"}},
    )
    assert_problem(r, 422)

    job = wait_for_job(client, location)
    assert job["status"] == "succeeded", job
    assert job["total"] == job["done"] > 0 and job["failed"] == 0 and job["skipped"] == 0
    assert job["rate"] > 0 and job["eta_s"] == 0.0
    count = client.get(f"/v1/galleries/{gid}").json()["count"]
    assert count == job["total"]

    # Running the same source again stores nothing twice.
    job2 = wait_for_job(client, ingest(client, gid, market_root)[0])
    assert job2["status"] == "succeeded" and job2["skipped"] == job2["total"] == count
    assert client.get(f"/v1/galleries/{gid}").json()["count"] == count

    # Every ingested item finds itself first (exact self-match of the stored embedding).
    items = client.get(f"/v1/galleries/{gid}/items", params={"limit": 1000}).json()["items"]
    for item in items[:5]:
        r = client.post(
            f"/v1/galleries/{gid}/search-by-item", json={"item_id": item["id"], "k": 1, "exclude_self": False}
        ).json()
        assert r["queries"][0]["results"][0]["item_id"] == item["id"]
    sources = {i["source_path"] for i in items}
    assert len(sources) == count and all(Path(s).is_file() for s in sources)

    listing = client.get("/v1/jobs", params={"gallery_id": gid}).json()["items"]
    assert [j["id"] for j in listing] == [job["id"], job2["id"]]


def test_ingest_records_bad_images_and_goes_on(
    client: TestClient, market_root: Path, datasets_root: Path
) -> None:
    broken = datasets_root / "broken-market"
    if not broken.exists():
        shutil.copytree(market_root, broken)
        # Junk images (identity -1) never reach the job: break two labelled ones.
        gallery_files = sorted((broken / "bounding_box_test").glob("0*.jpg"))
        gallery_files[0].write_bytes(b"not a jpeg at all")
        gallery_files[1].write_bytes(gallery_files[1].read_bytes()[:100])
    gid = create_gallery(client)["id"]
    job = wait_for_job(client, ingest(client, gid, broken)[0])
    assert job["status"] == "succeeded"
    assert job["failed"] == 2 and job["done"] == job["total"] - 2
    errors = client.get(f"/v1/jobs/{job['id']}/errors").json()["items"]
    assert len(errors) == 2 and all(e["source"].endswith(".jpg") and e["error"] for e in errors)
    assert client.get(f"/v1/galleries/{gid}").json()["count"] == job["total"] - 2


def test_cancel_running_job(
    tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path, market_root: Path
) -> None:
    slow = make_settings(
        tmp_path, database_url, model_dirs, datasets_root, ingest_batch_size=2, ingest_batch_pause_s=0.2
    )
    with TestClient(create_app(slow)) as client:
        gid = create_gallery(client)["id"]
        location, job = ingest(client, gid, market_root)
        while client.get(location).json()["done"] < 2:
            time.sleep(0.02)
        r = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 202 and r.json()["cancel_requested"]
        final = wait_for_job(client, location)
        assert final["status"] == "cancelled" and 2 <= final["done"] < final["total"], final
        # What it stored before stopping stays, and a new job finishes the rest without duplicates.
        assert client.get(f"/v1/galleries/{gid}").json()["count"] == final["done"]
        rest = wait_for_job(client, ingest(client, gid, market_root)[0])
        assert rest["status"] == "succeeded" and rest["skipped"] == final["done"]
        assert client.get(f"/v1/galleries/{gid}").json()["count"] == rest["total"]
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        assert_problem(client.post("/v1/jobs/999/cancel"), 404)


@pytest.mark.parametrize(
    "bad", [{"model": "person"}, {"model": "person", "dataset": {"layout": "market1501"}}]
)
def test_evaluation_validation(client: TestClient, bad: dict) -> None:
    assert_problem(client.post("/v1/evaluations", json=bad), 422)


def test_openapi_documents_the_api(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/v1/galleries",
        "/v1/galleries/{gallery_id}/items",
        "/v1/galleries/{gallery_id}/search",
        "/v1/galleries/{gallery_id}/ingest-jobs",
        "/v1/jobs/{job_id}",
        "/v1/evaluations",
        "/health/ready",
    ):
        assert path in paths
    assert "examples" in schema["components"]["schemas"]["GalleryCreate"]


def test_upload_with_idempotency_key_is_stored_once(client: TestClient) -> None:
    gid = create_gallery(client)["id"]
    files = [("image", ("a.jpg", jpeg_bytes(7), "image/jpeg"))]
    headers = {"Idempotency-Key": "upload-7"}
    first = client.post(f"/v1/galleries/{gid}/items", files=files, data={"identity": "p"}, headers=headers)
    again = client.post(f"/v1/galleries/{gid}/items", files=files, data={"identity": "p"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert client.get(f"/v1/galleries/{gid}").json()["count"] == 1
    other = client.post(f"/v1/galleries/{gid}/items", files=files, data={"identity": "q"}, headers=headers)
    assert_problem(other, 422)
    assert client.get(f"/v1/galleries/{gid}").json()["count"] == 1


def test_ingest_folder_layout_with_csv_manifest(client: TestClient, datasets_root: Path) -> None:
    from training.data.synthetic import write_synthetic

    root = datasets_root / "folder"
    if not root.exists():
        write_synthetic(root, layout="folder", ids=4, images_per_id=4, seed=2, progress=False)
    gid = create_gallery(client)["id"]
    r = client.post(
        f"/v1/galleries/{gid}/ingest-jobs",
        json={
            "source": {
                "layout": "folder",
                "root": str(root),
                "split": "gallery",
                "options": {"manifest": "manifest.csv"},
            }
        },
    )
    assert r.status_code == 202, r.text
    job = wait_for_job(client, r.headers["location"])
    assert job["status"] == "succeeded" and job["done"] == job["total"] > 0, job
    items = client.get(f"/v1/galleries/{gid}/items").json()["items"]
    # The manifest's own names and times, not the parser's numbers.
    assert all(i["identity"].startswith("000") and i["camera"].startswith("c") for i in items)
    assert all(i["captured_at"] is not None for i in items)
    camera = items[0]["camera"]
    listed = client.get(f"/v1/galleries/{gid}/items", params={"camera": camera}).json()["items"]
    assert listed and {i["camera"] for i in listed} == {camera}
    r = client.post(
        f"/v1/galleries/{gid}/ingest-jobs",
        json={"source": {"layout": "folder", "root": str(root), "options": {"no_such_option": 1}}},
    )
    # Refused at creation (not a job that fails later), naming the option and the allowed ones.
    assert r.status_code == 422, r.text
    assert "no_such_option" in r.json()["detail"] and "manifest" in r.json()["detail"]


def test_concurrent_writers_keep_database_and_index_in_step(client: TestClient, market_root: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.service.test_recovery import assert_index_matches_database

    gid = create_gallery(client)["id"]
    location, _ = ingest(client, gid, market_root)

    def writer(n: int) -> list[int]:
        ids = [
            i["id"]
            for s in range(3)
            for i in upload(client, gid, [1000 + 10 * n + 2 * s, 1001 + 10 * n + 2 * s])
        ]
        assert client.delete(f"/v1/galleries/{gid}/items/{ids[0]}").status_code == 204
        return ids[:1]

    with ThreadPoolExecutor(6) as pool:
        deleted = {i for ids in pool.map(writer, range(6)) for i in ids}
    assert wait_for_job(client, location)["status"] == "succeeded"
    assert (
        client.get(f"/v1/galleries/{gid}").json()["count"] == 6 * 5 + wait_for_job(client, location)["done"]
    )
    assert_index_matches_database(client, gid, deleted)


def test_a_deleted_item_serves_no_pixels_and_thumbnails_are_private(client: TestClient) -> None:
    gid = create_gallery(client, name="deletions")["id"]
    r = client.post(f"/v1/galleries/{gid}/items", files=[("image", ("a.jpg", jpeg_bytes(7), "image/jpeg"))])
    assert r.status_code == 201, r.text
    item = r.json()["items"][0]
    base = f"/v1/galleries/{gid}/items/{item['id']}"
    thumb = client.get(f"{base}/thumbnail")
    assert thumb.status_code == 200
    cache = thumb.headers["cache-control"]
    assert "private" in cache and "public" not in cache and "immutable" not in cache
    assert client.get(f"{base}/image").headers["cache-control"].startswith("private")
    assert client.delete(base).status_code == 204
    for path in (f"{base}/thumbnail", f"{base}/image"):
        assert client.get(path).status_code == 404, path


def test_durability_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite commits with synchronous=FULL; a stored image's directory entry is fsynced too."""
    from sqlalchemy import text

    import service.imaging.store as store_module
    from service.db.session import create_db_engine
    from service.imaging.store import ImageStore

    engine = create_db_engine(f"sqlite:///{tmp_path / 'd.sqlite3'}")
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
    engine.dispose()
    synced: list[Path] = []
    monkeypatch.setattr(store_module, "fsync_dir", lambda path: synced.append(Path(path)))
    store = ImageStore(tmp_path / "images")
    stored = store.put(jpeg_bytes(3), "ab" * 32, "JPEG")
    assert stored.parent in synced


def test_times_are_one_rule_everywhere_and_k_must_be_an_integer(client: TestClient) -> None:
    gid = create_gallery(client, name="times")["id"]
    files = [("image", ("a.jpg", jpeg_bytes(9), "image/jpeg"))]
    item = client.post(
        f"/v1/galleries/{gid}/items", files=files, data={"captured_at": "2026-01-02T03:04:05"}
    ).json()["items"][0]
    assert item["captured_at"].startswith("2026-01-02T03:04:05") and item["captured_at"].endswith(
        ("Z", "+00:00")
    )
    extreme = "0001-01-01T00:00:00+14:00"  # no UTC equivalent: 422, not 500
    r = client.post(f"/v1/galleries/{gid}/items", files=files, data={"captured_at": extreme})
    assert r.status_code == 422, r.text
    assert client.get(f"/v1/galleries/{gid}/items", params={"time_from": extreme}).status_code == 422
    search = f"/v1/galleries/{gid}/search-by-item"
    mixed = {
        "item_id": item["id"],
        "time_from": "2026-01-01T00:00:00",
        "time_to": "2026-01-03T00:00:00+09:00",
    }
    assert client.post(search, json=mixed).status_code == 200  # naive and offset times mix (naive = UTC)
    assert client.post(search, json={"item_id": item["id"], "time_to": extreme}).status_code == 422
    assert client.post(search, json={"item_id": item["id"], "k": True}).status_code == 422
