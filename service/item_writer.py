"""Adding and deleting gallery items: the one place where the database and the index change together.

An item is acknowledged only when its row, its embedding by every model bound to the gallery and
its operation-log entries are committed in one transaction; the in-memory index is updated right
after, under the gallery's write lock, so log order and index order agree. A deleted item becomes a
tombstone (``status = 'deleted'``) with a ``remove`` operation, so no replay can bring it back.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Select, insert, select
from sqlalchemy.orm import Session, sessionmaker

from service.db.session import transaction
from service.db.tables import Embedding, Gallery, Item, Operation, utcnow
from service.gallery_index import GalleryState, IndexManager

logger = logging.getLogger(__name__)


class GalleryGoneError(LookupError):
    """The gallery was deleted while the write was being prepared."""


class GalleryModelsChangedError(RuntimeError):
    """The gallery's models changed (an upgrade started or switched) after the images were embedded.

    The caller embeds again with :func:`gallery_model_ids` and retries.
    """

    def __init__(self, required: set[int]) -> None:
        super().__init__(f"the gallery now needs embeddings by models {sorted(required)}")
        self.required = required


@dataclass(frozen=True)
class NewItem:
    """What is known about an image before it becomes an item."""

    content_hash: str
    image_format: str
    width: int
    height: int
    identity: str | None = None
    camera: str | None = None
    captured_at: dt.datetime | None = None
    source_path: str | None = None


@dataclass(frozen=True)
class StoredItem:
    """An item as committed by :meth:`ItemWriter.add` (the columns of its row)."""

    id: int
    gallery_id: int
    identity: str | None
    camera: str | None
    captured_at: dt.datetime | None
    source_path: str | None
    content_hash: str
    image_format: str
    width: int
    height: int
    status: str
    job_id: int | None
    created_at: dt.datetime


def insert_items(
    session: Session,
    gallery_id: int,
    new_items: Sequence[NewItem],
    vectors: Mapping[int, np.ndarray],
    model_ids: Collection[int],
    *,
    job_id: int | None = None,
    log_operations: bool = True,
) -> tuple[list[StoredItem], int | None]:
    """Insert items, their embeddings by ``model_ids`` and their ``add`` operations; the caller commits.

    The rows of an item are written here only (:meth:`ItemWriter.add`, and the benchmarks that fill
    a gallery without a service), so a new column is added once.

    Args:
        vectors: model id -> ``(len(new_items), dim)`` embeddings, row ``i`` for item ``i``.
        log_operations: also write the operation-log entries (False only for a gallery that is
            served from a snapshot, which has pruned them).

    Returns:
        The stored items in order, and the last operation's sequence number (None without a log).
    """
    now = utcnow()
    # Core bulk inserts (one multi-row statement each, RETURNING the keys in order): the ORM's
    # per-object bookkeeping would cost more than the model's forward pass on a GPU.
    rows = [
        {
            "gallery_id": gallery_id,
            "identity": n.identity,
            "camera": n.camera,
            "captured_at": n.captured_at,
            "source_path": n.source_path,
            "content_hash": n.content_hash,
            "image_format": n.image_format,
            "width": n.width,
            "height": n.height,
            "status": "active",
            "job_id": job_id,
            "created_at": now,
        }
        for n in new_items
    ]
    item_table, op_table = Item.__table__, Operation.__table__
    ids = list(
        session.scalars(insert(item_table).returning(item_table.c.id, sort_by_parameter_order=True), rows)
    )
    embeddings, ops = [], []
    for model_id in sorted(model_ids):
        array = np.ascontiguousarray(vectors[model_id], dtype=np.float32)
        embeddings.extend(
            {"item_id": item_id, "model_id": model_id, "vector": array[row].tobytes()}
            for row, item_id in enumerate(ids)
        )
        ops.extend(
            {
                "gallery_id": gallery_id,
                "item_id": item_id,
                "model_id": model_id,
                "op": "add",
                "created_at": now,
            }
            for item_id in ids
        )
    session.execute(insert(Embedding.__table__), embeddings)
    last_seq = (
        max(session.scalars(insert(op_table).returning(op_table.c.seq), ops)) if log_operations else None
    )
    items = [StoredItem(id=item_id, **row) for item_id, row in zip(ids, rows, strict=True)]
    return items, last_seq


def _existing_gallery(session: Session, gallery_id: int) -> Gallery:
    """The gallery's row; GalleryGoneError when it was deleted (e.g. while a job was running)."""
    gallery = session.get(Gallery, gallery_id)
    if gallery is None:
        raise GalleryGoneError(f"gallery {gallery_id} no longer exists")
    return gallery


def gallery_model_ids(session: Session, gallery_id: int) -> set[int]:
    """The model versions every new item of the gallery must be embedded with."""
    gallery = _existing_gallery(session, gallery_id)
    ids = {gallery.model_id}
    if gallery.standby_model_id is not None:
        ids.add(gallery.standby_model_id)
    return ids


class ItemWriter:
    """Writes items and deletions durably, then applies them to the indexes."""

    def __init__(self, session_factory: sessionmaker[Session], indexes: IndexManager) -> None:
        self._sessions = session_factory
        self._indexes = indexes

    def add(
        self,
        gallery_id: int,
        new_items: Sequence[NewItem],
        vectors: Mapping[int, np.ndarray],
        *,
        job_id: int | None = None,
        before_commit: Callable[[Session, list[StoredItem]], None] | None = None,
    ) -> list[StoredItem]:
        """Insert items with their embeddings (``vectors[model_id]``, one row per item) in one transaction.

        Args:
            before_commit: called with the session and the new items inside the transaction, to
                commit more rows with them (the idempotency record of the request, say).

        Raises:
            GalleryGoneError: the gallery does not exist any more.
            GalleryModelsChangedError: ``vectors`` lacks a model the gallery now needs.
        """
        if not new_items:
            return []
        for model_id, array in vectors.items():
            if array.shape[0] != len(new_items):
                raise ValueError(f"model {model_id}: {array.shape[0]} vectors for {len(new_items)} items")
        state = self._state(gallery_id)
        with state.write_lock:
            with transaction(self._sessions) as session:
                required = gallery_model_ids(session, gallery_id)
                if not required.issubset(vectors):
                    raise GalleryModelsChangedError(required)
                items, last_seq = insert_items(
                    session, gallery_id, new_items, vectors, required, job_id=job_id
                )
                if before_commit is not None:
                    before_commit(session, items)
            # Committed: the items are acknowledged. Now the derived state.
            for model_id in sorted(required):
                try:
                    self._indexes.apply_add(gallery_id, model_id, items, vectors[model_id], last_seq)
                except Exception:
                    logger.exception("index update failed for gallery %d; replaying from the log", gallery_id)
                    self._reopen(gallery_id, model_id)
        return items

    def delete(self, gallery_id: int, item_ids: Sequence[int]) -> list[int]:
        """Tombstone active items and log their removal; returns the ids that were deleted."""
        state = self._state(gallery_id)
        with state.write_lock:
            with transaction(self._sessions) as session:
                items = session.scalars(
                    select(Item).where(
                        Item.gallery_id == gallery_id, Item.id.in_(list(item_ids)), Item.status == "active"
                    )
                ).all()
                if not items:
                    return []
                now = utcnow()
                ops = []
                for item in items:
                    item.status = "deleted"
                    item.deleted_at = now
                    ops.append(Operation(gallery_id=gallery_id, item_id=item.id, model_id=None, op="remove"))
                session.add_all(ops)
                session.flush()
                last_seq = max(op.seq for op in ops)
                deleted = [item.id for item in items]
            try:
                self._indexes.apply_remove(gallery_id, deleted, last_seq)
            except Exception:
                logger.exception("index removal failed for gallery %d; replaying from the log", gallery_id)
                for model_id in list(state.indexes):
                    self._reopen(gallery_id, model_id)
        return deleted

    def _state(self, gallery_id: int) -> GalleryState:
        try:
            return self._indexes.gallery(gallery_id)
        except KeyError as exc:
            raise GalleryGoneError(f"gallery {gallery_id} no longer exists") from exc

    def _reopen(self, gallery_id: int, model_id: int) -> None:
        state = self._state(gallery_id)
        gi = state.indexes.get(model_id)
        if gi is not None:
            self._indexes.open(gallery_id, model_id, gi.dim, gi.spec)

    # ----------------------------------------------------------------- model upgrade

    def add_embeddings(
        self, gallery_id: int, model_id: int, item_ids: Sequence[int], vectors: np.ndarray
    ) -> int:
        """Store embeddings of existing items by another model (re-embedding) and add them to its index.

        Items deleted meanwhile are left out. Returns how many embeddings were stored.
        """
        state = self._state(gallery_id)
        rows = {item_id: row for row, item_id in enumerate(item_ids)}
        with state.write_lock:
            with transaction(self._sessions) as session:
                _existing_gallery(session, gallery_id)
                items = session.scalars(
                    select(Item).where(Item.id.in_(list(item_ids)), Item.status == "active").order_by(Item.id)
                ).all()
                if not items:
                    return 0
                array = np.ascontiguousarray(vectors, dtype=np.float32)
                picked = array[[rows[i.id] for i in items]]
                session.add_all(
                    Embedding(item_id=item.id, model_id=model_id, vector=picked[n].tobytes())
                    for n, item in enumerate(items)
                )
                ops = [
                    Operation(gallery_id=gallery_id, item_id=i.id, model_id=model_id, op="add") for i in items
                ]
                session.add_all(ops)
                session.flush()
                last_seq = max(op.seq for op in ops)
            try:
                self._indexes.apply_add(gallery_id, model_id, items, picked, last_seq)
            except Exception:
                logger.exception("index update failed for gallery %d; replaying from the log", gallery_id)
                self._reopen(gallery_id, model_id)
        return len(items)

    def bind_standby(self, gallery_id: int, model_id: int, dim: int) -> None:
        """Make ``model_id`` the gallery's standby model (new items get embedded by it too)."""
        state = self._state(gallery_id)
        with state.write_lock:
            with transaction(self._sessions) as session:
                gallery = _existing_gallery(session, gallery_id)
                if gallery.model_id == model_id:
                    raise ValueError("the gallery already uses this model version")
                previous = gallery.standby_model_id
                if previous != model_id:
                    gallery.standby_model_id = model_id
                    gallery.standby_ready = False
                spec = gallery.index_spec
            if previous is not None and previous != model_id:
                self._indexes.drop_index(gallery_id, previous)
            if model_id not in state.indexes:
                # Resuming: embeddings stored by an earlier attempt come back from the database.
                self._indexes.open(gallery_id, model_id, dim, spec)

    def mark_standby_ready(self, gallery_id: int, model_id: int) -> bool:
        """Record that the standby index holds every active item; False if the standby changed."""
        state = self._state(gallery_id)
        with state.write_lock, transaction(self._sessions) as session:
            gallery = session.get(Gallery, gallery_id)
            if gallery is None or gallery.standby_model_id != model_id:
                return False
            missing = session.scalar(_missing_count(gallery_id, model_id))
            if missing:
                return False
            gallery.standby_ready = True
            return True

    def switch_model(self, gallery_id: int) -> tuple[int, int]:
        """Swap the active and the (complete) standby model atomically; returns (new active, new standby).

        Searches read the active model once per request, so each sees either the old or the new index.
        """
        state = self._state(gallery_id)
        with state.write_lock:
            with transaction(self._sessions) as session:
                gallery = _existing_gallery(session, gallery_id)
                if gallery.standby_model_id is None or not gallery.standby_ready:
                    raise StandbyNotReadyError(
                        "the gallery has no complete standby index: run a re-embed job first"
                    )
                if gallery.standby_model_id not in state.indexes:
                    raise StandbyNotReadyError("the standby index is not loaded in this process")
                gallery.model_id, gallery.standby_model_id = gallery.standby_model_id, gallery.model_id
                active, standby = gallery.model_id, gallery.standby_model_id
            state.active_model_id = active
        return active, standby

    def drop_standby(self, gallery_id: int) -> int | None:
        """Forget the standby model: its index goes and new items stop being embedded by it.

        Its stored embeddings stay: binding the same version again later embeds only the items
        added in between.
        """
        state = self._state(gallery_id)
        with state.write_lock:
            with transaction(self._sessions) as session:
                gallery = _existing_gallery(session, gallery_id)
                standby = gallery.standby_model_id
                gallery.standby_model_id = None
                gallery.standby_ready = False
            if standby is not None:
                self._indexes.drop_index(gallery_id, standby)
        return standby


class StandbyNotReadyError(RuntimeError):
    """A model switch was asked for while no complete standby index exists."""


def _missing_count(gallery_id: int, model_id: int) -> Select[tuple[int]]:
    """SELECT: how many active items of the gallery lack an embedding by ``model_id``."""
    from sqlalchemy import exists, func

    has = exists().where(Embedding.item_id == Item.id, Embedding.model_id == model_id)
    return (
        select(func.count())
        .select_from(Item)
        .where(Item.gallery_id == gallery_id, Item.status == "active", ~has)
    )


def missing_items(
    gallery_id: int, model_id: int, *, after_id: int, limit: int, exclude: Collection[int] = ()
) -> Select[tuple[Item]]:
    """SELECT: the next active items of the gallery (by id) without an embedding by ``model_id``."""
    from sqlalchemy import exists

    has = exists().where(Embedding.item_id == Item.id, Embedding.model_id == model_id)
    stmt = select(Item).where(
        Item.gallery_id == gallery_id, Item.status == "active", Item.id > after_id, ~has
    )
    if exclude:
        stmt = stmt.where(Item.id.not_in(list(exclude)))
    return stmt.order_by(Item.id).limit(limit)
