"""Limits on what a client controls: rate limits, body size (while streaming), images per request,
the embedding queue, job and evaluation sizes, media types; CORS, the docs toggle, no stack traces."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.http.auth import ApiKeyStore, Scope
from service.http.limits import BodySizeLimitMiddleware
from service.http.problems import install_problem_handlers
from service.http.rate_limit import RateLimiter, TokenBucket
from tests.service.conftest import jpeg_bytes, make_settings

PROBLEM = "application/problem+json"


def problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["type"] == f"/problems/{slug}"
    return body


# ----------------------------------------------------------------------------------- token buckets


@settings(max_examples=80, deadline=None)
@given(
    rate=st.floats(0.5, 50),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 2), min_size=1, max_size=120),
)
def test_token_bucket_never_grants_more_than_burst_plus_rate_times_window(
    rate: float, burst: int, gaps: list[float]
) -> None:
    times = [sum(gaps[: i + 1]) for i in range(len(gaps))]
    bucket = TokenBucket(rate, burst, now=0.0)
    granted = [t for t in times if bucket.take(t) == 0.0]
    for i, start in enumerate(granted):
        for j in range(i, len(granted)):
            # Requests granted in [start, end]: at most what was in the bucket plus what flowed in.
            assert j - i + 1 <= burst + rate * (granted[j] - start) + 1e-6


@settings(max_examples=60, deadline=None)
@given(rate=st.floats(0.5, 50), burst=st.integers(1, 10), extra=st.integers(1, 10))
def test_retry_after_is_exactly_when_a_token_is_back(rate: float, burst: int, extra: int) -> None:
    bucket = TokenBucket(rate, burst, now=0.0)
    assert all(bucket.take(0.0) == 0.0 for _ in range(burst))  # a full bucket allows a burst
    wait = bucket.take(0.0)
    assert wait == pytest.approx(1.0 / rate)
    assert bucket.take(wait * 0.99) > 0.0  # not yet
    assert bucket.take(wait + 1e-9) == 0.0  # now
    # A client that keeps to the rate is never refused.
    now = wait + 1e-9
    for _ in range(extra):
        now += 1.0 / rate + 1e-9
        assert bucket.take(now) == 0.0


def test_rate_limiter_keeps_callers_apart_and_forgets_the_oldest() -> None:
    now = [0.0]
    limiter = RateLimiter(1.0, 2, max_buckets=3, clock=lambda: now[0])
    assert [limiter.acquire("key:a") for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]
    assert limiter.acquire("key:b") == 0.0  # a's bucket is a's alone
    for key in ("ip:1", "ip:2", "ip:3"):
        limiter.acquire(key)
    assert len(limiter) == 3
    assert limiter.acquire("key:a") == 0.0  # forgotten, so full again: the lenient direction
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(0, 1)


def test_rate_limit_per_client_address_when_auth_is_off(limited: TestClient) -> None:
    s = limited.app.state.settings
    assert not s.auth_enabled and (s.rate_limit_per_s, s.rate_limit_burst) == (1.0, 20)
    # Until the first 429: on a loaded machine a token may come back while the burst is spent, so
    # the bound is the bucket's own (burst + rate x elapsed), not a fixed request count.
    start = time.monotonic()
    codes = []
    while len(codes) < s.rate_limit_burst + 50:
        r = limited.get("/v1/models")
        codes.append(r.status_code)
        if r.status_code == 429:
            break
    elapsed = time.monotonic() - start
    assert codes[: s.rate_limit_burst] == [200] * s.rate_limit_burst
    assert codes[-1] == 429 and set(codes[:-1]) == {200}
    assert len(codes) - 1 <= s.rate_limit_burst + elapsed * s.rate_limit_per_s + 1
    body = problem(r, 429, "rate-limited")
    assert int(r.headers["retry-after"]) == 1 and "client address" in body["detail"]
    assert limited.get("/health/ready").status_code == 200  # probes are never limited


def test_rate_limit_per_key(tmp_path: Path, database_url: str, model_dirs: dict[str, Path]) -> None:
    s = make_settings(tmp_path, database_url, model_dirs, auth="on", rate_limit_per_s=0.5, rate_limit_burst=3)
    with TestClient(create_app(s), raise_server_exceptions=False) as client:
        store = ApiKeyStore(client.app.state.service.sessions)
        a, b = (store.create(name, Scope.READ) for name in ("a", "b"))
        auth_a, auth_b = ({"Authorization": f"Bearer {k.token}"} for k in (a, b))
        assert [client.get("/v1/models", headers=auth_a).status_code for _ in range(3)] == [200] * 3
        r = client.get("/v1/models", headers=auth_a)
        body = problem(r, 429, "rate-limited")
        assert 1 <= int(r.headers["retry-after"]) <= 2 and "API key" in body["detail"]
        assert client.get("/v1/models", headers=auth_b).status_code == 200  # b has its own bucket
        # Wrong keys draw from the caller's address: guessing is rate limited too.
        wrong = {"Authorization": "Bearer reid_000000000000_" + "A" * 43}
        assert [client.get("/v1/models", headers=wrong).status_code for _ in range(4)] == [401] * 3 + [429]
        assert [client.get("/health/live").status_code for _ in range(10)] == [200] * 10


# --------------------------------------------------------------------------------------- body size


def _tiny_app(limit: int) -> FastAPI:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/upload")
    async def upload(image: UploadFile = File(...)) -> dict[str, int]:
        return {"size": len(await image.read())}

    @app.post("/raw")
    async def raw(request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=limit)
    return app


def _call(app: FastAPI, path: str, body: bytes, headers: list[tuple[bytes, bytes]], chunk: int) -> dict:
    """Send ``body`` in ``chunk``-byte messages; returns the status, the body and the messages pulled."""
    pulled = 0
    out: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        start = pulled * chunk
        pulled += 1
        part = body[start : start + chunk]
        return {"type": "http.request", "body": part, "more_body": start + chunk < len(body)}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out["status"] = message["status"]
            out["headers"] = dict(message["headers"])
        elif message["type"] == "http.response.body":
            out["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
    }
    asyncio.run(app(scope, receive, send))
    out["pulled"] = pulled
    return out


@pytest.mark.parametrize("path", ["/raw", "/upload"])
def test_a_streamed_body_is_cut_off_once_past_the_limit(path: str) -> None:
    limit, chunk = 64 * 1024, 4096
    boundary = "bound"
    payload = b"\xff\xd8\xff" + bytes(1024 * 1024)  # 1 MiB, sent chunked (no Content-Length)
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
    out = _call(_tiny_app(limit), path, body, headers, chunk)
    assert out["status"] == 413 and out["headers"][b"content-type"] == PROBLEM.encode()
    assert b"/problems/body-too-large" in out["body"] and str(limit).encode() in out["body"]
    assert out["pulled"] <= limit // chunk + 1  # stopped reading right after the limit
    # Under the limit the same endpoints work.
    small = body.replace(payload, payload[:1000])
    ok = _call(_tiny_app(limit), path, small, headers, chunk)
    assert ok["status"] == 200


def test_a_declared_length_over_the_limit_is_refused_unread() -> None:
    headers = [(b"content-length", b"10000000"), (b"content-type", b"application/octet-stream")]
    out = _call(_tiny_app(64 * 1024), "/raw", bytes(100), headers, 4096)
    assert out["status"] == 413 and out["pulled"] == 0


# --------------------------------------------------------------------------- the app's other limits


@pytest.fixture
def limited(
    tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path
) -> Iterator[TestClient]:
    """The app with small limits, CORS for one origin, no docs, and a route that fails."""
    s = make_settings(
        tmp_path,
        database_url,
        model_dirs,
        datasets_root,
        max_images_per_request=2,
        queue_size=1,
        max_job_images=17,  # the synthetic gallery split has 17 images, its train split 24
        max_evaluation_images=25,  # query + gallery: 9 + 17
        cors_origins="https://ui.example",
        docs_enabled=False,
        rate_limit_per_s=1.0,
        rate_limit_burst=20,
    )
    app = create_app(s)

    async def boom() -> None:
        raise RuntimeError("secret detail /etc/shadow")

    app.add_api_route("/v1/boom", boom, methods=["GET"])
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _gallery(client: TestClient) -> int:
    r = client.post("/v1/galleries", json={"name": "limits", "model": "person"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _images(*seeds: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in seeds]


def test_images_per_request_and_the_embedding_queue(limited: TestClient) -> None:
    gid = _gallery(limited)
    body = problem(limited.post(f"/v1/galleries/{gid}/items", files=_images(1, 2, 3)), 422, "too-many-images")
    assert "at most 2" in body["detail"]
    assert limited.post(f"/v1/galleries/{gid}/items", files=_images(1)).status_code == 201
    # Two query images at once into a queue of one: the second is refused at once, not queued.
    r = limited.post(f"/v1/galleries/{gid}/search", files=_images(4, 5))
    problem(r, 503, "busy")
    assert r.headers["retry-after"] == "1"
    r = limited.post(f"/v1/galleries/{gid}/search", files=_images(1))
    assert r.status_code == 200 and r.json()["queries"][0]["results"][0]["score"] > 0.99


def test_job_and_evaluation_sizes(limited: TestClient, market_root: Path) -> None:
    gid = _gallery(limited)

    def ingest(split: str) -> Any:
        source = {"layout": "market1501", "root": str(market_root), "split": split}
        return limited.post(f"/v1/galleries/{gid}/ingest-jobs", json={"source": source})

    body = problem(ingest("train"), 422, "job-too-large")
    assert body["images"] == 24 and body["limit"] == 17 and "REID_MAX_JOB_IMAGES" in body["detail"]
    assert ingest("gallery").status_code == 202  # exactly at the limit
    dataset = {"layout": "market1501", "root": str(market_root)}
    body = problem(
        limited.post("/v1/evaluations", json={"model": "person", "dataset": dataset}), 422, "job-too-large"
    )
    assert body["images"] == 26 and "REID_MAX_EVALUATION_IMAGES" in body["detail"]
    assert len(limited.get("/v1/jobs").json()["items"]) == 1


def test_unexpected_errors_have_no_stack_trace(limited: TestClient) -> None:
    r = limited.get("/v1/boom")
    body = problem(r, 500, "internal")
    assert "secret" not in r.text and "shadow" not in r.text and "Traceback" not in r.text
    assert "log" in body["detail"]
    assert limited.get("/health/ready").status_code == 200


def test_docs_toggle(client: TestClient, limited: TestClient) -> None:
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 200
        r = limited.get(path)
        assert r.status_code == 404 and r.headers["content-type"].startswith(PROBLEM)


def test_cors_is_off_unless_configured(client: TestClient, limited: TestClient) -> None:
    preflight = {
        "Origin": "https://ui.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    r = client.options("/v1/galleries", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    r = client.get("/v1/models", headers={"Origin": "https://ui.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

    r = limited.options("/v1/galleries", headers=preflight)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = limited.get("/v1/models", headers={"Origin": "https://ui.example"})
    assert r.headers["access-control-allow-origin"] == "https://ui.example"
    r = limited.options("/v1/galleries", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_limit_settings_are_documented_with_their_defaults() -> None:
    from service.settings import Settings

    fields = Settings.model_fields
    for name in (
        "auth",
        "rate_limit_per_s",
        "rate_limit_burst",
        "max_body_bytes",
        "max_job_images",
        "max_evaluation_images",
        "cors_origins",
        "docs_enabled",
    ):
        assert fields[name].description, name
    s = Settings()
    assert s.cors_origins == [] and s.docs_enabled and s.auth == "auto"
    assert (s.rate_limit_per_s, s.rate_limit_burst, s.max_body_bytes) == (100.0, 200, 32 * 1024 * 1024)
    assert Settings(cors_origins="https://a.example:8443,https://b.example").cors_origins == [
        "https://a.example:8443",
        "https://b.example",
    ]


def test_pillows_decompression_bomb_guard_stays_on() -> None:
    """Nothing in the service turns Pillow's guard off, and the service's own pixel limit is the
    stricter one, so it refuses an image before Pillow would even warn about it."""
    from PIL import Image

    import service.app  # noqa: F401 - everything the service imports at start-up
    from service.settings import Settings

    assert Image.MAX_IMAGE_PIXELS is not None
    assert Settings().max_image_pixels <= Image.MAX_IMAGE_PIXELS
