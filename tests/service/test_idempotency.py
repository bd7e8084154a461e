"""Idempotency keys through the real app: scoped to the caller's API key, expiring, safe after a 500.

On SQLite and PostgreSQL (the ``database_url`` fixture), plus migration 0003 up and down on both.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text

from service.app import create_app
from service.db import migrate
from service.db.session import create_db_engine
from service.db.tables import IdempotencyKey
from service.http.auth import ApiKeyStore, Scope
from tests.service.conftest import jpeg_bytes, make_settings

TTL_S = 600.0


@pytest.fixture
def app_client(
    tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path
) -> Iterator[TestClient]:
    """The app with authentication off (one anonymous caller) and a 10-minute key lifetime."""
    settings = make_settings(tmp_path, database_url, model_dirs, datasets_root, idempotency_ttl_s=TTL_S)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def gallery(client: TestClient, headers: dict[str, str] | None = None) -> int:
    r = client.post("/v1/galleries", json={"name": "door", "model": "person"}, headers=headers)
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


def post_upload(client: TestClient, gid: int, key: str, headers: dict[str, str] | None = None) -> Any:
    files = [("image", (f"{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in (11, 12)]
    return client.post(
        f"/v1/galleries/{gid}/items",
        files=files,
        data={"identity": "p1"},
        headers={"Idempotency-Key": key, **(headers or {})},
    )


def ids(response: Any) -> list[int]:
    assert response.status_code == 201, response.text
    return [item["id"] for item in response.json()["items"]]


def count(client: TestClient, gid: int, headers: dict[str, str] | None = None) -> int:
    return int(client.get(f"/v1/galleries/{gid}", headers=headers).json()["count"])


def test_the_same_key_from_two_api_keys_is_two_uploads(
    tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path
) -> None:
    settings = make_settings(tmp_path, database_url, model_dirs, datasets_root, auth="on", auth_cache_s=0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        store = ApiKeyStore(client.app.state.service.sessions)
        admin = {"Authorization": f"Bearer {store.create('admin', Scope.ADMIN).token}"}
        alice, bob = (
            {"Authorization": f"Bearer {store.create(name, Scope.WRITE).token}"} for name in ("alice", "bob")
        )
        gid = gallery(client, admin)
        first = ids(post_upload(client, gid, "k-1", alice))
        # Bob's "k-1" is his own request: stored anew, not Alice's answer replayed to him.
        second = ids(post_upload(client, gid, "k-1", bob))
        assert len(second) == 2 and not set(second) & set(first)
        assert count(client, gid, alice) == 4
        # Each caller's retry still replays their own answer.
        assert ids(post_upload(client, gid, "k-1", alice)) == first
        assert ids(post_upload(client, gid, "k-1", bob)) == second
        assert count(client, gid, alice) == 4
        with client.app.state.service.sessions() as session:
            callers = session.scalars(select(IdempotencyKey.caller).where(IdempotencyKey.key == "k-1")).all()
        writers = [f"key:{k.key_id}" for k in store.list() if k.name in ("alice", "bob")]
        assert sorted(callers) == sorted(writers)


def _age_answers(client: TestClient, seconds: float) -> None:
    """Make every stored answer ``seconds`` older (as if that much time had passed)."""
    with client.app.state.service.sessions() as session:
        for row in session.scalars(select(IdempotencyKey)):
            row.created_at = row.created_at - dt.timedelta(seconds=seconds)
        session.commit()


def test_an_expired_key_is_a_new_upload(app_client: TestClient) -> None:
    client = app_client
    gid = gallery(client)
    first = ids(post_upload(client, gid, "k-exp"))
    _age_answers(client, TTL_S - 60)
    assert ids(post_upload(client, gid, "k-exp")) == first  # still within REID_IDEMPOTENCY_TTL_S
    assert count(client, gid) == 2
    _age_answers(client, 120)
    again = ids(post_upload(client, gid, "k-exp"))
    assert len(again) == 2 and not set(again) & set(first)
    assert count(client, gid) == 4
    # The expired answer made way for the new one, which is now what retries get.
    with client.app.state.service.sessions() as session:
        rows = session.scalars(select(IdempotencyKey).where(IdempotencyKey.key == "k-exp")).all()
    assert len(rows) == 1 and [item["id"] for item in rows[0].response["items"]] == again
    assert ids(post_upload(client, gid, "k-exp")) == again


def test_expired_answers_are_purged_at_start_up(
    tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path
) -> None:
    settings = make_settings(tmp_path, database_url, model_dirs, datasets_root, idempotency_ttl_s=TTL_S)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        gid = gallery(client)
        ids(post_upload(client, gid, "old"))
        _age_answers(client, TTL_S + 1)
        ids(post_upload(client, gid, "fresh"))
    with (
        TestClient(create_app(settings), raise_server_exceptions=False) as client,
        client.app.state.service.sessions() as session,
    ):
        assert session.scalars(select(IdempotencyKey.key)).all() == ["fresh"]


def test_a_retry_after_a_500_that_followed_the_commit_returns_the_committed_items(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = app_client
    writer = client.app.state.service.writer
    gid = gallery(client)
    committed: list[list[int]] = []
    real_add = writer.add

    def add_then_fail(*args: Any, **kwargs: Any) -> Any:
        items = real_add(*args, **kwargs)  # committed, with its Idempotency-Key answer
        committed.append([item.id for item in items])
        raise RuntimeError("injected failure after the commit")

    monkeypatch.setattr(writer, "add", add_then_fail)
    failed = post_upload(client, gid, "k-500")
    assert failed.status_code == 500
    assert "injected" not in failed.text
    monkeypatch.setattr(writer, "add", real_add)
    retry = post_upload(client, gid, "k-500")
    assert ids(retry) == committed[0]
    assert count(client, gid) == 2  # not a second copy
    listed = client.get(f"/v1/galleries/{gid}/items").json()["items"]
    assert [item["id"] for item in listed] == committed[0]


def test_a_malformed_key_is_refused_and_the_header_is_documented(app_client: TestClient) -> None:
    client = app_client
    gid = gallery(client)
    for bad in ("x" * 201, "   "):
        r = post_upload(client, gid, bad)
        assert r.status_code == 400 and r.json()["type"].endswith("/idempotency-key"), r.text
    assert count(client, gid) == 0
    operation = client.get("/openapi.json").json()["paths"]["/v1/galleries/{gallery_id}/items"]["post"]
    header = next(p for p in operation["parameters"] if p["name"] == "Idempotency-Key")
    assert header["in"] == "header" and "REID_IDEMPOTENCY_TTL_S" in header["description"]


# ------------------------------------------------------------------------------------ migration 0003


def test_migration_0003_up_and_down_keeps_the_answers(database_url: str) -> None:
    engine = create_db_engine(database_url)
    insert = text(
        "INSERT INTO idempotency_keys (key, scope, request_hash, status_code, response, created_at) "
        "VALUES (:key, 'POST /v1/evaluations', 'h', 202, '{}', :at)"
    )
    now = dt.datetime.now(dt.UTC)
    try:
        migrate.upgrade(engine, "0002")
        with engine.begin() as conn:
            conn.execute(insert, {"key": "before", "at": now.replace(tzinfo=None)})  # UTC, as stored
        migrate.upgrade(engine, "0003")
        assert migrate.current_revision(engine) == "0003"
        inspector = inspect(engine)
        assert "caller" in {c["name"] for c in inspector.get_columns("idempotency_keys")}
        uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("idempotency_keys")}
        assert ("key", "scope", "caller") in uniques and ("key", "scope") not in uniques
        indexes = {i["name"] for i in inspector.get_indexes("idempotency_keys")}
        assert "ix_idempotency_keys_created_at" in indexes
        with engine.begin() as conn:
            # The row from before the upgrade belongs to the anonymous caller; another caller may
            # now hold the same key on the same route.
            assert conn.execute(select(IdempotencyKey.caller)).scalars().all() == ["anonymous"]
            conn.execute(
                IdempotencyKey.__table__.insert().values(
                    key="before",
                    scope="POST /v1/evaluations",
                    caller="key:0123456789ab",
                    request_hash="h2",
                    status_code=202,
                    response={},
                    created_at=now,
                )
            )
        migrate.downgrade(engine, "0002")
        assert migrate.current_revision(engine) == "0002"
        inspector = inspect(engine)
        assert "caller" not in {c["name"] for c in inspector.get_columns("idempotency_keys")}
        uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("idempotency_keys")}
        assert ("key", "scope") in uniques
        with engine.connect() as conn:
            # One answer per (key, scope) is left, the oldest: what the old code replays.
            rows = conn.execute(text("SELECT key, request_hash FROM idempotency_keys")).all()
        assert [tuple(r) for r in rows] == [("before", "h")]
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
    finally:
        engine.dispose()
