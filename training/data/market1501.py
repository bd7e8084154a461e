"""Market-1501, and the Market-style folder layout that DukeMTMC-reID and CUHK03-NP share."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from training.data.dataset import (
    DatasetParser,
    LayoutItem,
    ReIDDataset,
    SkipReport,
    check_published_sizes,
    find_layout_root,
    scan_folder,
    split_counts,
)
from training.data.registry import register_dataset


class MarketStyleParser(DatasetParser):
    """Base for layouts with ``bounding_box_train/``, ``query/`` and ``bounding_box_test/`` folders.

    A subclass says how one file name reads (:meth:`parse_name`), which wrapper folders the release
    unpacks into, and the published image counts. Identity -1 is junk and dropped everywhere;
    every other identity (0 included) is kept as named.
    """

    train_dir: ClassVar[str] = "bounding_box_train"
    query_dir: ClassVar[str] = "query"
    gallery_dir: ClassVar[str] = "bounding_box_test"
    #: The file-name grammar, and one real-looking example, for messages.
    grammar: ClassVar[str] = ""
    example: ClassVar[str] = ""
    extension: ClassVar[str] = "jpg"
    wrappers: ClassVar[tuple[str, ...]] = ()
    published: ClassVar[dict[str, int]] = {}

    def parse_name(self, name: str) -> tuple[int, int, dict[str, Any]] | None:
        raise NotImplementedError

    def layout_wrappers(self) -> tuple[str, ...]:
        return self.wrappers

    def published_sizes(self) -> dict[str, int]:
        return self.published

    def load(self) -> ReIDDataset:
        expected = f"*.{self.extension} named {self.grammar} (e.g. {self.example})"
        required = [
            LayoutItem(f"{folder}/", f"ROOT/{folder}/{expected}")
            for folder in (self.train_dir, self.query_dir, self.gallery_dir)
        ]
        root = find_layout_root(self.root, self.display_name, required, self.layout_wrappers())
        report = SkipReport(self.display_name, strict=self.strict)
        splits = [
            scan_folder(root / folder, self.parse_name, grammar=self.grammar, report=report)
            for folder in (self.train_dir, self.query_dir, self.gallery_dir)
        ]
        counts = split_counts(*splits)
        check_published_sizes(self.display_name, counts, self.published_sizes(), source=str(root))
        return self._dataset(root, *splits, skipped=report)


_MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)s(\d+)_(\d+)_(\d+)\.jpe?g$", re.IGNORECASE)


def parse_market_name(name: str) -> tuple[int, int, dict[str, Any]] | None:
    """``PPPP_cCsS_FFFFFF_NN.jpg`` -> (pid, 0-based camera, {sequence, frame, bbox}); None if malformed."""
    match = _MARKET_NAME.match(name)
    if match is None:
        return None
    pid, cam, sequence, frame, bbox = (int(g) for g in match.groups())
    if cam < 1:
        return None
    return pid, cam - 1, {"sequence": sequence, "frame": frame, "bbox": bbox}


def format_market_name(pid: int, cam: int, sequence: int, frame: int, bbox: int) -> str:
    """Inverse of :func:`parse_market_name` (``cam`` 0-based); the synthetic writer uses it."""
    person = "-1" if pid == -1 else f"{pid:04d}"
    return f"{person}_c{cam + 1}s{sequence}_{frame:06d}_{bbox:02d}.jpg"


@register_dataset("market1501", kind="person", aliases=("market", "market1501v15.09.15"))
class Market1501(MarketStyleParser):
    """Market-1501 (Zheng et al., "Scalable Person Re-identification: A Benchmark", ICCV 2015).

    Layout: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` directly under the root or
    inside the ``Market-1501-v15.09.15/`` folder the release unpacks to. File names
    ``PPPP_cCsS_FFFFFF_NN.jpg``: identity, camera 1-6, sequence, frame, bounding-box index.
    Identity ``-1`` (junk: boxes that overlap a person only partly) is dropped; ``0000``
    (distractors: false detections) stays in the gallery as a negative. Cameras are stored
    0-based (``c1`` -> 0); sequence, frame and box index go to ``attrs``.

    Published sizes: 12,936 train images (751 ids), 3,368 query (750 ids), 15,913 gallery
    (``bounding_box_test/`` holds 19,732 files; 15,913 remain once junk is dropped).
    """

    display_name = "Market-1501"
    grammar = "PPPP_cCsS_FFFFFF_NN.jpg"
    example = "0001_c1s1_001051_00.jpg"
    wrappers = ("Market-1501-v15.09.15",)
    published: ClassVar[dict[str, int]] = {"train": 12936, "query": 3368, "gallery": 15913}

    def parse_name(self, name: str) -> tuple[int, int, dict[str, Any]] | None:
        return parse_market_name(name)


__all__ = ["Market1501", "MarketStyleParser", "format_market_name", "parse_market_name"]
