"""Alembic migrations: empty -> head -> base on both databases; ORM and migrations agree; `reid db`."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from typer.testing import CliRunner

from service.db import migrate
from service.db.session import DatabaseURLError, create_db_engine
from service.db.tables import Base

TABLES = {
    "models",
    "galleries",
    "items",
    "embeddings",
    "operations",
    "index_snapshots",
    "jobs",
    "job_errors",
    "evaluations",
    "idempotency_keys",
    "api_keys",
}


def test_upgrade_downgrade_and_no_drift(database_url: str) -> None:
    engine = create_db_engine(database_url)
    try:
        assert migrate.current_revision(engine) is None
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert set(inspect(engine).get_table_names()) >= TABLES
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert diff == [], f"the ORM models and the migrations disagree: {diff}"
        migrate.upgrade(engine)  # idempotent at head
        migrate.downgrade(engine, "base")
        assert migrate.current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(engine)  # and back up again
        assert set(inspect(engine).get_table_names()) >= TABLES
    finally:
        engine.dispose()


def test_sqlite_connections_are_configured(tmp_path) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()


@pytest.mark.parametrize("url", ["mysql://x/y", "postgresql+psycopg2://u@h/d"])
def test_unsupported_database_urls_are_refused(url: str) -> None:
    with pytest.raises(DatabaseURLError, match="not supported"):
        create_db_engine(url)


def test_reid_db_commands(database_url: str) -> None:
    import typer

    from service.cli import register

    app = typer.Typer()
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["db", "current", "--database-url", database_url])
    assert result.exit_code == 0 and "current: base (empty)" in result.output
    result = runner.invoke(app, ["db", "upgrade", "--database-url", database_url])
    assert result.exit_code == 0, result.output
    head = migrate.head_revision()
    assert f"database at revision {head}" in result.output
    result = runner.invoke(app, ["db", "current", "--database-url", database_url])
    assert f"current: {head}; head: {head}" in result.output
    result = runner.invoke(app, ["db", "downgrade", "base", "--database-url", database_url])
    assert result.exit_code == 0 and "base (empty)" in result.output
