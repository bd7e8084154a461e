"""Metrics, request ids and structured logs, through the real app (lifespan included)."""

from __future__ import annotations

import io
import json
import logging
import re
import string
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse

from service.app import create_app
from service.http.log_format import JsonFormatter, RequestIdFilter, configure_logging, make_handler
from service.http.prometheus import ServiceMetrics, batch_size_buckets, cuda_memory, read_samples
from service.http.request_context import MAX_REQUEST_ID_LENGTH, accept_request_id, current_request_id
from service.settings import Settings
from tests.service.conftest import jpeg_bytes, make_settings, wait_for_job

SEARCH_ROUTE = "/v1/galleries/{gallery_id}/search"
HEX32 = re.compile(r"[0-9a-f]{32}")
ID_ALPHABET = string.ascii_letters + string.digits + "._:=+/-"


def metrics_text(client: TestClient) -> str:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def total(text: str, name: str, **labels: object) -> float:
    return sum(read_samples(text, name, labels))


def gallery(client: TestClient, name: str) -> int:
    r = client.post("/v1/galleries", json={"name": name, "model": "person"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def upload(client: TestClient, gallery_id: int, seeds: list[int]) -> list[dict]:
    files = [("image", (f"{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in seeds]
    r = client.post(f"/v1/galleries/{gallery_id}/items", files=files)
    assert r.status_code == 201, r.text
    return r.json()["items"]


def search(client: TestClient, gallery_id: int, seeds: list[int], **headers: str):
    files = [("image", (f"q{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in seeds]
    return client.post(f"/v1/galleries/{gallery_id}/search", files=files, data={"k": "3"}, headers=headers)


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """Every record of the process, as the JSON lines `reid serve` writes, into a buffer."""
    buffer = io.StringIO()
    handler = make_handler("json", buffer)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def parsed(buffer: io.StringIO) -> list[dict]:
    lines = buffer.getvalue().splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]  # every line must be one JSON object


# ----------------------------------------------------------------------------- metrics


def test_requests_are_counted_by_route_template(client: TestClient) -> None:
    gid = gallery(client, "lobby")
    upload(client, gid, [1, 2, 3])
    before = metrics_text(client)
    for seed in (10, 11):
        assert search(client, gid, [seed]).status_code == 200
    assert client.get("/v1/galleries/987654").status_code == 404
    assert client.get("/no/such/path/123").status_code == 404
    assert client.request("PROPFIND", f"/v1/galleries/{gid}").status_code == 405
    after = metrics_text(client)

    route = {"method": "POST", "route": SEARCH_ROUTE, "status": 200}
    assert (
        total(after, "reid_http_requests_total", **route) - total(before, "reid_http_requests_total", **route)
        == 2
    )
    assert total(after, "reid_http_request_duration_seconds_count", **route) == total(
        after, "reid_http_requests_total", **route
    )
    assert total(after, "reid_http_request_duration_seconds_sum", **route) > 0
    assert total(after, "reid_http_requests_total", route="/v1/galleries/{gallery_id}", status=404) == 1
    assert total(after, "reid_http_requests_total", route="<unmatched>", status=404) == 1
    assert total(after, "reid_http_requests_total", method="OTHER", route="/v1/galleries/{gallery_id}") == 1
    # Raw paths never become label values: one series per template, not per gallery or probe.
    assert f"/v1/galleries/{gid}/search" not in after
    assert "987654" not in after and "/no/such/path" not in after


def test_requests_refused_before_routing_keep_their_template(settings: Settings) -> None:
    class RefuseDeletes:
        """Answers every DELETE itself, before the router (as an API-key guard does)."""

        def __init__(self, app) -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http" and scope["method"] == "DELETE":
                await PlainTextResponse("no", status_code=401)(scope, receive, send)
                return
            await self.app(scope, receive, send)

    app = create_app(settings)
    app.user_middleware.append(Middleware(RefuseDeletes))  # innermost: inside the observability one
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.delete("/v1/galleries/5/items/7")
        assert r.status_code == 401
        assert HEX32.fullmatch(r.headers["x-request-id"])
        text = metrics_text(client)
    route = "/v1/galleries/{gallery_id}/items/{item_id}"
    assert total(text, "reid_http_requests_total", method="DELETE", route=route, status=401) == 1


def test_batch_histograms_and_model_gauges(client: TestClient) -> None:
    gid = gallery(client, "batches")
    before = metrics_text(client)
    upload(client, gid, list(range(5)))
    assert search(client, gid, [20, 21, 22]).status_code == 200
    after = metrics_text(client)

    labels = {"model": "person", "version": client.get("/v1/models/person").json()["version"]}

    def grew(name: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    # 8 images went through the micro-batcher, in at least 2 batches (two requests) and at most 8.
    assert grew("reid_embed_batch_size_sum") == 8
    assert 2 <= grew("reid_embed_batch_size_count") <= 8
    assert grew("reid_embed_queue_wait_seconds_count") == 8
    assert grew("reid_embed_batch_seconds_count") == grew("reid_embed_batch_size_count")
    # The largest bucket is the batcher's largest batch, so every batch falls in a finite bucket.
    top = str(float(client.app.state.settings.max_batch_size))
    assert total(after, "reid_embed_batch_size_bucket", le=top, **labels) == total(
        after, "reid_embed_batch_size_count", **labels
    )
    assert total(after, "reid_embed_queue_depth", **labels) == 0
    assert total(after, "reid_model_info", kind="person", device="cpu", **labels) == 1
    assert total(after, "reid_service_ready") == 1
    assert total(after, "process_resident_memory_bytes") > 0
    assert total(after, "python_gc_collections_total") >= 0
    assert read_samples(after, "python_info")


def test_index_size_gauge_equals_gallery_count(client: TestClient) -> None:
    first, second = gallery(client, "first"), gallery(client, "second")
    items = upload(client, first, [1, 2, 3, 4])
    upload(client, second, [5, 6])
    assert client.delete(f"/v1/galleries/{first}/items/{items[0]['id']}").status_code == 204
    text = metrics_text(client)
    for gid in (first, second):
        count = client.get(f"/v1/galleries/{gid}").json()["count"]
        assert total(text, "reid_index_items", gallery_id=gid, active="true") == count
    assert total(text, "reid_index_items", gallery_id=first) == 3


def test_job_progress_while_running_and_jobs_by_status(
    tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path, market_root: Path
) -> None:
    # Small batches with a pause between them keep the job running long enough to be scraped.
    settings = make_settings(
        tmp_path, database_url, model_dirs, datasets_root, ingest_batch_size=2, ingest_batch_pause_s=0.5
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        gid = gallery(client, "jobs")
        r = client.post(
            f"/v1/galleries/{gid}/ingest-jobs",
            json={"source": {"layout": "market1501", "root": str(market_root), "split": "gallery"}},
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        labels = {"job_id": job_id, "kind": "ingest"}
        deadline = time.monotonic() + 20
        while True:
            text = metrics_text(client)
            done = read_samples(text, "reid_job_done_items", labels)
            if done and done[0] >= 2 and read_samples(text, "reid_job_total_items", labels):
                break
            assert time.monotonic() < deadline, "the running job never showed progress in /metrics"
            time.sleep(0.05)
        job_total = total(text, "reid_job_total_items", **labels)
        assert job_total == client.get(f"/v1/jobs/{job_id}").json()["total"]
        assert 0 < total(text, "reid_job_progress_ratio", **labels) < 1
        assert total(text, "reid_job_failed_items", **labels) == 0
        assert total(text, "reid_jobs", kind="ingest", status="running") == 1

        client.post(f"/v1/jobs/{job_id}/cancel")
        assert wait_for_job(client, f"/v1/jobs/{job_id}")["status"] == "cancelled"
        text = metrics_text(client)
        assert not read_samples(text, "reid_job_done_items", labels)  # only running jobs have progress
        assert total(text, "reid_jobs", kind="ingest", status="cancelled") == 1
        assert total(text, "reid_jobs", status="running") == 0


def test_gpu_memory_is_exported_from_the_probe() -> None:
    metrics = ServiceMetrics(max_batch_size=8, gpu_probe=lambda: [("cuda:0", 100, 300, 200)])
    text = metrics.exposition().decode()
    assert total(text, "reid_gpu_memory_allocated_bytes", device="cuda:0") == 100
    assert total(text, "reid_gpu_memory_reserved_bytes", device="cuda:0") == 300
    assert total(text, "reid_gpu_memory_peak_allocated_bytes", device="cuda:0") == 200

    def broken() -> list:
        raise RuntimeError("driver gone")

    text = ServiceMetrics(max_batch_size=8, gpu_probe=broken).exposition().decode()
    assert "reid_gpu_memory_allocated_bytes" not in text
    assert read_samples(text, "process_cpu_seconds_total")  # the rest of the scrape still works


def test_cuda_memory_probe() -> None:
    if not torch.cuda.is_available():
        assert cuda_memory() == []
        return
    block = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    rows = cuda_memory()
    assert len(rows) == torch.cuda.device_count()
    device, allocated, reserved, peak = rows[block.device.index or 0]
    assert device == f"cuda:{block.device.index or 0}"
    assert block.numel() <= allocated <= reserved and allocated <= peak


def test_apps_have_separate_registries() -> None:
    a, b = ServiceMetrics(max_batch_size=4), ServiceMetrics(max_batch_size=4)
    a.observe_request("GET", "/x", 200, 0.01)
    assert total(a.exposition().decode(), "reid_http_requests_total", route="/x") == 1
    assert total(b.exposition().decode(), "reid_http_requests_total", route="/x") == 0
    assert batch_size_buckets(1) == (1.0,)
    assert batch_size_buckets(64) == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    assert batch_size_buckets(48) == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 48.0)


def test_metrics_can_be_turned_off(tmp_path: Path, model_dirs: dict[str, Path]) -> None:
    settings = make_settings(
        tmp_path, f"sqlite:///{tmp_path / 'db.sqlite3'}", model_dirs, metrics_enabled=False
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        r = client.get("/metrics")
        assert r.status_code == 404
        assert r.json()["request_id"] == r.headers["x-request-id"]
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]


# ----------------------------------------------------------------------------- request ids


def test_request_id_is_echoed_or_generated(client: TestClient) -> None:
    r = client.get("/health/live", headers={"X-Request-ID": "trace-42.a:b"})
    assert r.headers["x-request-id"] == "trace-42.a:b"
    generated = {client.get("/health/live").headers["x-request-id"] for _ in range(3)}
    assert len(generated) == 3 and all(HEX32.fullmatch(g) for g in generated)
    for bad in ("x" * (MAX_REQUEST_ID_LENGTH + 1), "has space", 'quote"d', "semi;colon"):
        echoed = client.get("/health/live", headers={"X-Request-ID": bad}).headers["x-request-id"]
        assert HEX32.fullmatch(echoed), (bad, echoed)
    assert client.get("/v1/models").headers["x-request-id"]


@hypothesis_settings(max_examples=60, deadline=None)
@given(st.text(alphabet=ID_ALPHABET, min_size=1, max_size=MAX_REQUEST_ID_LENGTH))
def test_acceptable_request_ids_are_kept(value: str) -> None:
    assert accept_request_id(value) == value


@hypothesis_settings(max_examples=60, deadline=None)
@given(
    st.text(alphabet=ID_ALPHABET, max_size=40),
    st.characters(blacklist_characters=ID_ALPHABET),
    st.text(alphabet=ID_ALPHABET, max_size=40),
)
def test_request_ids_with_other_characters_are_refused(head: str, bad: str, tail: str) -> None:
    assert accept_request_id(head + bad + tail) is None


def test_request_id_length_is_bounded() -> None:
    assert accept_request_id("a" * MAX_REQUEST_ID_LENGTH) is not None
    assert accept_request_id("a" * (MAX_REQUEST_ID_LENGTH + 1)) is None
    assert accept_request_id("") is None and accept_request_id(None) is None


def test_problem_bodies_carry_the_request_id(client: TestClient) -> None:
    cases = [
        client.get("/v1/galleries/424242", headers={"X-Request-ID": "problem-1"}),  # 404 from the code
        client.get("/nowhere"),  # 404 from the router
        client.post("/v1/galleries", json={"name": ""}),  # 422 validation
        client.delete("/v1/models"),  # 405
    ]
    assert cases[0].json()["request_id"] == "problem-1"
    for r in cases:
        assert r.status_code >= 400
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["request_id"] == r.headers["x-request-id"]
        assert len(r.headers.get_list("x-request-id")) == 1


# ----------------------------------------------------------------------------- logs and the middleware


def test_json_logs_carry_the_request_id(settings: Settings, log_lines: io.StringIO) -> None:
    app = create_app(settings)
    noisy = logging.getLogger("service.tests.noisy")

    async def log_in_a_thread() -> dict:
        def work() -> None:
            noisy.info("from a worker thread", extra={"rows": 3, "where": Path("x")})

        await anyio.to_thread.run_sync(work)
        return {"seen": current_request_id()}

    async def boom() -> None:
        raise RuntimeError("kaboom")

    async def stream() -> StreamingResponse:
        async def chunks():
            for i in range(3):
                yield f"chunk{i};".encode()

        return StreamingResponse(chunks(), media_type="text/plain")

    app.add_api_route("/test/log", log_in_a_thread)
    app.add_api_route("/test/boom", boom)
    app.add_api_route("/test/stream", stream)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/test/log", headers={"X-Request-ID": "log-test-1"})
        assert r.json() == {"seen": "log-test-1"}
        failed = client.get("/test/boom", headers={"X-Request-ID": "boom-1"})
        streamed = client.get("/test/stream")
        text = metrics_text(client)
    assert current_request_id() is None  # nothing leaked into the test's own context

    # An unexpected error: a problem body without the trace, the request id in header and body.
    assert failed.status_code == 500
    assert failed.headers["x-request-id"] == "boom-1"
    assert failed.json()["request_id"] == "boom-1"
    assert "kaboom" not in failed.text
    # Streaming responses pass through whole.
    assert streamed.text == "chunk0;chunk1;chunk2;"
    assert HEX32.fullmatch(streamed.headers["x-request-id"])
    assert total(text, "reid_http_requests_total", route="/test/stream", status=200) == 1
    assert total(text, "reid_http_requests_total", route="/test/boom", status=500) == 1

    records = parsed(log_lines)
    for record in records:
        assert {"time", "level", "logger", "message", "request_id"} <= record.keys()
    thread_line = next(r for r in records if r["message"] == "from a worker thread")
    assert thread_line["request_id"] == "log-test-1"
    assert thread_line["rows"] == 3 and thread_line["where"] == "x"
    access = [r for r in records if r["logger"] == "service.access"]
    log_access = next(r for r in access if r["request_id"] == "log-test-1")
    assert log_access["route"] == "/test/log" and log_access["status"] == 200
    assert log_access["method"] == "GET" and log_access["duration_ms"] >= 0
    error_lines = [r for r in records if r["request_id"] == "boom-1" and r["level"] == "ERROR"]
    assert error_lines and "RuntimeError: kaboom" in error_lines[0]["exception"]
    boom_access = next(r for r in access if r["request_id"] == "boom-1")
    assert boom_access["status"] == 500 and boom_access["level"] == "WARNING"
    assert any(r["path"] == "/test/stream" and r["status"] == 200 for r in access)
    # Records outside any request (start-up, shutdown) carry a null request id.
    assert any(r["request_id"] is None and r["logger"] == "service.app" for r in records)


def test_formatters() -> None:
    record = logging.LogRecord("service.x", logging.WARNING, __file__, 1, "n=%d", (5,), None)
    record.gallery_id = 7
    RequestIdFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "n=5" and line["level"] == "WARNING" and line["logger"] == "service.x"
    assert line["gallery_id"] == 7 and line["request_id"] is None
    assert line["time"].endswith("+00:00")
    buffer = io.StringIO()
    handler = make_handler("text", buffer)
    handler.handle(logging.LogRecord("service.y", logging.INFO, __file__, 1, "hello", (), None))
    assert buffer.getvalue().rstrip().endswith("INFO service.y [-] hello")
    with pytest.raises(ValueError, match="json"):
        make_handler("xml")  # type: ignore[arg-type]


def test_configure_logging_routes_everything_through_one_handler() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    uvicorn_logger = logging.getLogger("uvicorn.error")
    saved_uvicorn = (list(uvicorn_logger.handlers), uvicorn_logger.propagate)
    try:
        uvicorn_logger.addHandler(logging.NullHandler())
        uvicorn_logger.propagate = False
        handler = configure_logging("json", "warning")
        assert root.handlers == [handler] and root.level == logging.WARNING
        assert isinstance(handler.formatter, JsonFormatter)
        assert uvicorn_logger.handlers == [] and uvicorn_logger.propagate
        # A library's warning is one more JSON line, not raw text in the stream.
        stream = io.StringIO()
        handler.setStream(stream)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library changed its mind", DeprecationWarning, stacklevel=1)
        (line,) = stream.getvalue().splitlines()
        record = json.loads(line)
        assert record["logger"] == "py.warnings" and record["level"] == "WARNING"
        assert "a library changed its mind" in record["message"]
    finally:
        logging.captureWarnings(False)
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved_handlers:
            root.addHandler(h)
        root.setLevel(saved_level)
        uvicorn_logger.handlers[:] = saved_uvicorn[0]
        uvicorn_logger.propagate = saved_uvicorn[1]
