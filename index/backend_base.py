"""What the index backends (FAISS, torch, Milvus) do the same way, written once.

:class:`IndexBackend` holds the call checks and snapshot steps every backend shares, over each
backend's own ``contains`` and vector conversion. :class:`TableBackedIndex` adds what the
in-process backends (FAISS, torch) share because they keep an
:class:`~index.faiss_attributes.AttributeTable` beside their vectors under one readers-writer lock:
membership, attribute look-ups and removal up to the step that drops the vectors themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from index import snapshot
from index.base import (
    Attributes,
    AttributesLike,
    Capabilities,
    IndexInputError,
    ReadWriteLock,
    SearchFilter,
    SnapshotError,
    as_attributes,
    as_ids,
    as_unit_vectors,
    check_k,
    check_new_ids,
)
from index.faiss_attributes import AttributeTable


class IndexBackend:
    """Base of the :class:`~index.base.VectorIndex` backends: the checks and steps they all share.

    A subclass sets ``backend`` (the snapshot manifest's name), ``label`` (its name in messages),
    ``dim``, ``spec`` and ``capabilities``, and implements :meth:`contains`.
    """

    backend: ClassVar[str]
    label: ClassVar[str]
    dim: int
    spec: str
    capabilities: Capabilities

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean array: which of ``ids`` are in the index."""
        raise NotImplementedError

    def __contains__(self, id: object) -> bool:
        # Anything but a non-negative integer cannot be an item id: answer False, do not raise.
        if isinstance(id, bool) or not isinstance(id, int | np.integer) or int(id) < 0:
            return False
        return bool(self.contains(np.array([int(id)], dtype=np.int64))[0])

    def _unit_vectors(self, vectors: Any, *, what: str = "vectors") -> Any:
        """Validated, L2-normalised ``(n, dim)`` vectors in the form the backend computes with."""
        return as_unit_vectors(vectors, self.dim, what=what)

    def _check_search(self, queries: Any, k: Any, filter: SearchFilter | None) -> tuple[Any, int]:
        """Validated unit ``queries`` and ``k`` of a search call (the filter checked for its type)."""
        k = check_k(k, self.capabilities.max_k)
        q = self._unit_vectors(queries, what="queries")
        if filter is not None and not isinstance(filter, SearchFilter):
            raise IndexInputError(f"filter must be a SearchFilter, got {type(filter).__name__}")
        return q, k

    def _check_add(
        self, ids: Any, vectors: Any, attributes: AttributesLike | None
    ) -> tuple[np.ndarray, Any, Attributes]:
        """Validated ids, unit vectors and attributes of an add call, ids unique within the call."""
        ids = as_ids(ids)
        x = self._unit_vectors(vectors)
        if len(ids) != len(x):
            raise IndexInputError(f"got {len(ids)} ids for {len(x)} vectors; pass one id per vector")
        attrs = as_attributes(attributes, len(ids))
        check_new_ids(ids)
        return ids, x, attrs

    @staticmethod
    def _reject_present(present: np.ndarray) -> None:
        """Refuse an add whose ids (``present``: those already in the index) are not all new."""
        if len(present):
            raise IndexInputError(
                f"ids already in the index: {present[:5].tolist()}; remove them first (an id is added once)"
            )

    def _write_snapshot(
        self,
        path: str | Path,
        files: dict[str, tuple[str, Callable[[Path], None]]],
        *,
        count: int,
        last_seq: int,
        options: dict[str, Any],
    ) -> snapshot.Manifest:
        """Write the snapshot of this index through :func:`index.snapshot.write_snapshot`."""
        return snapshot.write_snapshot(
            path,
            files,
            spec=self.spec,
            dim=self.dim,
            count=count,
            last_seq=last_seq,
            backend=self.backend,
            options=options,
        )

    @classmethod
    def _verify_snapshot(cls, path: str | Path) -> snapshot.Manifest:
        """The verified manifest of the snapshot at ``path``, which must be this backend's."""
        manifest = snapshot.verify_snapshot(path)
        if manifest.backend != cls.backend:
            raise SnapshotError(
                f"snapshot at {path} is a '{manifest.backend}' snapshot, not a {cls.label} one"
            )
        return manifest


class TableBackedIndex(IndexBackend):
    """Base of the in-process backends, whose :class:`AttributeTable` says which items exist.

    A subclass holds ``_table`` and ``_lock`` (taken for reading by look-ups, for writing by
    mutations) and implements :meth:`_clear_state` and :meth:`_remove_vectors`.
    """

    _table: AttributeTable
    _lock: ReadWriteLock

    def __len__(self) -> int:
        return len(self._table)

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean array: which of ``ids`` are in the index."""
        ids = as_ids(ids)
        with self._lock.read():
            return self._table.contains(ids)

    def attributes_of(self, ids: Any) -> Any:
        """Stored :class:`~index.base.Attributes` of present ids (KeyError for absent ones)."""
        ids = as_ids(ids)
        with self._lock.read():
            return self._table.attributes_of(ids)

    def _reject_present_in_table(self, ids: np.ndarray) -> None:
        """Refuse an add of ``ids`` if any is in the table already (call with the write lock held)."""
        self._reject_present(ids[self._table.contains(ids)])

    def remove(self, ids: Any) -> int:
        """Remove items by id; returns how many were present (unknown ids are ignored)."""
        ids = as_ids(ids, what="ids to remove")
        if len(ids) == 0:
            return 0
        with self._lock.write():
            removed = self._table.remove(ids)
            if len(removed) == 0:
                return 0
            self._remove_vectors(removed)
            return len(removed)

    def _remove_vectors(self, removed: np.ndarray) -> None:
        """Drop the vectors of ``removed`` (ids just taken out of the table; write lock held)."""
        raise NotImplementedError

    def _clear_state(self) -> None:
        """Make the index empty, as a new one is."""
        raise NotImplementedError

    def reset(self) -> None:
        """Remove every item: the index is as new (see the backend's ``_clear_state``)."""
        with self._lock.write():
            self._clear_state()


def npz_writer(arrays: dict[str, np.ndarray]) -> Callable[[Path], None]:
    """A snapshot file writer (see :func:`index.snapshot.write_snapshot`) saving ``arrays`` as ``.npz``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    return write


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` file at ``path``, loaded (no pickled objects accepted)."""
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
