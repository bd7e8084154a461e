"""The FAISS backend's item table: which ids exist, their filter attributes and (optionally) vectors.

FAISS stores vectors and ids but no metadata, and answers "is this id present?" only one id at a
time. The table keeps, per item, a row with camera / capture time / identity (and the full vector
when exact re-ranking needs it), plus the alive ids in sorted order so that membership tests and
filter evaluation are vectorised numpy operations: about 40 bytes per item, no Python objects.

Rows are appended; removal marks a row dead and drops its id from the sorted index; the table
compacts itself when more than half of its rows are dead. Not thread-safe: the index serialises
writers and excludes them while readers run.
"""

from __future__ import annotations

import numpy as np

from index.base import Attributes, SearchFilter

_MIN_CAPACITY = 1024


class AttributeTable:
    """Alive ids (sorted), their attribute rows, and optionally their vectors.

    Args:
        dim: vector dimension (used only when ``store_vectors``).
        store_vectors: keep a copy of every vector (for exact re-ranking of compressed indexes).
    """

    def __init__(self, dim: int, *, store_vectors: bool = False) -> None:
        self.dim = dim
        self.store_vectors = store_vectors
        self._allocate(_MIN_CAPACITY)

    def _allocate(self, capacity: int) -> None:
        self._row_ids = np.full(capacity, -1, dtype=np.int64)
        self._camera = np.zeros(capacity, dtype=np.int64)
        self._captured_at = np.zeros(capacity, dtype=np.float64)
        self._identity = np.zeros(capacity, dtype=np.int64)
        self._vectors = np.zeros((capacity, self.dim), dtype=np.float32) if self.store_vectors else None
        self._used = 0  # rows handed out, alive or dead
        self._sorted_ids = np.zeros(0, dtype=np.int64)  # alive ids, ascending
        self._sorted_rows = np.zeros(0, dtype=np.int64)  # their rows

    # ------------------------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._sorted_ids)

    @property
    def nbytes(self) -> int:
        """Memory per stored item times items (growth slack of up to 2x not counted)."""
        per_row = 8 * 4 + 16  # id, camera, time, identity + sorted id and row
        if self._vectors is not None:
            per_row += self._vectors.itemsize * self.dim
        return per_row * len(self)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row of each id, ``-1`` where the id is not present."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self._sorted_ids) == 0 or ids.size == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos_clipped = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos_clipped] == ids
        return np.where(found, self._sorted_rows[pos_clipped], -1)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean array: which ids are present."""
        return self.rows_of(ids) >= 0

    def ids(self) -> np.ndarray:
        """All alive ids, ascending (a copy)."""
        return self._sorted_ids.copy()

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of present ids (``store_vectors`` tables only)."""
        if self._vectors is None:
            raise RuntimeError("this table does not store vectors")
        rows = self.rows_of(ids)
        if (rows < 0).any():
            raise KeyError(f"ids not in the table: {np.asarray(ids)[rows < 0][:5].tolist()}")
        return self._vectors[rows]

    def vectors_at(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors at table rows (from :meth:`rows_of`; ``store_vectors`` tables only)."""
        if self._vectors is None:
            raise RuntimeError("this table does not store vectors")
        return self._vectors[rows]

    def attributes_of(self, ids: np.ndarray) -> Attributes:
        """Attributes of present ids."""
        rows = self.rows_of(ids)
        if (rows < 0).any():
            raise KeyError(f"ids not in the table: {np.asarray(ids)[rows < 0][:5].tolist()}")
        return Attributes(
            camera=self._camera[rows].copy(),
            captured_at=self._captured_at[rows].copy(),
            identity=self._identity[rows].copy(),
        )

    def allowed_ids(self, flt: SearchFilter) -> np.ndarray:
        """Ids (ascending) of the present items that pass ``flt``."""
        if flt.allowed_ids is not None:
            # Usually a short list: evaluate the other conditions on those rows only.
            candidates = flt.allowed_ids  # unique and sorted (SearchFilter canonicalises it)
            rows = self.rows_of(candidates)
            keep = rows >= 0
            candidates, rows = candidates[keep], rows[keep]
        else:
            candidates, rows = self._sorted_ids, self._sorted_rows
        mask = flt.matches(self._camera[rows], self._captured_at[rows], self._identity[rows])
        return candidates[mask]

    # ---------------------------------------------------------------------------------- mutations

    def append(self, ids: np.ndarray, attributes: Attributes, vectors: np.ndarray | None = None) -> None:
        """Add new items; the caller has checked that the ids are unique and not present."""
        n = len(ids)
        if n == 0:
            return
        self._reserve(self._used + n)
        rows = np.arange(self._used, self._used + n, dtype=np.int64)
        self._row_ids[rows] = ids
        self._camera[rows] = attributes.camera
        self._captured_at[rows] = attributes.captured_at
        self._identity[rows] = attributes.identity
        if self._vectors is not None:
            if vectors is None:
                raise ValueError("this table stores vectors: pass them to append()")
            self._vectors[rows] = vectors
        self._used += n
        order = np.argsort(ids, kind="stable")
        new_ids, new_rows = ids[order], rows[order]
        pos = np.searchsorted(self._sorted_ids, new_ids)
        self._sorted_ids = np.insert(self._sorted_ids, pos, new_ids)
        self._sorted_rows = np.insert(self._sorted_rows, pos, new_rows)

    def remove(self, ids: np.ndarray) -> np.ndarray:
        """Remove the present ones of ``ids``; returns the removed ids (unique, ascending)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if ids.size == 0 or len(self._sorted_ids) == 0:
            return ids[:0]
        pos = np.searchsorted(self._sorted_ids, ids)
        pos_clipped = np.minimum(pos, len(self._sorted_ids) - 1)
        found = self._sorted_ids[pos_clipped] == ids
        pos = pos_clipped[found]
        self._row_ids[self._sorted_rows[pos]] = -1
        self._sorted_ids = np.delete(self._sorted_ids, pos)
        self._sorted_rows = np.delete(self._sorted_rows, pos)
        if self._used > 2 * _MIN_CAPACITY and len(self._sorted_ids) < self._used // 2:
            self._compact()
        return ids[found]

    def clear(self) -> None:
        """Remove everything and release memory."""
        self._allocate(_MIN_CAPACITY)

    def _reserve(self, needed: int) -> None:
        capacity = len(self._row_ids)
        if needed <= capacity:
            return
        new_capacity = max(needed, capacity * 2)
        self._row_ids = _grow(self._row_ids, new_capacity, -1)
        self._camera = _grow(self._camera, new_capacity, 0)
        self._captured_at = _grow(self._captured_at, new_capacity, 0)
        self._identity = _grow(self._identity, new_capacity, 0)
        if self._vectors is not None:
            self._vectors = _grow(self._vectors, new_capacity, 0)

    def _compact(self) -> None:
        rows = np.sort(self._sorted_rows)
        ids, camera = self._row_ids[rows], self._camera[rows]
        captured_at, identity = self._captured_at[rows], self._identity[rows]
        vectors = self._vectors[rows] if self._vectors is not None else None
        self._allocate(max(_MIN_CAPACITY, 2 * len(rows)))
        self.append(ids, Attributes(camera=camera, captured_at=captured_at, identity=identity), vectors)

    # -------------------------------------------------------------------------------- persistence

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The alive items as plain arrays (ids ascending), for an ``.npz`` file."""
        rows = self._sorted_rows
        arrays = {
            "ids": self._sorted_ids.copy(),
            "camera": self._camera[rows],
            "captured_at": self._captured_at[rows],
            "identity": self._identity[rows],
        }
        if self._vectors is not None:
            arrays["vectors"] = self._vectors[rows]
        return arrays

    @classmethod
    def from_arrays(cls, dim: int, arrays: dict[str, np.ndarray], *, store_vectors: bool) -> AttributeTable:
        """Inverse of :meth:`to_arrays`."""
        table = cls(dim, store_vectors=store_vectors)
        table._allocate(max(_MIN_CAPACITY, len(arrays["ids"])))
        attributes = Attributes(
            camera=np.asarray(arrays["camera"], dtype=np.int64),
            captured_at=np.asarray(arrays["captured_at"], dtype=np.float64),
            identity=np.asarray(arrays["identity"], dtype=np.int64),
        )
        vectors = np.asarray(arrays["vectors"], dtype=np.float32) if store_vectors else None
        table.append(np.asarray(arrays["ids"], dtype=np.int64), attributes, vectors)
        return table


def _grow(array: np.ndarray, capacity: int, fill: float) -> np.ndarray:
    out = np.full((capacity, *array.shape[1:]), fill, dtype=array.dtype)
    out[: len(array)] = array
    return out
