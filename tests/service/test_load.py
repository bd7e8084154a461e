"""Load: 32 concurrent clients search a gallery while an ingestion job fills it, on a real server.

A ``reid serve`` process on 127.0.0.1 (uvicorn, SQLite, FAISS), the scenario of ``bench/load.py``
made small: a tiny model, a job of ~100 images in small batches with a pause between them so that
it lasts a few seconds, and the load bounded by the job's end, a time limit and a request count.
Every answer must be a 200 or an explicit 429/503, nothing acknowledged may be lost, and the
service's own metrics and logs must agree with what the clients saw.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.load import CLIENTS, SEARCH_ROUTE, Scenario, run_scenario

SCENARIO = Scenario(
    clients=CLIENTS,
    arch="mobilenetv3_small_050",
    input_size=(64, 32),
    ids=32,
    images_per_id=8,
    prefill=16,
    reference_seconds=0,
    max_seconds=25.0,
    max_requests=3000,
    ingest_batch_size=8,
    ingest_pause_s=0.4,
    k=10,
)


@pytest.mark.timeout(120)
def test_queries_under_ingestion(tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    figures = run_scenario(tmp_path, SCENARIO, device="cpu")
    load, job = figures["under_ingestion"], figures["job"]
    summary = {
        k: load[k] for k in ("requests", "ok", "statuses", "p50_ms", "p95_ms", "p99_ms", "requests_per_s")
    }
    for key, value in summary.items():
        record_property(key, value)
    print(f"\nload under ingestion ({CLIENTS} clients): {json.dumps(summary)}; job: {json.dumps(job)}")

    # Zero errors other than explicit 429/503: no 5xx, no dropped connection, no bad body.
    assert load["error_count"] == 0, load["errors"]
    assert set(load["statuses"]) <= {"200", "429", "503"}
    assert load["ok"] >= 2 * CLIENTS, f"too few answers to mean anything: {load}"
    assert load["p50_ms"] <= load["p95_ms"] <= load["p99_ms"]

    # The load really ran while the job did, and the job lost nothing it acknowledged.
    assert figures["requests_during_job"] >= CLIENTS, figures
    assert job["status"] == "succeeded" and job["failed"] == 0, job
    assert job["done"] == job["images"] > 0
    assert figures["gallery_count_after"] == SCENARIO.prefill + job["done"]

    # The service's view agrees with the clients': every search counted once, under its template,
    # and the running job's progress was visible to a scraper.
    assert figures["metrics"]["search_requests"] == figures["search_requests_sent"]
    assert figures["metrics"]["job_progress_seen"], figures["metrics"]

    # The server wrote JSON lines only; each search has one access line with the client's id.
    lines = Path(figures["log_path"]).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    access = {r["request_id"]: r for r in records if r["logger"] == "service.access"}
    for n in range(load["requests"]):
        line = access[f"ingest-{n}"]
        assert line["route"] == SEARCH_ROUTE and line["status"] in (200, 429, 503)
    assert any(r["logger"].startswith("uvicorn") for r in records)  # the server's own lines, as JSON
