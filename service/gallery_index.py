"""The in-memory vector indexes of the galleries: derived state, rebuilt from the database at will.

One :class:`GalleryIndex` per (gallery, model version). At start-up each is loaded from its newest
valid snapshot and brought up to date by replaying the operation log after the snapshot's
``last_seq``; when no snapshot can be read it is rebuilt from the stored embeddings. Replay is
idempotent: the items touched after the snapshot are removed and the ones that are active (with an
embedding by this model) are added again, so replaying an operation twice, or one the snapshot
already holds, changes nothing, and a deleted item never comes back.

Writers (item uploads, jobs, deletes) hold the gallery's ``write_lock`` across their database
transaction and the index update, so operation sequence numbers of one gallery are committed and
applied in the same order and a snapshot's ``last_seq`` is exact.

A snapshot folder is trusted only while the ``index_snapshots`` table records its ``last_seq``
(the newest few per index), and operations older than every recorded snapshot of a gallery are
pruned, so the log stays short and every loadable snapshot still has the operations after it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from index import Attributes, SearchFilter, SnapshotError, VectorIndex, create_index, load_index
from index.snapshot import read_manifest
from service.db.tables import Embedding, Gallery, IndexSnapshot, Item, Operation

logger = logging.getLogger(__name__)

NO_ATTRIBUTE = -1
REPLAY_CHUNK = 5000


class ItemLike(Protocol):
    """What the index needs of an item: its id and filterable attributes."""

    id: int
    camera: str | None
    identity: str | None
    captured_at: dt.datetime | None


def attribute_code(value: str | None) -> int:
    """A stable non-negative 63-bit code for a camera or identity string (-1 for none).

    The index filters on integers; the database keeps the strings. A 63-bit hash makes two
    different names collide with probability ~1e-19 per pair.
    """
    if value is None:
        return NO_ATTRIBUTE
    digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def epoch(value: dt.datetime | None) -> float:
    return float("nan") if value is None else value.timestamp()


def item_attributes(items: Sequence[ItemLike]) -> Attributes:
    """The filterable attributes of items, in the index's vocabulary."""
    return Attributes(
        camera=np.array([attribute_code(i.camera) for i in items], dtype=np.int64),
        captured_at=np.array([epoch(i.captured_at) for i in items], dtype=np.float64),
        identity=np.array([attribute_code(i.identity) for i in items], dtype=np.int64),
    )


def vectors_from_bytes(blobs: Sequence[bytes], dim: int) -> np.ndarray:
    out = np.frombuffer(b"".join(blobs), dtype=np.float32)
    return out.reshape(len(blobs), dim)


@dataclass
class GalleryIndex:
    """The index of one gallery for one model version, and how far into the operation log it is."""

    gallery_id: int
    model_id: int
    dim: int
    spec: str
    index: VectorIndex
    last_seq: int = 0
    snapshot_seq: int = -1
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __len__(self) -> int:
        return len(self.index)

    def add(self, ids: np.ndarray, vectors: np.ndarray, attributes: Attributes) -> None:
        with self.lock:
            self.index.add(ids, vectors, attributes=attributes)

    def remove(self, ids: np.ndarray) -> int:
        with self.lock:
            return int(self.index.remove(ids))

    def search(
        self, queries: np.ndarray, k: int, search_filter: SearchFilter | None
    ) -> tuple[np.ndarray, np.ndarray]:
        # No lock: the index serialises its own mutations against concurrent searches.
        scores, ids = self.index.search(queries, k, filter=search_filter)
        return np.asarray(scores), np.asarray(ids)


@dataclass
class GalleryState:
    """The indexes of one gallery and the lock that orders its writes."""

    gallery_id: int
    active_model_id: int
    indexes: dict[int, GalleryIndex] = field(default_factory=dict)
    write_lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def active(self) -> GalleryIndex:
        return self.indexes[self.active_model_id]


class IndexManager:
    """Owns every gallery's indexes: load/replay/rebuild, apply writes, search, snapshot.

    Args:
        session_factory: database sessions.
        snapshot_dir: where snapshots are written.
        backend: ``faiss``, ``milvus``, ``torch`` (see ``index.create_index``) or ``auto``: flat
            (exact) indexes on the torch backend on ``exact_device`` when one is given, every
            other index on FAISS.
        backend_options: extra keyword arguments of ``create_index`` (e.g. the Milvus URI).
        snapshots_kept: snapshots kept per index; older ones are deleted.
        exact_device: with ``auto``, the GPU on which flat indexes search (None: FAISS for all).
    """

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        snapshot_dir: Path,
        *,
        backend: str = "faiss",
        backend_options: dict[str, Any] | None = None,
        snapshots_kept: int = 2,
        exact_device: str | None = None,
    ) -> None:
        self._sessions = session_factory
        self.snapshot_dir = Path(snapshot_dir)
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self.exact_device = exact_device
        self.snapshots_kept = snapshots_kept
        self._galleries: dict[int, GalleryState] = {}
        self._registry_lock = threading.Lock()

    # ----------------------------------------------------------------- lookup

    def gallery(self, gallery_id: int) -> GalleryState:
        with self._registry_lock:
            state = self._galleries.get(gallery_id)
            if state is None:
                raise KeyError(gallery_id)
            return state

    def has(self, gallery_id: int, model_id: int) -> bool:
        state = self._galleries.get(gallery_id)
        return state is not None and model_id in state.indexes

    def states(self) -> list[GalleryState]:
        with self._registry_lock:
            return list(self._galleries.values())

    # ----------------------------------------------------------------- creation and start-up

    def backend_for(self, spec: str) -> str:
        """The backend that new indexes of this spec get."""
        if self.backend != "auto":
            return self.backend
        return "torch" if spec == "flat" and self.exact_device is not None else "faiss"

    def _options_for(self, backend: str) -> dict[str, Any]:
        if self.backend != "auto":
            return dict(self.backend_options)
        return {"device": self.exact_device} if backend == "torch" and self.exact_device else {}

    def _new_index(self, gallery_id: int, model_id: int, dim: int, spec: str) -> VectorIndex:
        backend = self.backend_for(spec)
        options = self._options_for(backend)
        if backend == "milvus":
            # Milvus keeps collections itself: a new or rebuilt index starts from an empty one.
            options.setdefault("collection", f"reid_g{gallery_id}_m{model_id}")
            options["drop_existing"] = True
        return create_index(backend=backend, spec=spec, dim=dim, **options)

    def register_gallery(self, gallery_id: int, active_model_id: int) -> GalleryState:
        with self._registry_lock:
            state = self._galleries.get(gallery_id)
            if state is None:
                state = GalleryState(gallery_id, active_model_id)
                self._galleries[gallery_id] = state
            return state

    def create_empty(
        self, gallery_id: int, model_id: int, dim: int, spec: str, *, last_seq: int = 0
    ) -> GalleryIndex:
        """A new, empty index for a gallery that has no items for this model yet."""
        state = self.register_gallery(gallery_id, model_id)
        gi = GalleryIndex(
            gallery_id, model_id, dim, spec, self._new_index(gallery_id, model_id, dim, spec), last_seq
        )
        with state.write_lock:
            state.indexes[model_id] = gi
        return gi

    def open_all(self) -> None:
        """Load (snapshot + replay) or rebuild the index of every gallery's active and standby model."""
        with self._sessions() as session:
            galleries = session.scalars(select(Gallery).order_by(Gallery.id)).unique().all()
            plan = [
                (
                    g.id,
                    g.model_id,
                    g.index_spec,
                    g.model.dim,
                    g.standby_model_id,
                    g.standby_model.dim if g.standby_model else None,
                )
                for g in galleries
            ]
        for gallery_id, model_id, spec, dim, standby_id, standby_dim in plan:
            state = self.register_gallery(gallery_id, model_id)
            state.active_model_id = model_id
            self.open(gallery_id, model_id, dim, spec)
            if standby_id is not None and standby_dim is not None:
                self.open(gallery_id, standby_id, standby_dim, spec)

    def open(self, gallery_id: int, model_id: int, dim: int, spec: str) -> GalleryIndex:
        """Bring one index up to date from its newest valid snapshot, or rebuild it from the database."""
        state = self.register_gallery(gallery_id, model_id)
        with state.write_lock:
            gi = self._load_snapshot(gallery_id, model_id, dim, spec)
            if gi is None:
                gi = self._rebuild(gallery_id, model_id, dim, spec)
            else:
                self._replay(gi)
            state.indexes[model_id] = gi
            return gi

    def snapshot_path(self, gallery_id: int, model_id: int) -> Path:
        """The snapshot folder of one index (the index module writes generations into it atomically)."""
        return self.snapshot_dir / f"g{gallery_id}-m{model_id}"

    def _load_snapshot(self, gallery_id: int, model_id: int, dim: int, spec: str) -> GalleryIndex | None:
        path = self.snapshot_path(gallery_id, model_id)
        if not path.exists():
            return None
        try:
            last_seq = int(read_manifest(path).last_seq)
            with self._sessions() as session:
                recorded = session.scalar(
                    select(IndexSnapshot.id)
                    .where(
                        IndexSnapshot.gallery_id == gallery_id,
                        IndexSnapshot.model_id == model_id,
                        IndexSnapshot.last_seq == last_seq,
                    )
                    .limit(1)
                )
            if recorded is None:
                # Left by a deleted gallery whose id was reused, or by another database: not ours.
                raise SnapshotError(f"the database has no record of a snapshot at seq {last_seq}")
            loaded = load_index(path, **self._options_for(read_manifest(path).backend))
            if loaded.dim != dim:
                raise SnapshotError(f"snapshot has dimension {loaded.dim}, the model {dim}")
        except Exception as exc:  # whatever is wrong with the files, the database has the truth
            logger.warning(
                "index snapshot %s of gallery %d is unusable (%s); rebuilding from the database",
                path,
                gallery_id,
                exc,
            )
            return None
        logger.info(
            "gallery %d model %d: loaded snapshot %s (%d vectors, seq %d)",
            gallery_id,
            model_id,
            path,
            len(loaded),
            last_seq,
        )
        return GalleryIndex(gallery_id, model_id, dim, spec, loaded, last_seq, snapshot_seq=last_seq)

    def _rebuild(self, gallery_id: int, model_id: int, dim: int, spec: str) -> GalleryIndex:
        """Rebuild from stored embeddings; ``last_seq`` is read first (later operations replay safely)."""
        gi = GalleryIndex(gallery_id, model_id, dim, spec, self._new_index(gallery_id, model_id, dim, spec))
        with self._sessions() as session:
            gi.last_seq = _max_seq(session, gallery_id)
            stmt = (
                select(Item, Embedding.vector)
                .join(Embedding, Embedding.item_id == Item.id)
                .where(Item.gallery_id == gallery_id, Item.status == "active", Embedding.model_id == model_id)
                .order_by(Item.id)
                .execution_options(yield_per=REPLAY_CHUNK)
            )
            total = 0
            for chunk in session.execute(stmt).partitions(REPLAY_CHUNK):
                items = [row[0] for row in chunk]
                vectors = vectors_from_bytes([row[1] for row in chunk], dim)
                gi.add(np.array([i.id for i in items], dtype=np.int64), vectors, item_attributes(items))
                total += len(items)
        logger.info(
            "gallery %d model %d: rebuilt from the database (%d vectors)", gallery_id, model_id, total
        )
        self._replay(gi)
        return gi

    def _replay(self, gi: GalleryIndex) -> None:
        """Apply the operations after ``gi.last_seq`` (idempotently, see the module docstring)."""
        with self._sessions() as session:
            rows = session.execute(
                select(Operation.seq, Operation.item_id)
                .where(
                    Operation.gallery_id == gi.gallery_id,
                    Operation.seq > gi.last_seq,
                    or_(Operation.model_id == gi.model_id, Operation.model_id.is_(None)),
                )
                .order_by(Operation.seq)
            ).all()
            if not rows:
                gi.last_seq = max(gi.last_seq, _max_seq(session, gi.gallery_id))
                return
            touched = sorted({r.item_id for r in rows})
            last = max(r.seq for r in rows)
            gi.remove(np.asarray(touched, dtype=np.int64))
            added = 0
            for start in range(0, len(touched), REPLAY_CHUNK):
                chunk_ids = touched[start : start + REPLAY_CHUNK]
                result = session.execute(
                    select(Item, Embedding.vector)
                    .join(Embedding, Embedding.item_id == Item.id)
                    .where(Item.id.in_(chunk_ids), Item.status == "active", Embedding.model_id == gi.model_id)
                    .order_by(Item.id)
                ).all()
                if result:
                    items = [row[0] for row in result]
                    gi.add(
                        np.array([i.id for i in items], dtype=np.int64),
                        vectors_from_bytes([row[1] for row in result], gi.dim),
                        item_attributes(items),
                    )
                    added += len(items)
            gi.last_seq = max(last, _max_seq(session, gi.gallery_id))
        logger.info(
            "gallery %d model %d: replayed %d operations (%d items re-added)",
            gi.gallery_id,
            gi.model_id,
            len(rows),
            added,
        )

    # ----------------------------------------------------------------- writes (caller holds write_lock)

    def apply_add(
        self, gallery_id: int, model_id: int, items: Sequence[ItemLike], vectors: np.ndarray, last_seq: int
    ) -> None:
        state = self.gallery(gallery_id)
        gi = state.indexes.get(model_id)
        if gi is None:
            return
        gi.add(np.array([i.id for i in items], dtype=np.int64), vectors, item_attributes(items))
        self._advance(state, last_seq)

    def apply_remove(self, gallery_id: int, item_ids: Iterable[int], last_seq: int) -> None:
        state = self.gallery(gallery_id)
        ids = np.fromiter(item_ids, dtype=np.int64)
        for gi in state.indexes.values():
            gi.remove(ids)
        self._advance(state, last_seq)

    @staticmethod
    def _advance(state: GalleryState, last_seq: int) -> None:
        for gi in state.indexes.values():
            gi.last_seq = max(gi.last_seq, last_seq)

    def drop_gallery(self, gallery_id: int) -> None:
        with self._registry_lock:
            state = self._galleries.pop(gallery_id, None)
        if state is None:
            return
        for gi in state.indexes.values():
            _discard(gi.index)
        for path in self.snapshot_dir.glob(f"g{gallery_id}-m*"):
            _remove_path(path)

    def drop_index(self, gallery_id: int, model_id: int) -> None:
        state = self.gallery(gallery_id)
        with state.write_lock:
            gi = state.indexes.pop(model_id, None)
            if gi is not None:
                _discard(gi.index)
            # Rows first: a folder that outlives them (crash in between) is never loaded again.
            with self._sessions() as session, session.begin():
                session.execute(
                    delete(IndexSnapshot).where(
                        IndexSnapshot.gallery_id == gallery_id, IndexSnapshot.model_id == model_id
                    )
                )
            _remove_path(self.snapshot_path(gallery_id, model_id))

    # ----------------------------------------------------------------- snapshots

    def snapshot_all(self, *, force: bool = False) -> int:
        """Snapshot every index that changed since its last snapshot; returns how many were written."""
        written = 0
        for state in self.states():
            for model_id in list(state.indexes):
                try:
                    if self.snapshot(state.gallery_id, model_id, force=force):
                        written += 1
                except Exception:
                    logger.exception("snapshot of gallery %d model %d failed", state.gallery_id, model_id)
        return written

    def snapshot(self, gallery_id: int, model_id: int, *, force: bool = False) -> bool:
        """Write one index to its snapshot folder (atomically) and record it in the database.

        The gallery's writes wait while the index is written (searches do not), so that the
        snapshot's ``last_seq`` is exact; for very large flat indexes that pause is the write time.
        """
        try:
            state = self.gallery(gallery_id)
        except KeyError:
            return False
        with state.write_lock:
            gi = state.indexes.get(model_id)
            if gi is None or (gi.last_seq == gi.snapshot_seq and not force):
                return False
            path = self.snapshot_path(gallery_id, model_id)
            with gi.lock:
                gi.index.save(path, last_seq=gi.last_seq)
                count = len(gi.index)
            with self._sessions() as session, session.begin():
                if session.get(Gallery, gallery_id) is None:
                    return False
                session.add(
                    IndexSnapshot(
                        gallery_id=gallery_id,
                        model_id=model_id,
                        path=path.name,
                        last_seq=gi.last_seq,
                        count=count,
                    )
                )
                session.flush()
                # The folder holds only its newest generation; the rows are its history, trimmed.
                stale = session.scalars(
                    select(IndexSnapshot.id)
                    .where(IndexSnapshot.gallery_id == gallery_id, IndexSnapshot.model_id == model_id)
                    .order_by(IndexSnapshot.id.desc())
                    .offset(self.snapshots_kept)
                ).all()
                if stale:
                    session.execute(delete(IndexSnapshot).where(IndexSnapshot.id.in_(stale)))
                pruned = self._prune_operations(session, gallery_id, list(state.indexes))
            gi.snapshot_seq = gi.last_seq
            if pruned:
                logger.info("gallery %d: pruned %d operations no snapshot needs", gallery_id, pruned)
        logger.info(
            "gallery %d model %d: snapshot at seq %d (%d vectors)", gallery_id, model_id, gi.last_seq, count
        )
        return True

    @staticmethod
    def _prune_operations(session: Session, gallery_id: int, model_ids: list[int]) -> int:
        """Delete the operations that every recorded snapshot of the gallery's indexes already holds.

        A snapshot is loaded only if its row is still recorded (see ``_load_snapshot``), so the
        oldest recorded ``last_seq`` over the gallery's live indexes bounds what a replay can need.
        Rebuilds read items and embeddings, never old operations.
        """
        watermark: int | None = None
        for model_id in model_ids:
            oldest = session.scalar(
                select(func.min(IndexSnapshot.last_seq)).where(
                    IndexSnapshot.gallery_id == gallery_id, IndexSnapshot.model_id == model_id
                )
            )
            if oldest is None:
                return 0  # an index without a snapshot may still need a replay from the start
            watermark = oldest if watermark is None else min(watermark, oldest)
        if not watermark:
            return 0
        result = session.execute(
            delete(Operation).where(Operation.gallery_id == gallery_id, Operation.seq <= watermark)
        )
        return int(result.rowcount or 0)

    def close(self) -> None:
        for state in self.states():
            for gi in state.indexes.values():
                _close(gi.index)


def _max_seq(session: Session, gallery_id: int) -> int:
    value = session.scalar(select(func.max(Operation.seq)).where(Operation.gallery_id == gallery_id))
    return int(value or 0)


def _close(index: Any) -> None:
    close = getattr(index, "close", None)
    if callable(close):
        try:
            close()
        except Exception:
            logger.exception("closing an index failed")


def _discard(index: Any) -> None:
    """Forget an index for good: a backend that keeps data itself (Milvus) drops its collection."""
    if index.capabilities.persistent and callable(getattr(index, "drop", None)):
        try:
            index.drop()
        except Exception:
            logger.exception("dropping an index's collection failed")
    _close(index)


def _remove_path(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
