"""The SQL data model (SQLAlchemy 2, typed ORM): the source of truth of the service.

The schema is created only by the Alembic migrations in ``migrations/``; a test checks that these
classes and the migrations agree. The vector index is derived from these tables: ``items`` and
``embeddings`` say what should be searchable, ``operations`` orders every change so an index
snapshot plus the operations after its ``last_seq`` reproduce the current state.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints, so migrations on SQLite (batch mode) and PostgreSQL can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key.
BigId = BigInteger().with_variant(Integer(), "sqlite")
# Tables marked sqlite_autoincrement never hand out a key twice, as PostgreSQL sequences do not:
# a deleted gallery's URL must not lead to a new gallery, and operation sequence numbers must
# grow even after old operations are pruned (a snapshot's last_seq relies on it).


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ModelRow(Base):
    """A model version the service has loaded at least once (name + 12-hex version)."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    dim: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Gallery(Base):
    """A searchable set of items, bound to one active model version (and optionally a standby one).

    While ``standby_model_id`` is set, new items are embedded with both models so that either index
    is complete: that is what makes a model upgrade switchable both ways.
    """

    __tablename__ = "galleries"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    standby_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"), nullable=True)
    standby_ready: Mapped[bool] = mapped_column(Boolean, default=False)
    index_spec: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    model: Mapped[ModelRow] = relationship(foreign_keys=[model_id], lazy="joined")
    standby_model: Mapped[ModelRow | None] = relationship(foreign_keys=[standby_model_id], lazy="joined")


class Item(Base):
    """One image in a gallery with its metadata; ``status`` is ``active`` or ``deleted`` (a tombstone)."""

    __tablename__ = "items"
    __table_args__ = (
        Index(None, "gallery_id", "content_hash"),
        Index(None, "gallery_id", "status", "id"),
        Index(None, "content_hash"),  # any gallery's use of a content (service.image_release)
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    gallery_id: Mapped[int] = mapped_column(ForeignKey("galleries.id", ondelete="CASCADE"))
    identity: Mapped[str | None] = mapped_column(String(200), nullable=True)
    camera: Mapped[str | None] = mapped_column(String(200), nullable=True)
    captured_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    source_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    image_format: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="active")
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Embedding(Base):
    """An item's embedding by one model version: float32 bytes, L2-normalised."""

    __tablename__ = "embeddings"

    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"), primary_key=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class Operation(Base):
    """The operation log: every change to what an index must contain, in commit order per gallery.

    ``op`` is ``add`` (the item's embedding by ``model_id`` enters that model's index) or ``remove``
    (``model_id`` is NULL: the item leaves every index of the gallery).
    """

    __tablename__ = "operations"
    __table_args__ = (Index(None, "gallery_id", "seq"), {"sqlite_autoincrement": True})

    seq: Mapped[int] = mapped_column(BigId, primary_key=True)
    gallery_id: Mapped[int] = mapped_column(ForeignKey("galleries.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(BigInteger)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"), nullable=True)
    op: Mapped[str] = mapped_column(String(8))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class IndexSnapshot(Base):
    """An index written to disk, valid up to and including operation ``last_seq``."""

    __tablename__ = "index_snapshots"
    __table_args__ = (Index(None, "gallery_id", "model_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    gallery_id: Mapped[int] = mapped_column(ForeignKey("galleries.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    path: Mapped[str] = mapped_column(Text)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    """A background job (``ingest``, ``reembed``, ``evaluate``) with its progress.

    ``status``: queued -> running -> succeeded | failed | cancelled. A job found ``running`` at
    start-up was interrupted by a crash and is queued again; jobs are written to be re-run safely.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        Index(None, "status", "id"),
        Index(None, "gallery_id", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    gallery_id: Mapped[int | None] = mapped_column(
        ForeignKey("galleries.id", ondelete="SET NULL"), nullable=True
    )
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class JobError(Base):
    """One input a job could not process (an unreadable image, say); the job goes on without it."""

    __tablename__ = "job_errors"
    __table_args__ = (Index(None, "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(Text)
    error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Evaluation(Base):
    """An evaluation of a model on a labelled dataset; run by the job ``job_id``."""

    __tablename__ = "evaluations"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    protocol: Mapped[str] = mapped_column(String(32))
    dataset: Mapped[dict[str, Any]] = mapped_column(JSON)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    rerank: Mapped[bool] = mapped_column(Boolean, default=False)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    duration_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)

    job: Mapped[Job] = relationship(lazy="joined")
    model: Mapped[ModelRow] = relationship(lazy="joined")


class IdempotencyKey(Base):
    """The stored answer to a request made with an ``Idempotency-Key`` header, replayed on retries.

    ``scope`` is the route (``POST /v1/galleries/3/items``), ``caller`` who sent it (``key:ID`` of
    an API key, ``anonymous`` with authentication off): two callers never share a key's answer.
    Rows older than the ``idempotency_ttl_s`` setting are expired (and purged, by ``created_at``).
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("key", "scope", "caller"), Index(None, "created_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200))
    scope: Mapped[str] = mapped_column(String(300))
    caller: Mapped[str] = mapped_column(String(64), server_default="anonymous")
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    location: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """An API key: its public id, its scope and the SHA-256 of the key (the key itself is never stored).

    Revoked keys keep their row (``revoked_at`` set) so that ``reid keys list`` shows who had access.
    """

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("scope IN ('read', 'write', 'admin')", name="scope"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    scope: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
