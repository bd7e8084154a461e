"""Rank lists of a finished evaluation: each query's AP and ranked gallery, from the files it kept.

An evaluation job keeps its embeddings (``query.npz`` and ``gallery.npz``) and the image file of each
row (``samples.json``) in its folder. Ranking those embeddings again with
:func:`evaluation.metrics.rank_queries` (the same distances, order, protocol rule and AP code as the
evaluation itself) gives every query's AP, whose mean over the valid queries is the stored mAP, and its
top-k list, so neither has to be stored. A ranking costs one evaluation's worth of distance work, so the
last few are cached, keyed by the folder and the files' sizes and modification times.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

from evaluation.feature_file import FeatureFileError, load_feature_file
from evaluation.metrics import QueryRanking, rank_queries
from service.evaluation_files import FEATURE_FILES, SAMPLES_NAME

logger = logging.getLogger(__name__)

#: Longest rank list served; rankings are computed (and cached) at this length and cut to ``k``.
MAX_RANK_LIST = 100
#: Evaluations whose rankings stay in memory (about 16 bytes x queries x MAX_RANK_LIST each).
CACHED_RANKINGS = 4

SPLITS: tuple[str, ...] = ("query", "gallery")

V = TypeVar("V")


class RankListsGoneError(FileNotFoundError):
    """The files an evaluation kept for its rank lists are missing or unreadable."""


@dataclass(frozen=True)
class EvaluationRanking:
    """A finished evaluation ranked again: per-query outcome plus the labels of every row."""

    ranking: QueryRanking
    query_pids: np.ndarray
    query_camids: np.ndarray
    gallery_pids: np.ndarray
    gallery_camids: np.ndarray

    @property
    def num_valid_queries(self) -> int:
        return int(self.ranking.valid.sum())

    def worst(self, limit: int) -> np.ndarray:
        """Indices of the ``limit`` valid queries with the lowest AP (ties: the lower index first)."""
        valid = np.flatnonzero(self.ranking.valid)
        order = np.lexsort((valid, self.ranking.ap[valid]))  # last key is the primary one
        return valid[order[:limit]]


class _LruCache(Generic[V]):
    """A small thread-safe LRU cache that builds each missing value once, even under concurrency."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._building: dict[Hashable, threading.Lock] = {}

    def get_or_build(self, key: Hashable, build: Callable[[], V]) -> V:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            building = self._building.setdefault(key, threading.Lock())
        # Requests for one evaluation wait for the first one's result instead of ranking it again.
        with building:
            with self._lock:
                if key in self._entries:
                    return self._entries[key]
            try:
                value = build()
            finally:
                with self._lock:
                    self._building.pop(key, None)
            with self._lock:
                self._entries[key] = value
                while len(self._entries) > self.size:
                    self._entries.popitem(last=False)
            return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_rankings: _LruCache[EvaluationRanking] = _LruCache(CACHED_RANKINGS)
_samples: _LruCache[dict[str, list[str]]] = _LruCache(4 * CACHED_RANKINGS)


def _signature(folder: Path, names: tuple[str, ...]) -> tuple[tuple[str, int, int], ...]:
    """Size and modification time of each file: a changed file is never served from the cache."""
    out = []
    for name in names:
        path = folder / name
        try:
            stat = path.stat()
        except FileNotFoundError as exc:
            raise RankListsGoneError(
                f"the evaluation's {name} is no longer on disk; run the evaluation again"
            ) from exc
        out.append((name, stat.st_size, stat.st_mtime_ns))
    return tuple(out)


def rank_evaluation(
    folder: Path,
    *,
    protocol: str,
    ap_mode: str,
    rerank: bool,
    metric: str = "cosine",
    device: str | None = None,
) -> EvaluationRanking:
    """Rank the queries of the evaluation kept in ``folder`` exactly as the evaluation did (cached).

    Args:
        folder: the evaluation's folder (``service.evaluation_files.evaluation_dir``).
        protocol, ap_mode, rerank, metric: the evaluation's settings.
        device: where to compute distances; None (as the evaluation job) means CUDA when available.

    Raises:
        RankListsGoneError: ``query.npz`` or ``gallery.npz`` is missing or unreadable.
        evaluation.metrics.EvaluationError, evaluation.rerank.RerankMemoryError: as :func:`rank_queries`.
    """
    folder = Path(folder).resolve()
    names = (FEATURE_FILES["query"], FEATURE_FILES["gallery"])
    key = (str(folder), _signature(folder, names), protocol, ap_mode, rerank, metric, device)

    def build() -> EvaluationRanking:
        try:
            query, gallery = (load_feature_file(folder / name) for name in names)
        except FeatureFileError as exc:
            raise RankListsGoneError(f"the evaluation's features cannot be read: {exc}") from exc
        logger.info("ranking %d queries against %d gallery items of %s", len(query), len(gallery), folder)
        ranking = rank_queries(
            query.features,
            gallery.features,
            query.pids,
            gallery.pids,
            query.camids,
            gallery.camids,
            top_k=min(MAX_RANK_LIST, len(gallery)),
            metric=metric,
            rerank=rerank,
            ap_mode=ap_mode,
            protocol=protocol,
            device=device,
        )
        return EvaluationRanking(ranking, query.pids, query.camids, gallery.pids, gallery.camids)

    return _rankings.get_or_build(key, build)


def evaluation_samples(folder: Path) -> dict[str, list[str]]:
    """The image path of every query and gallery row the evaluation kept (cached).

    Raises:
        RankListsGoneError: ``samples.json`` is missing or not what the evaluation job writes.
    """
    folder = Path(folder).resolve()
    key = (str(folder), _signature(folder, (SAMPLES_NAME,)))

    def build() -> dict[str, list[str]]:
        try:
            data = json.loads((folder / SAMPLES_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise RankListsGoneError(f"the evaluation's {SAMPLES_NAME} cannot be read: {exc}") from exc
        well_formed = isinstance(data, dict) and all(
            isinstance(data.get(split), list) and all(isinstance(p, str) for p in data[split])
            for split in SPLITS
        )
        if not well_formed:
            raise RankListsGoneError(f"the evaluation's {SAMPLES_NAME} does not list query and gallery paths")
        return {split: list(data[split]) for split in SPLITS}

    return _samples.get_or_build(key, build)


def clear_caches() -> None:
    """Forget every cached ranking and sample list (tests; memory pressure)."""
    _rankings.clear()
    _samples.clear()
