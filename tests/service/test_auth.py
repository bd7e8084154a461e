"""API keys: format, hashed storage, scopes, the request guard, `reid keys`, and the migration."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
import typer
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect
from typer.testing import CliRunner

from service.app import create_app
from service.cli import register
from service.db import migrate
from service.db.session import create_db_engine, make_session_factory
from service.http.auth import (
    ApiAccessMiddleware,
    ApiKeyError,
    ApiKeyStore,
    CachedAuthenticator,
    Scope,
    generate_key,
    hash_key,
    parse_key_id,
    presented_key,
    verify_key,
)
from service.settings import Settings, auth_enabled, is_loopback_host
from tests.service.conftest import jpeg_bytes, make_settings

PROBLEM = "application/problem+json"


def problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["type"] == f"/problems/{slug}" and body["detail"]
    return body


# ------------------------------------------------------------------------------------------ keys


def test_generated_keys_are_random_well_formed_and_parse_back() -> None:
    keys = [generate_key() for _ in range(200)]
    assert len({token for _, token in keys}) == len({key_id for key_id, _ in keys}) == 200
    for key_id, token in keys:
        assert re.fullmatch(r"reid_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", token)
        assert parse_key_id(token) == key_id
        assert len(hash_key(token)) == 64 and hash_key(token) != token
        assert verify_key(token, hash_key(token))


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_anything_not_shaped_like_a_key_is_refused(text: str) -> None:
    _, token = generate_key()
    if text != token:
        assert not verify_key(text, hash_key(token))
    if parse_key_id(text) is not None:
        assert text.startswith("reid_") and len(text) == 61


@pytest.mark.parametrize("mangle", [lambda t: t[:-1], lambda t: t + "x", lambda t: t[:-1] + "!", str.upper])
def test_mangled_keys_do_not_verify(mangle: Any) -> None:
    _, token = generate_key()
    assert not verify_key(mangle(token), hash_key(token))


def test_scopes_are_ordered() -> None:
    granted = {(have, need) for have in Scope for need in Scope if have.grants(need)}
    assert granted == {
        (Scope.READ, Scope.READ),
        (Scope.WRITE, Scope.READ),
        (Scope.WRITE, Scope.WRITE),
        (Scope.ADMIN, Scope.READ),
        (Scope.ADMIN, Scope.WRITE),
        (Scope.ADMIN, Scope.ADMIN),
    }


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("reid.example.org", False),
    ],
)
def test_auth_is_on_by_default_exactly_off_loopback(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
    assert auth_enabled("auto", host) is not loopback
    assert auth_enabled("on", host) and not auth_enabled("off", host)
    assert Settings(host=host).auth_enabled is not loopback


def test_auth_setting_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REID_AUTH", "on")
    assert Settings().auth == "on" and Settings().auth_enabled
    monkeypatch.setenv("REID_AUTH", "false")
    assert Settings(host="0.0.0.0").auth == "off" and not Settings(host="0.0.0.0").auth_enabled
    monkeypatch.delenv("REID_AUTH")
    assert Settings(auth=True).auth == "on" and Settings(auth="AUTO").auth == "auto"
    with pytest.raises(ValueError, match="auth"):
        Settings(auth="sometimes")


def test_presented_key_headers() -> None:
    assert presented_key({"authorization": "Bearer abc"}) == "abc"
    assert presented_key({"authorization": "bearer  abc "}) == "abc"
    assert presented_key({"x-api-key": "abc"}) == "abc"
    assert presented_key({"authorization": "Basic dXNlcg=="}) is None
    assert presented_key({}) is None


# ------------------------------------------------------------------------------------------ store


@pytest.fixture
def store(tmp_path: Path) -> Any:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'keys.sqlite3'}")
    migrate.upgrade(engine)
    yield ApiKeyStore(make_session_factory(engine), touch_interval_s=0)
    engine.dispose()


def test_store_keeps_only_hashes(store: ApiKeyStore, tmp_path: Path) -> None:
    new = store.create("ci runner", "write")
    assert new.scope is Scope.WRITE and new.token.startswith(f"reid_{new.key_id}_")
    principal = store.authenticate(new.token)
    assert principal is not None and principal.key_id == new.key_id and principal.scope is Scope.WRITE
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("keys.sqlite3*"))  # the WAL file too
    secret = new.token.rsplit("_", 1)[1]
    assert secret.encode() not in raw and hash_key(new.token).encode() in raw


def test_store_list_revoke_and_last_use(store: ApiKeyStore) -> None:
    a = store.create("alice", Scope.ADMIN)
    b = store.create("bob", "read")
    assert [k.key_id for k in store.list()] == [a.key_id, b.key_id]
    assert store.list()[0].last_used_at is None
    assert store.authenticate(a.token) is not None
    assert store.list()[0].last_used_at is not None
    info = store.revoke(b.key_id)
    assert not info.active and store.authenticate(b.token) is None
    assert store.revoke(b.token).revoked_at == info.revoked_at  # the whole key also names it; idempotent
    assert [k.key_id for k in store.list(include_revoked=False)] == [a.key_id]
    with pytest.raises(ApiKeyError, match="reid keys list"):
        store.revoke("000000000000")
    with pytest.raises(ApiKeyError, match="admin implies write"):
        store.create("eve", "superuser")
    with pytest.raises(ApiKeyError, match="name"):
        store.create("  ", "read")
    # A key with the right id but another secret does not pass.
    forged = a.token[:-1] + ("A" if a.token[-1] != "A" else "B")
    assert store.authenticate(forged) is None


def test_cached_authenticator_trusts_a_key_for_its_ttl_only(store: ApiKeyStore) -> None:
    now = [0.0]
    cache = CachedAuthenticator(store, ttl_s=5.0, clock=lambda: now[0])
    key = store.create("cached", "read")

    async def run() -> list[bool]:
        seen = [await cache.authenticate(key.token) is not None]
        store.revoke(key.key_id)
        seen.append(await cache.authenticate(key.token) is not None)  # still cached
        now[0] = 5.1
        seen.append(await cache.authenticate(key.token) is not None)  # asked again: revoked
        return seen

    assert asyncio.run(run()) == [True, True, False]


def _through_guard(service: Any, headers: list[tuple[bytes, bytes]]) -> tuple[dict[str, Any], dict[str, int]]:
    """One upload request through the guard alone, with ``service`` as the app's state.

    Returns the response start message and how often the app and ``receive`` were called.
    """
    calls = {"app": 0, "receive": 0}
    sent: list[dict[str, Any]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        calls["app"] += 1

    async def receive() -> dict[str, Any]:
        calls["receive"] += 1
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    class _App:
        class state:  # mimics app.state
            pass

    _App.state.service = service  # type: ignore[attr-defined]
    guard = ApiAccessMiddleware(inner, enabled=True, limiter=None)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/galleries/1/items",
        "headers": [(b"content-length", b"1000000"), *headers],
        "query_string": b"",
        "client": ("10.0.0.1", 1234),
        "app": _App(),
    }
    asyncio.run(guard(scope, receive, send))
    return sent[0], calls


def test_guard_answers_401_without_reading_the_body() -> None:
    """An unauthenticated upload is refused before a single body chunk is received."""

    class _Service:
        sessions = None

    start, calls = _through_guard(_Service(), [])
    assert calls == {"app": 0, "receive": 0} and start["status"] == 401
    assert dict(start["headers"])[b"www-authenticate"].startswith(b'Bearer realm="reid"')


def test_guard_answers_503_when_keys_cannot_be_checked(tmp_path: Path) -> None:
    """Starting (no database yet), or a database without the keys table: 503 with Retry-After, not 500."""
    _, token = generate_key()
    auth = [(b"authorization", f"Bearer {token}".encode())]
    start, calls = _through_guard(None, auth)
    assert start["status"] == 503 and calls["app"] == 0

    engine = create_db_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}")  # never migrated

    class _Service:
        sessions = make_session_factory(engine)

    start, calls = _through_guard(_Service(), auth)
    engine.dispose()
    assert start["status"] == 503 and calls == {"app": 0, "receive": 0}
    assert dict(start["headers"])[b"retry-after"] == b"2"


# -------------------------------------------------------------------------------------- the app


@pytest.fixture
def secured(tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path) -> Any:
    """The app with API keys on (auth cache off, so revocation shows at once) and three keys."""
    s = make_settings(tmp_path, database_url, model_dirs, datasets_root, auth="on", auth_cache_s=0)
    with TestClient(create_app(s), raise_server_exceptions=False) as client:
        store = ApiKeyStore(client.app.state.service.sessions)
        keys = {scope: store.create(f"{scope.value} key", scope) for scope in Scope}
        yield client, store, keys


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_open_paths_need_no_key(secured: Any) -> None:
    client, _, _ = secured
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/").status_code == 200


def test_missing_and_invalid_keys_get_401_with_a_challenge(secured: Any) -> None:
    client, store, keys = secured
    body = problem(client.get("/v1/models"), 401, "unauthorized")
    assert "reid keys create" in body["detail"]
    r = client.get("/v1/models")
    assert r.headers["www-authenticate"] == 'Bearer realm="reid"'
    forged = keys[Scope.ADMIN].token[:-2] + "zz"
    for headers in (bearer("nonsense"), bearer(forged), {"X-API-Key": "reid_000000000000_" + "a" * 43}):
        r = client.get("/v1/models", headers=headers)
        problem(r, 401, "unauthorized")
        assert 'error="invalid_token"' in r.headers["www-authenticate"]
    # An unauthenticated upload gets its 401, not a 415/422 about its body.
    files = [("image", ("q.jpg", jpeg_bytes(1), "image/jpeg"))]
    problem(client.post("/v1/galleries/1/items", files=files), 401, "unauthorized")
    store.revoke(keys[Scope.READ].key_id)
    problem(client.get("/v1/models", headers=bearer(keys[Scope.READ].token)), 401, "unauthorized")


def test_scopes_are_enforced(secured: Any) -> None:
    client, _, keys = secured
    read, write, admin = (bearer(keys[s].token) for s in (Scope.READ, Scope.WRITE, Scope.ADMIN))
    assert client.get("/v1/models", headers=read).status_code == 200
    assert client.get("/v1/models", headers={"X-API-Key": keys[Scope.READ].token}).status_code == 200

    r = client.post("/v1/galleries", json={"name": "lobby", "model": "person"}, headers=write)
    body = problem(r, 403, "forbidden")
    assert body["required_scope"] == "admin" and "'write'" in body["detail"]
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    r = client.post("/v1/galleries", json={"name": "lobby", "model": "person"}, headers=admin)
    assert r.status_code == 201, r.text
    gid = r.json()["id"]

    files = [("image", ("a.jpg", jpeg_bytes(3), "image/jpeg"))]
    problem(client.post(f"/v1/galleries/{gid}/items", files=files, headers=read), 403, "forbidden")
    r = client.post(f"/v1/galleries/{gid}/items", files=files, headers=write)
    assert r.status_code == 201, r.text
    item_id = r.json()["items"][0]["id"]

    r = client.post(f"/v1/galleries/{gid}/search", files=files, headers=read)
    assert r.status_code == 200 and r.json()["queries"][0]["results"][0]["item_id"] == item_id
    thumb = client.get(f"/v1/galleries/{gid}/items/{item_id}/thumbnail", headers=read)
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"

    problem(client.delete(f"/v1/galleries/{gid}/items/{item_id}", headers=write), 403, "forbidden")
    assert client.delete(f"/v1/galleries/{gid}/items/{item_id}", headers=admin).status_code == 204
    problem(client.delete(f"/v1/galleries/{gid}", headers=read), 403, "forbidden")
    assert client.delete(f"/v1/galleries/{gid}", headers=admin).status_code == 204


def required_scopes(client: TestClient, keys: dict[Scope, Any]) -> dict[tuple[str, str], Scope]:
    """The scope each /v1 operation of the OpenAPI schema asks for, found by asking it.

    A read key is refused (403, naming the scope) where write or admin is needed, a write key
    where admin is; the scope check runs before anything looks at the parameters or the body.
    """
    found = {}
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        if not path.startswith("/v1"):
            continue
        url = re.sub(r"\{[^}]+\}", "1", path)
        for method in operations:
            scope = Scope.READ
            for key in (Scope.READ, Scope.WRITE):
                r = client.request(method.upper(), url, headers=bearer(keys[key].token))
                assert r.status_code != 401, (method, path)
                if r.status_code != 403:
                    break
                scope = Scope(r.json()["required_scope"])
            found[(method.upper(), path)] = scope
    return found


def test_every_v1_operation_asks_for_its_scope(secured: Any) -> None:
    client, _, keys = secured
    found = required_scopes(client, keys)
    assert len(found) > 15
    expected = {
        ("GET", "/v1/models"): Scope.READ,
        ("GET", "/v1/galleries/{gallery_id}"): Scope.READ,
        ("POST", "/v1/galleries"): Scope.ADMIN,
        ("DELETE", "/v1/galleries/{gallery_id}"): Scope.ADMIN,
        ("POST", "/v1/galleries/{gallery_id}/items"): Scope.WRITE,
        ("DELETE", "/v1/galleries/{gallery_id}/items/{item_id}"): Scope.ADMIN,
        ("POST", "/v1/galleries/{gallery_id}/search"): Scope.READ,
        ("POST", "/v1/galleries/{gallery_id}/search-by-item"): Scope.READ,
        ("POST", "/v1/galleries/{gallery_id}/ingest-jobs"): Scope.WRITE,
        ("POST", "/v1/galleries/{gallery_id}/reembed-jobs"): Scope.ADMIN,
        ("POST", "/v1/evaluations"): Scope.WRITE,
        ("GET", "/v1/jobs/{job_id}"): Scope.READ,
        ("POST", "/v1/jobs/{job_id}/cancel"): Scope.WRITE,
    }
    assert {k: found[k] for k in expected} == expected
    # Whatever is added later: anything that changes data needs more than a read key.
    searches = {k for k in found if k[1].endswith(("/search", "/search-by-item"))}
    changing = {
        k: v for k, v in found.items() if k[0] in ("POST", "PUT", "PATCH", "DELETE") and k not in searches
    }
    assert all(v is not Scope.READ for v in changing.values()), changing


def test_non_loopback_host_turns_auth_on(
    tmp_path: Path, database_url: str, model_dirs: dict[str, Path]
) -> None:
    s = make_settings(tmp_path, database_url, model_dirs, host="0.0.0.0")
    with TestClient(create_app(s), raise_server_exceptions=False) as client:
        problem(client.get("/v1/galleries"), 401, "unauthorized")
        assert client.get("/health/ready").status_code == 200


# ------------------------------------------------------------------------------------ reid keys


def test_reid_keys_commands(tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    url = ["--database-url", f"sqlite:///{tmp_path / 'cli.sqlite3'}"]

    result = runner.invoke(app, ["keys", "list", *url])
    assert result.exit_code == 0 and "no API keys" in result.output
    result = runner.invoke(app, ["keys", "create", "--scope", "write", "--name", "ingest bot", *url])
    assert result.exit_code == 0, result.output
    token = result.stdout.splitlines()[0]
    key_id = parse_key_id(token)
    assert key_id is not None and "not shown again" in result.stderr

    result = runner.invoke(app, ["keys", "list", *url])
    assert result.exit_code == 0
    line = next(x for x in result.output.splitlines() if x.startswith(key_id))
    assert "ingest bot" in line and "write" in line and line.rstrip().endswith("-")  # not revoked
    assert token.rsplit("_", 1)[1] not in result.output

    result = runner.invoke(app, ["keys", "revoke", key_id, *url])
    assert result.exit_code == 0 and "revoked" in result.output
    result = runner.invoke(app, ["keys", "list", "--active", *url])
    assert key_id not in result.output

    for args in (["create", "--scope", "root", "--name", "x"], ["revoke", "ffffffffffff"]):
        result = runner.invoke(app, ["keys", *args, *url])
        assert result.exit_code == 2 and "Traceback" not in result.output


# ------------------------------------------------------------------------------------- migration


def test_migration_adds_and_removes_the_api_keys_table(tmp_path: Path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'm.sqlite3'}")
    try:
        migrate.upgrade(engine, "0001")
        assert "api_keys" not in inspect(engine).get_table_names()
        migrate.upgrade(engine)
        columns = {c["name"] for c in inspect(engine).get_columns("api_keys")}
        expected = {"key_id", "name", "scope", "secret_hash", "created_at", "last_used_at", "revoked_at"}
        assert columns >= expected
        migrate.downgrade(engine, "0001")
        tables = set(inspect(engine).get_table_names())
        assert "api_keys" not in tables and "galleries" in tables
    finally:
        engine.dispose()


def test_metrics_need_a_key_when_auth_is_on(secured: Any) -> None:
    client, _, keys = secured
    body = problem(client.get("/metrics"), 401, "unauthorized")
    assert "gallery" not in body["detail"]
    r = client.get("/metrics", headers=bearer(keys[Scope.READ].token))
    assert r.status_code == 200 and "reid_" in r.text
