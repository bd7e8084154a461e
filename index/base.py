"""The contract every vector index honours: protocol, filters, results, errors and input checks.

The service codes against these names only; backends (FAISS in-process, Milvus over the network)
differ in what they can do, which :class:`Capabilities` states, never in what a call means:

- ids are int64 database primary keys (>= 0; ``-1`` is the padding value of results);
- vectors are float32 ``(n, dim)``; every backend renormalises them to unit length, so scores are
  cosine similarities whatever the caller passes (zero or non-finite vectors are rejected);
- ``search`` returns the ``k`` highest cosine similarities, best first, padded with id ``-1`` and
  score ``-inf`` where fewer than ``k`` items exist or pass the filter (``short`` says where).
"""

from __future__ import annotations

import contextlib
import math
import threading
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

#: Unknown camera / identity in :class:`Attributes`.
UNKNOWN = -1
#: Score given to padding entries (id ``-1``) of a :class:`SearchResult`.
PAD_SCORE = -np.inf


# --------------------------------------------------------------------------------------------- errors


class IndexInputError(ValueError):
    """Bad input to an index call (wrong dimension, NaN, duplicate ids, k out of range...)."""


class IndexNotTrainedError(RuntimeError):
    """An operation needs a trained index and this one has not been trained yet."""


class SnapshotError(RuntimeError):
    """A snapshot is missing, corrupt or does not match: rebuild the index from the database."""


class IndexBackendError(RuntimeError):
    """The backend itself failed (server unreachable, library missing): not the caller's input."""


# ---------------------------------------------------------------------------------------- value types


@dataclass(frozen=True)
class Capabilities:
    """What a backend/spec can do, so callers choose behaviour without isinstance checks.

    Attributes:
        exact: search returns the true top-k (up to float rounding).
        gpu: vectors live on a GPU.
        deletes: ``remove`` is supported (always true here; HNSW does it with tombstones).
        filter_pushdown: filters are applied inside the engine rather than by post-filtering.
        persistent: the engine keeps data itself (Milvus); FAISS needs ``save``.
        max_k: largest ``k`` a search accepts.
    """

    exact: bool
    gpu: bool
    deletes: bool
    filter_pushdown: bool
    persistent: bool
    max_k: int


@dataclass(frozen=True)
class Attributes:
    """Per-vector metadata that filters act on; one entry per added vector.

    Attributes:
        camera: camera id (int64), ``-1`` when unknown.
        captured_at: capture time in epoch seconds (float64), NaN when unknown.
        identity: identity label (int64), ``-1`` when unknown.
    """

    camera: np.ndarray
    captured_at: np.ndarray
    identity: np.ndarray

    FIELDS: ClassVar[tuple[str, ...]] = ("camera", "captured_at", "identity")

    @classmethod
    def unknown(cls, n: int) -> Attributes:
        """Attributes of ``n`` vectors about which nothing is known."""
        return cls(
            camera=np.full(n, UNKNOWN, dtype=np.int64),
            captured_at=np.full(n, np.nan, dtype=np.float64),
            identity=np.full(n, UNKNOWN, dtype=np.int64),
        )

    @classmethod
    def build(
        cls,
        n: int,
        camera: Iterable[int] | np.ndarray | None = None,
        captured_at: Iterable[float] | np.ndarray | None = None,
        identity: Iterable[int] | np.ndarray | None = None,
    ) -> Attributes:
        """Attributes of ``n`` vectors from optional columns; a missing column means unknown."""
        base = cls.unknown(n)
        return cls(
            camera=base.camera if camera is None else np.asarray(camera),
            captured_at=base.captured_at if captured_at is None else np.asarray(captured_at),
            identity=base.identity if identity is None else np.asarray(identity),
        )

    def __len__(self) -> int:
        return len(self.camera)


AttributesLike = Attributes | Mapping[str, Any]


@dataclass(frozen=True, eq=False)
class SearchFilter:
    """Restricts a search; all given conditions must hold (logical AND).

    Unknown attribute values are treated conservatively: an item whose capture time is unknown
    (NaN) never passes a time window, an item with unknown camera (-1) passes ``cameras`` only if
    -1 is listed, and an item with unknown identity (-1) is never removed by ``exclude_identity``.

    Attributes:
        cameras: keep only items from these cameras.
        exclude_cameras: drop items from these cameras (e.g. the query's own camera).
        time_from: keep items captured at or after this epoch time (inclusive).
        time_to: keep items captured at or before this epoch time (inclusive).
        exclude_identity: drop items of this identity.
        allowed_ids: keep only these item ids.
    """

    cameras: frozenset[int] | None = None
    exclude_cameras: frozenset[int] | None = None
    time_from: float | None = None
    time_to: float | None = None
    exclude_identity: int | None = None
    allowed_ids: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Accept any iterable of ints for the camera sets and any int array-like for the ids, so
        # callers do not have to build frozensets/arrays themselves; store the canonical types.
        for name in ("cameras", "exclude_cameras"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, frozenset(int(c) for c in value))
        for name in ("time_from", "time_to"):
            value = getattr(self, name)
            if value is not None:
                value = float(value)
                if math.isnan(value):
                    raise IndexInputError(f"SearchFilter.{name} is NaN: give an epoch time or None")
                object.__setattr__(self, name, value)
        if self.time_from is not None and self.time_to is not None and self.time_from > self.time_to:
            raise IndexInputError(
                f"SearchFilter time window is empty: time_from={self.time_from} > time_to={self.time_to}"
            )
        if self.exclude_identity is not None:
            object.__setattr__(self, "exclude_identity", int(self.exclude_identity))
        if self.allowed_ids is not None:
            allowed = np.asarray(self.allowed_ids)
            if allowed.size and not np.issubdtype(allowed.dtype, np.integer):
                raise IndexInputError(f"SearchFilter.allowed_ids must be integers, got dtype {allowed.dtype}")
            object.__setattr__(self, "allowed_ids", np.unique(allowed.astype(np.int64).ravel()))

    @property
    def is_empty(self) -> bool:
        """True when the filter restricts nothing."""
        return (
            self.cameras is None
            and self.exclude_cameras is None
            and self.time_from is None
            and self.time_to is None
            and self.exclude_identity is None
            and self.allowed_ids is None
        )

    def matches(self, camera: np.ndarray, captured_at: np.ndarray, identity: np.ndarray) -> np.ndarray:
        """Boolean mask of the items (given by their attribute columns) that pass this filter."""
        mask = np.ones(len(camera), dtype=bool)
        if self.cameras is not None:
            mask &= np.isin(camera, np.fromiter(self.cameras, dtype=np.int64, count=len(self.cameras)))
        if self.exclude_cameras:
            excluded = np.fromiter(self.exclude_cameras, dtype=np.int64, count=len(self.exclude_cameras))
            mask &= ~np.isin(camera, excluded)
        # NaN compares False with everything, so unknown times drop out of any window.
        if self.time_from is not None:
            mask &= captured_at >= self.time_from
        if self.time_to is not None:
            mask &= captured_at <= self.time_to
        if self.exclude_identity is not None:
            mask &= identity != self.exclude_identity
        return mask


@dataclass(frozen=True, eq=False)
class SearchResult:
    """Top-k answer for a batch of queries; unpacks as ``scores, ids = result``.

    Attributes:
        scores: ``(nq, k)`` float32 cosine similarities, best first, ``-inf`` for padding.
        ids: ``(nq, k)`` int64 item ids, ``-1`` for padding.
        short: ``(nq,)`` bool, True where fewer than ``k`` items passed the filter.
    """

    scores: np.ndarray
    ids: np.ndarray
    short: np.ndarray

    def __iter__(self) -> Iterator[np.ndarray]:
        # Two-way unpacking (`scores, ids = result`) is the documented contract; `short` is read
        # by name.
        return iter((self.scores, self.ids))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> np.ndarray:
        # FAISS users index the (D, I) tuple: result[0] are the scores, result[1] the ids.
        return (self.scores, self.ids)[i]

    @classmethod
    def empty(cls, nq: int, k: int) -> SearchResult:
        """A result with nothing found for any of ``nq`` queries."""
        return cls(
            scores=np.full((nq, k), PAD_SCORE, dtype=np.float32),
            ids=np.full((nq, k), -1, dtype=np.int64),
            short=np.ones(nq, dtype=bool),
        )


class snapshot_loader:
    """``@classmethod`` for a backend's ``load``, refused on an instance.

    ``load`` builds a new index from a snapshot; called as ``idx.load(path)`` on an index it would
    return the new one and leave ``idx`` as it was, which reads like "idx is loaded". An instance
    therefore has no ``load``: write ``idx = FaissIndex.load(path)`` or ``idx = load_index(path)``.
    """

    def __init__(self, func: Any) -> None:
        self.__func__ = func
        self.__doc__ = func.__doc__
        self.__name__ = func.__name__

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is not None:
            name = type(instance).__name__
            raise AttributeError(
                f"{name}.load builds a new index from a snapshot and cannot fill this one: "
                f"write `idx = {name}.load(path)` or `idx = index.load_index(path)`"
            )
        return types.MethodType(self.__func__, owner)


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers so it cannot starve."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ------------------------------------------------------------------------------------------- protocol


@runtime_checkable
class VectorIndex(Protocol):
    """A mutable top-k cosine-similarity index over (id, vector, attributes) items."""

    dim: int
    spec: str
    capabilities: Capabilities

    def add(self, ids: Any, vectors: Any, *, attributes: AttributesLike | None = None) -> None:
        """Add new items; an id already present, or repeated in ``ids``, is an IndexInputError."""
        ...

    def remove(self, ids: Any) -> int:
        """Remove items by id and return how many were present; unknown ids are ignored."""
        ...

    def search(self, queries: Any, k: int, *, filter: SearchFilter | None = None) -> SearchResult:
        """Top-k items by cosine similarity for each query row."""
        ...

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean array: which of ``ids`` are in the index."""
        ...

    def __len__(self) -> int: ...

    def __contains__(self, id: object) -> bool: ...

    def save(self, path: str | Path, *, last_seq: int = 0) -> None:
        """Write an atomic snapshot with its manifest to the folder ``path``."""
        ...

    def reset(self) -> None:
        """Remove every item."""
        ...


# -------------------------------------------------------------------------------------- input checks


def as_ids(ids: Any, *, what: str = "ids") -> np.ndarray:
    """Validate ids as a 1-D array of non-negative int64 values (no bools, no floats)."""
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise IndexInputError(f"{what} must be a 1-D array of integers, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise IndexInputError(f"{what} must be integers (database primary keys), got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.unsignedinteger) and arr.max() > np.iinfo(np.int64).max:
        raise IndexInputError(f"{what} do not fit in int64")
    arr = arr.astype(np.int64, copy=False)
    if arr.min() < 0:
        bad = arr[arr < 0][:5].tolist()
        raise IndexInputError(f"{what} must be >= 0 (-1 is the padding value of results); got {bad}")
    return arr


def as_unit_vectors(vectors: Any, dim: int, *, what: str = "vectors") -> np.ndarray:
    """Validate ``(n, dim)`` finite vectors and return them L2-normalised as contiguous float32.

    Renormalising here makes scores cosine similarities whatever the caller passes; a zero
    vector has no direction, so it is rejected rather than silently matched to nothing.
    """
    arr = np.asarray(vectors)
    if arr.ndim == 1 and arr.shape[0] == dim:
        arr = arr.reshape(1, dim)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise IndexInputError(f"{what} must have shape (n, {dim}) for this index, got {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise IndexInputError(f"{what} must be numeric, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.size == 0:
        return arr
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)[:5].tolist()
        raise IndexInputError(f"{what} contain NaN or infinite values (rows {rows}); fix the embeddings")
    norms = np.linalg.norm(arr, axis=1)
    if (norms == 0).any():
        rows = np.flatnonzero(norms == 0)[:5].tolist()
        raise IndexInputError(f"{what} contain all-zero rows {rows}: a zero vector has no direction")
    return np.ascontiguousarray(arr / norms[:, None], dtype=np.float32)


def check_k(k: Any, max_k: int) -> int:
    """Validate ``k`` as an int in ``[1, max_k]``."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise IndexInputError(f"k must be an integer, got {type(k).__name__}")
    k = int(k)
    if k <= 0:
        raise IndexInputError(f"k must be >= 1, got {k}")
    if k > max_k:
        raise IndexInputError(
            f"k={k} is above this backend's maximum of {max_k}; ask for fewer results "
            "(or page with a filter on allowed_ids)"
        )
    return k


def check_dim(dim: Any) -> int:
    """Validate a vector dimension as a positive int (no bools)."""
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise IndexInputError(f"dim must be a positive integer, got {dim!r}")
    return int(dim)


def check_last_seq(last_seq: Any) -> int:
    """Validate the ``last_seq`` of a snapshot (the operation-log position it includes) as an int >= 0."""
    if isinstance(last_seq, bool) or not isinstance(last_seq, int | np.integer) or last_seq < 0:
        raise IndexInputError(f"last_seq must be a non-negative integer, got {last_seq!r}")
    return int(last_seq)


def check_new_ids(ids: np.ndarray) -> None:
    """Reject ids repeated within one add call."""
    if len(ids) > 1:
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1][:5].tolist()
            raise IndexInputError(f"ids repeated within one add call: {dup}; each item is added once")


def as_attributes(attributes: AttributesLike | None, n: int) -> Attributes:
    """Validate attributes for ``n`` new vectors; ``None`` or a missing column means unknown."""
    if attributes is None:
        return Attributes.unknown(n)
    if isinstance(attributes, Attributes):
        columns = {name: getattr(attributes, name) for name in Attributes.FIELDS}
    elif isinstance(attributes, Mapping):
        unknown_keys = set(attributes) - set(Attributes.FIELDS)
        if unknown_keys:
            raise IndexInputError(
                f"unknown attribute(s) {sorted(unknown_keys)}; expected some of {list(Attributes.FIELDS)}"
            )
        columns = {name: attributes.get(name) for name in Attributes.FIELDS}
    else:
        raise IndexInputError(
            f"attributes must be an Attributes or a mapping, got {type(attributes).__name__}"
        )
    base = Attributes.unknown(n)
    out: dict[str, np.ndarray] = {}
    for name, dtype in (("camera", np.int64), ("captured_at", np.float64), ("identity", np.int64)):
        value = columns[name]
        if value is None:
            out[name] = getattr(base, name)
            continue
        arr = np.asarray(value)
        if arr.ndim == 0:
            arr = np.full(n, arr.item())
        if arr.shape != (n,):
            raise IndexInputError(f"attribute '{name}' must have shape ({n},), got {arr.shape}")
        if dtype is np.int64:
            if n and not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
                raise IndexInputError(f"attribute '{name}' must be integers, got dtype {arr.dtype}")
        elif n and not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise IndexInputError(f"attribute '{name}' must be numbers (epoch seconds), got {arr.dtype}")
        out[name] = np.ascontiguousarray(arr, dtype=dtype)
    return Attributes(**out)
