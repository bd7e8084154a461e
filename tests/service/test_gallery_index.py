"""The derived index against the database under random histories of writes, snapshots and restarts.

A hypothesis state machine adds and deletes items through :class:`ItemWriter`, writes snapshots,
"crashes" (drops the in-memory indexes and opens them again from snapshot + log, or from the
stored embeddings), damages snapshots and switches models; after every step the index must hold
exactly the active items of the database, each findable by its own vector.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlalchemy import select

from service.db import migrate
from service.db.session import create_db_engine, make_session_factory, transaction
from service.db.tables import Gallery, Item, ModelRow
from service.gallery_index import IndexManager
from service.item_writer import ItemWriter, NewItem

DIM = 8
_TEMPLATE: list[Path] = []


def _migrated_template() -> Path:
    """An empty database at the head revision, migrated once and copied for every example."""
    if not _TEMPLATE:
        path = Path(tempfile.mkdtemp(prefix="reid-index-sm-template-")) / "db.sqlite3"
        engine = create_db_engine(f"sqlite:///{path}")
        migrate.upgrade(engine)
        engine.dispose()  # checkpoints the WAL: the one file holds everything
        _TEMPLATE.append(path)
    return _TEMPLATE[0]


class DerivedIndex(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="reid-index-sm-"))
        shutil.copy(_migrated_template(), self.tmp / "db.sqlite3")
        self.engine = create_db_engine(f"sqlite:///{self.tmp / 'db.sqlite3'}")
        self.sessions = make_session_factory(self.engine)
        with transaction(self.sessions) as session:
            models = [
                ModelRow(name="m", version=f"v{i}", kind="person", dim=DIM, path="-", meta={}) for i in (1, 2)
            ]
            session.add_all(models)
            session.flush()
            self.model_ids = [m.id for m in models]
            gallery = Gallery(name="g", model_id=self.model_ids[0], index_spec="flat")
            session.add(gallery)
            session.flush()
            self.gallery_id = gallery.id
        self.rng = np.random.default_rng(0)
        # item id -> model id -> vector: what the embeddings table holds for the active items
        self.vectors: dict[int, dict[int, np.ndarray]] = {}
        self.counter = 0
        self._open(fresh=True)

    def _open(self, *, fresh: bool = False) -> None:
        self.indexes = IndexManager(self.sessions, self.tmp / "snapshots", snapshots_kept=2)
        if fresh:
            self.indexes.create_empty(self.gallery_id, self.model_ids[0], DIM, "flat")
        else:
            self.indexes.open_all()
        self.writer = ItemWriter(self.sessions, self.indexes)

    def _gallery_models(self) -> set[int]:
        with self.sessions() as session:
            gallery = session.get(Gallery, self.gallery_id)
            return {m for m in (gallery.model_id, gallery.standby_model_id) if m is not None}

    @rule(n=st.integers(1, 5))
    def add(self, n: int) -> None:
        models = self._gallery_models()
        vectors = {m: self.rng.standard_normal((n, DIM)).astype(np.float32) for m in models}
        new = []
        for _ in range(n):
            self.counter += 1
            new.append(
                NewItem(
                    content_hash=f"{self.counter:064x}",
                    image_format="JPEG",
                    width=1,
                    height=1,
                    camera=str(self.counter % 3),
                )
            )
        items = self.writer.add(self.gallery_id, new, vectors)
        for row, item in enumerate(items):
            self.vectors[item.id] = {m: vectors[m][row] for m in models}

    @precondition(lambda self: self.vectors)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        victims = data.draw(
            st.lists(st.sampled_from(sorted(self.vectors)), min_size=1, max_size=3, unique=True)
        )
        self.writer.delete(self.gallery_id, victims)
        for item_id in victims:
            del self.vectors[item_id]

    @rule()
    def snapshot(self) -> None:
        self.indexes.snapshot_all()

    @rule(damage=st.sampled_from(["none", "corrupt", "remove"]))
    def restart(self, damage: str) -> None:
        self.indexes.close()
        folders = sorted((self.tmp / "snapshots").glob("g*"))
        for folder in folders:
            if damage == "remove":
                shutil.rmtree(folder)
            elif damage == "corrupt":
                for f in folder.glob("index-*"):
                    f.write_bytes(b"garbage")
        self._open()

    @precondition(lambda self: len(self._gallery_models()) == 1)
    @rule()
    def start_upgrade(self) -> None:
        # Bind the other model as standby and embed every active item with it (what a re-embed
        # job does), then switch.
        active = next(iter(self._gallery_models()))
        other = next(m for m in self.model_ids if m != active)
        self.writer.bind_standby(self.gallery_id, other, DIM)
        # Embeddings by `other` stored during an earlier upgrade stay valid (same model, same image).
        missing = [i for i in self.vectors if other not in self.vectors[i]]
        if missing:
            vectors = self.rng.standard_normal((len(missing), DIM)).astype(np.float32)
            self.writer.add_embeddings(self.gallery_id, other, missing, vectors)
            for row, item_id in enumerate(missing):
                self.vectors[item_id][other] = vectors[row]
        assert self.writer.mark_standby_ready(self.gallery_id, other)
        self.writer.switch_model(self.gallery_id)

    @precondition(lambda self: len(self._gallery_models()) == 2)
    @rule(switch_back=st.booleans())
    def finish_upgrade(self, switch_back: bool) -> None:
        if switch_back:
            self.writer.switch_model(self.gallery_id)
        self.writer.drop_standby(self.gallery_id)

    @invariant()
    def index_holds_exactly_the_active_items(self) -> None:
        if not hasattr(self, "indexes"):
            return
        with self.sessions() as session:
            active = set(
                session.scalars(
                    select(Item.id).where(Item.gallery_id == self.gallery_id, Item.status == "active")
                )
            )
        assert active == set(self.vectors)
        state = self.indexes.gallery(self.gallery_id)
        assert set(state.indexes) == self._gallery_models()
        for model_id, gi in state.indexes.items():
            assert len(gi) == len(active)
            if not active:
                continue
            ids = sorted(active)
            queries = np.stack([self.vectors[i][model_id] for i in ids])
            _, found = gi.search(queries, 1, None)
            assert found[:, 0].tolist() == ids

    def teardown(self) -> None:
        if hasattr(self, "indexes"):
            self.indexes.close()
            self.engine.dispose()
            shutil.rmtree(self.tmp, ignore_errors=True)


DerivedIndex.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
test_derived_index_matches_database = DerivedIndex.TestCase
