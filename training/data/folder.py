"""Users' own data: ``root/<split>/<identity>/<camera>_<anything>.jpg`` or a CSV manifest."""

from __future__ import annotations

import csv
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

from training.data.dataset import (
    IMAGE_EXTENSIONS,
    SPLITS,
    DatasetParser,
    ReIDDataset,
    Sample,
    SkipReport,
    parse_int,
    token_number,
)
from training.data.errors import DatasetError, DatasetLayoutError
from training.data.registry import KINDS, register_dataset

GRAMMAR = "<split>/<identity>/<camera>_<anything>.jpg"
MANIFEST_COLUMNS = ("path", "identity", "camera")


@dataclass(frozen=True)
class _Row:
    split: str
    path: str
    identity: str
    camera: str
    captured_at: float | None


def parse_timestamp(text: str) -> float | None:
    """Epoch seconds from ``text``: a number, or ISO 8601 (naive times are taken as UTC); '' -> None.

    Raises:
        ValueError: when ``text`` is neither.
    """
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        moment = dt.datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        return moment.timestamp()
    if not math.isfinite(value):
        raise ValueError(f"timestamp {text!r} is not finite")
    return value


def _token_order(token: str) -> tuple[float, str]:
    number = token_number(token)
    return (math.inf if number is None else number, token)


def index_cameras(tokens: set[str]) -> dict[str, int]:
    """0-based camera index of each token: its rank in numeric order (``c2`` < ``c10``), then by name."""
    return {token: i for i, token in enumerate(sorted(tokens, key=_token_order))}


def index_identities(names: set[str]) -> dict[str, int]:
    """Identity number of each name: the name itself when every name is a distinct integer, else its rank.

    ("7" and "007" are different folders, so they only keep their numbers if no two names share one.)
    """
    numbers = {name: parse_int(name) for name in names}
    values = [n for n in numbers.values() if n is not None]
    if len(values) == len(names) and len(set(values)) == len(values):
        return {name: n for name, n in numbers.items() if n is not None}
    return {name: i for i, name in enumerate(sorted(names))}


@register_dataset("folder", kind="person", aliases=("imagefolder", "manifest"))
class FolderDataset(DatasetParser):
    """A generic layout for one's own data, by folders or by a CSV manifest.

    Folders: ``ROOT/<split>/<identity>/<camera>_<anything>.<jpg|png|webp>`` with ``<split>`` among
    ``train``, ``query``, ``gallery`` (any subset of them).

    Manifest: a CSV file with a header and the columns ``path`` (relative to ROOT, or absolute),
    ``identity``, ``camera``, optional ``timestamp`` (epoch seconds or ISO 8601; naive times are
    UTC) and optional ``split`` (rows without one go to ``default_split``).

    Identities that are all integers keep their numbers; otherwise names are numbered in sorted
    order. Camera tokens (``3``, ``c3``, ``cam03``, ``lobby``) are numbered 0, 1, ... in numeric
    order, then by name, over the whole dataset, so the same camera has the same index in every
    split. The original names go to ``attrs["identity"]`` / ``attrs["camera"]``, the time to
    ``attrs["captured_at"]`` (None when unknown).

    Args:
        kind: ``person`` (default) or ``vehicle``.
        manifest: CSV file (relative to ROOT, or absolute) to read instead of the folders.
        default_split: split of manifest rows without a ``split`` value (default ``train``).
    """

    display_name = "folder dataset"

    def __init__(
        self,
        root: str | Path,
        *,
        kind: str = "person",
        manifest: str | Path | None = None,
        default_split: str = "train",
        strict: bool = False,
    ) -> None:
        super().__init__(root, strict=strict)
        if kind not in KINDS:
            raise DatasetError(f"folder dataset kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if default_split not in SPLITS:
            raise DatasetError(f"default_split must be one of {', '.join(SPLITS)}, got {default_split!r}")
        self.kind = kind
        self.manifest = Path(manifest) if manifest is not None else None
        self.default_split = default_split

    def load(self) -> ReIDDataset:
        if not self.root.is_dir():
            raise DatasetLayoutError(f"folder dataset root {self.root} does not exist or is not a folder")
        report = SkipReport(self.display_name, strict=self.strict)
        rows = self._manifest_rows(report) if self.manifest is not None else self._folder_rows(report)
        pids = index_identities({r.identity for r in rows})
        camids = index_cameras({r.camera for r in rows})
        splits: dict[str, list[Sample]] = {split: [] for split in SPLITS}
        for r in rows:
            attrs = {"identity": r.identity, "camera": r.camera, "captured_at": r.captured_at}
            splits[r.split].append(Sample(r.path, pids[r.identity], camids[r.camera], attrs))
        for samples in splits.values():
            samples.sort(key=lambda s: s.path)
        return self._dataset(self.root, splits["train"], splits["query"], splits["gallery"], skipped=report)

    def _folder_rows(self, report: SkipReport) -> list[_Row]:
        present = [split for split in SPLITS if (self.root / split).is_dir()]
        if not present:
            raise DatasetLayoutError(
                f"folder dataset root {self.root} has no 'train/', 'query/' or 'gallery/' folder: expected "
                f"ROOT/{GRAMMAR} (e.g. ROOT/train/0001/c1_000123.jpg), or pass manifest=FILE.csv"
            )
        rows = []
        for split in present:
            for entry in sorted((self.root / split).iterdir()):
                if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
                    # An image straight in the split folder has no identity folder.
                    report.add_unparseable(f"{split}/", entry.name, GRAMMAR)
                if not entry.is_dir():
                    continue
                for path in sorted(entry.iterdir()):
                    if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                        continue
                    camera, sep, _ = path.stem.partition("_")
                    if not sep or not camera:
                        report.add_unparseable(f"{split}/{entry.name}/", path.name, GRAMMAR)
                        continue
                    rows.append(_Row(split, str(path), entry.name, camera, None))
        if not rows:
            raise DatasetLayoutError(
                f"folder dataset root {self.root} has {', '.join(f'{s}/' for s in present)} but no images "
                f"in the expected places: expected ROOT/{GRAMMAR}"
            )
        return rows

    def _manifest_rows(self, report: SkipReport) -> list[_Row]:
        assert self.manifest is not None
        path = self.manifest if self.manifest.is_absolute() else self.root / self.manifest
        if not path.is_file():
            raise DatasetLayoutError(
                f"folder dataset manifest {path} does not exist: expected a CSV file with the columns "
                "path,identity,camera[,timestamp][,split]"
            )
        rows = []
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            missing = [c for c in MANIFEST_COLUMNS if c not in header]
            if missing:
                raise DatasetLayoutError(
                    f"manifest {path} has no column(s) {', '.join(missing)}: expected a header "
                    f"path,identity,camera[,timestamp][,split] (the file has {len(header)} column(s))"
                )
            for line, record in enumerate(reader, start=2):
                rows.append(self._manifest_row(path, line, record, report))
        kept = [r for r in rows if r is not None]
        if not kept:
            raise DatasetLayoutError(f"manifest {path} lists no existing image")
        return kept

    def _manifest_row(
        self, path: Path, line: int, record: dict[str, str | None], report: SkipReport
    ) -> _Row | None:
        def field(name: str) -> str:
            return (record.get(name) or "").strip()

        image, identity, camera = field("path"), field("identity"), field("camera")
        if not (image and identity and camera):
            raise DatasetLayoutError(
                f"manifest {path}, line {line}: path, identity and camera must all be given"
            )
        split = field("split") or self.default_split
        if split not in SPLITS:
            raise DatasetLayoutError(
                f"manifest {path}, line {line}: split {split!r} is not one of {', '.join(SPLITS)}"
            )
        try:
            captured_at = parse_timestamp(field("timestamp"))
        except ValueError:
            raise DatasetLayoutError(
                f"manifest {path}, line {line}: timestamp {field('timestamp')!r} is neither epoch seconds "
                "nor an ISO 8601 date-time"
            ) from None
        image_path = Path(image) if Path(image).is_absolute() else self.root / image
        if not image_path.is_file():
            report.add_missing(path.name, image)
            return None
        return _Row(split, str(image_path), identity, camera, captured_at)
