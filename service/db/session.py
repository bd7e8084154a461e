"""Engines and sessions: SQLite (WAL, busy timeout, foreign keys) by default, PostgreSQL by URL.

The service uses synchronous SQLAlchemy sessions, run in worker threads from async endpoints: the
drivers it needs (sqlite3, psycopg 3) are dependable in sync mode, and the work per request is a
handful of short statements.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


class DatabaseURLError(ValueError):
    """The database URL names a driver the service does not support."""


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run while one writer commits; the busy timeout makes concurrent writers
    # wait instead of failing with "database is locked"; SQLite enforces foreign keys (and so the
    # ON DELETE CASCADE of the schema) only when asked, per connection. synchronous=FULL: under WAL,
    # NORMAL may lose the last commits on power loss, and the API answers "201 once durable".
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


def create_db_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine for a SQLite or PostgreSQL (psycopg 3) URL with the settings the service needs.

    A ``postgresql://`` URL is taken to mean psycopg 3; ``postgresql+psycopg2`` is refused because
    that driver is not installed with the service.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            **kwargs,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif parsed.drivername != "postgresql+psycopg":
            raise DatabaseURLError(
                f"database URL driver {parsed.drivername!r} is not supported: "
                "use postgresql+psycopg://USER@HOST/DB (psycopg 3)"
            )
        return create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20, **kwargs)
    raise DatabaseURLError(
        f"database URL backend {backend!r} is not supported: use sqlite:///PATH or postgresql+psycopg://..."
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: rows read in a transaction are serialised to JSON after it commits.
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work is committed on normal exit and rolled back on an exception."""
    with factory() as session, session.begin():
        yield session
