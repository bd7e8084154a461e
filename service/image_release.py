"""Removing uploaded image bytes (and their thumbnails) once no active item refers to them.

Uploads are stored once per content, so one file may serve several items, in several galleries; a
deleted item's bytes go only when the last active item using them is gone (ingested files are the
data set's and are never removed; their cached thumbnails are the service's and go). Deleting an
item releases its content at once; deleting a gallery releases its contents after the answer
(:func:`release`, in batches); :func:`sweep_orphans` runs at start-up and hourly for what either
missed (a service that died meanwhile) and for bytes no item ever got (a request that failed or
died between storing its images and committing its items).

Why this cannot remove bytes an acknowledged item needs, with uploads of the same content running
concurrently (in this process or another replica): the release checks the database, withdraws the
file (an atomic rename), and checks again; only then is the file deleted, and if the second check
finds an item the file is put back. An upload stores its bytes, commits its items, and then stores
them again if they are missing (:meth:`ImageStore.put` is a no-op when they are there). If the
upload's commit comes before the second check, the check sees it and the file is restored; if it
comes after, the withdrawal came before it too, so the upload's store-again finds the file missing
and writes it. Either way the committed item has its bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TypeVar

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Item
from service.imaging.store import ImageStore

logger = logging.getLogger(__name__)

#: A stored file younger than this is left to the request that may still be committing its item.
ORPHAN_MIN_AGE_S = 3600.0
#: Contents checked per query (well under the bound parameters SQLite and PostgreSQL allow).
BATCH = 400

T = TypeVar("T")


@dataclass(frozen=True)
class Content:
    """One image content some items used: its bytes are ours to remove when ``uploaded``."""

    content_hash: str
    image_format: str
    uploaded: bool


def contents_of(session: Session, *, gallery_id: int, item_ids: Iterable[int] | None = None) -> set[Content]:
    """The contents of these items of the gallery (all of its items when ``item_ids`` is None)."""
    query = select(Item.content_hash, Item.image_format, Item.source_path.is_(None)).where(
        Item.gallery_id == gallery_id
    )
    if item_ids is not None:
        query = query.where(Item.id.in_(list(item_ids)))
    return {Content(h, f, bool(up)) for h, f, up in session.execute(query.distinct())}


def _batches(values: Iterable[T]) -> Iterator[list[T]]:
    it = iter(values)
    while batch := list(islice(it, BATCH)):
        yield batch


def _uploads_in_use(session: Session, pairs: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """The (content hash, format) pairs that an active uploaded item uses."""
    query = select(Item.content_hash, Item.image_format).where(
        tuple_(Item.content_hash, Item.image_format).in_(pairs),
        Item.source_path.is_(None),
        Item.status == "active",
    )
    return {(h, f) for h, f in session.execute(query.distinct())} if pairs else set()


def _hashes_in_use(session: Session, hashes: Sequence[str]) -> set[str]:
    # Thumbnails are cached by content alone: an ingested item with the same pixels shares them.
    query = select(Item.content_hash).where(Item.content_hash.in_(list(hashes)), Item.status == "active")
    return set(session.scalars(query.distinct())) if hashes else set()


def release(sessions: sessionmaker[Session], images: ImageStore, contents: Iterable[Content]) -> int:
    """Delete the stored bytes and thumbnails of the contents no active item uses; how many files went."""
    removed = 0
    for batch in _batches(contents):
        with sessions() as session:
            used = _uploads_in_use(session, [(c.content_hash, c.image_format) for c in batch if c.uploaded])
        withdrawn = {}
        for c in batch:
            key = (c.content_hash, c.image_format)
            if c.uploaded and key not in used and (aside := images.withdraw(*key)) is not None:
                withdrawn[key] = aside
        with sessions() as session:
            # The second check: an upload that committed since the first one keeps its bytes.
            used = _uploads_in_use(session, list(withdrawn))
            hashes_used = _hashes_in_use(session, sorted({c.content_hash for c in batch}))
        for key, aside in withdrawn.items():
            if key in used:
                images.restore(aside, *key)
            else:
                aside.unlink(missing_ok=True)
                removed += 1
        for content_hash in {c.content_hash for c in batch} - hashes_used:
            images.drop_thumbnails(content_hash)
    return removed


def release_quietly(sessions: sessionmaker[Session], images: ImageStore, contents: Iterable[Content]) -> None:
    """:func:`release` once the deletion is committed: a failure is logged (the hourly sweep retries)."""
    try:
        release(sessions, images, contents)
    except Exception:
        logger.exception("removing the images of deleted items failed; the hourly sweep will retry")


def sweep_orphans(
    sessions: sessionmaker[Session], images: ImageStore, *, min_age_s: float = ORPHAN_MIN_AGE_S
) -> int:
    """Release every stored upload and thumbnail older than ``min_age_s`` that no active item uses.

    Returns how many stored uploads were removed.
    """
    # Listed first: the release renames files in the folders being listed.
    uploads = [Content(h, f, True) for h, f in images.stored(older_than_s=min_age_s)]
    thumbnails = [Content(h, "", False) for h in images.thumbnailed(older_than_s=min_age_s)]
    removed = release(sessions, images, [*uploads, *thumbnails])
    if removed:
        logger.info("removed %d stored images no active item uses", removed)
    return removed
