"""Samples and datasets, plus the checks every layout parser shares.

A parser turns a root folder in a dataset's published layout into a :class:`ReIDDataset`: three
lists of :class:`Sample` (train / query / gallery). Identities are kept as the dataset numbers them
(no relabelling: the trainer maps train identities to class indices itself); cameras are 0-based.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from training.data.errors import DatasetError, DatasetLayoutError

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "query", "gallery")

#: Image extensions a folder scan looks at; anything else (Thumbs.db, readme.txt) is ignored.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})

#: A dataset whose image count reaches this fraction of the published total is taken to be the
#: full release, so any difference from the published per-split counts is worth a warning.
#: Below it, the folder is an intentional subset (or a synthetic twin) and is accepted silently.
FULL_SET_FRACTION = 0.9


@dataclass(frozen=True)
class Sample:
    """One labelled image.

    Args:
        path: path of the image file.
        pid: identity as the dataset numbers it (Market-1501: 0 is a distractor, kept in the gallery;
            junk images, identity -1, never reach a sample).
        camid: 0-based camera index (Market-1501 ``c1`` is camera 0).
        attrs: whatever else the dataset records: ``frame``, ``sequence``, ``view``, ``colour``,
            ``model``, ``captured_at`` (epoch seconds or None) ...
    """

    path: str
    pid: int
    camid: int
    # Excluded from hashing so that samples can live in sets (a dict is not hashable).
    attrs: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass
class ReIDDataset:
    """Train / query / gallery samples of one dataset, as its parser read them from disk.

    Args:
        name: registry name (``market1501``, ``vehicleid`` ...).
        kind: ``person`` or ``vehicle``.
        root: the folder the images were found in (the inner folder when a wrapper was accepted).
        train, query, gallery: the samples of each split, sorted by path.
        skipped: how many files the parser left out, by reason (``junk``, ``unparseable``,
            ``missing``), so a caller can tell a clean parse from a lossy one.
    """

    name: str
    kind: str
    root: Path
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    skipped: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[Sample]:
        """Samples of split ``name`` (``train``, ``query`` or ``gallery``)."""
        if name not in SPLITS:
            valid = ", ".join(SPLITS)
            raise DatasetError(f"unknown split {name!r} for dataset {self.name}: choose one of {valid}")
        return getattr(self, name)

    def stats(self, split: str) -> tuple[int, int, int]:
        """(identities, images, cameras) of one split."""
        samples = self.split(split)
        return len({s.pid for s in samples}), len(samples), len({s.camid for s in samples})

    @property
    def num_train_pids(self) -> int:
        return len({s.pid for s in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({s.camid for s in self.train})

    def summary(self) -> str:
        """The usual torchreid / fast-reid table of identities, images and cameras per split."""
        rule = "  " + "-" * 42
        lines = [
            f"Dataset {self.name} ({self.kind}) at {self.root}",
            rule,
            f"  {'subset':<8} | {'# ids':>6} | {'# images':>9} | {'# cameras':>9}",
            rule,
        ]
        for split in SPLITS:
            ids, images, cams = self.stats(split)
            lines.append(f"  {split:<8} | {ids:>6} | {images:>9} | {cams:>9}")
        lines.append(rule)
        skipped = {reason: n for reason, n in self.skipped.items() if n}
        if skipped:
            lines.append("  skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
        return "\n".join(lines)


class DatasetParser:
    """Base of the layout parsers: a subclass reads one dataset's folder layout in :meth:`load`.

    ``register_dataset`` sets :attr:`name` and :attr:`kind`. Options are keyword-only arguments of
    the subclass's ``__init__``; the registry rejects unknown ones with the list of accepted ones.

    Args:
        root: the dataset folder as the user gave it.
        strict: raise :class:`DatasetLayoutError` on unparseable file names or listed-but-missing
            images instead of logging a warning and skipping them.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    #: Human name used in messages ("Market-1501").
    display_name: ClassVar[str] = ""

    def __init__(self, root: str | Path, *, strict: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.strict = strict

    def load(self) -> ReIDDataset:
        raise NotImplementedError

    def _dataset(
        self, root: Path, train: list[Sample], query: list[Sample], gallery: list[Sample], skipped: SkipReport
    ) -> ReIDDataset:
        return ReIDDataset(
            name=self.name,
            kind=self.kind,
            root=root,
            train=train,
            query=query,
            gallery=gallery,
            skipped=skipped.close(),
        )


@dataclass(frozen=True)
class LayoutItem:
    """One thing a layout needs: ``relpath`` ends with '/' for a folder; ``expected`` says what it holds."""

    relpath: str
    expected: str

    @property
    def is_dir(self) -> bool:
        return self.relpath.endswith("/")

    def present_in(self, root: Path) -> bool:
        path = root / self.relpath.rstrip("/")
        return path.is_dir() if self.is_dir else path.is_file()

    def describe(self) -> str:
        return f"'{self.relpath}' {'folder' if self.is_dir else 'file'}"


def find_layout_root(
    root: Path, display: str, required: Sequence[LayoutItem], wrappers: Sequence[str] = (), hint: str = ""
) -> Path:
    """The folder under ``root`` (itself or one of the usual wrapper folders) that holds ``required``.

    Raises:
        DatasetLayoutError: naming every missing item and what it should contain.
    """
    if not root.is_dir():
        raise DatasetLayoutError(f"{display} root {root} does not exist or is not a folder")
    candidates = [root, *(root / w for w in wrappers if (root / w).is_dir())]
    best, best_missing = root, list(required)
    for candidate in candidates:
        missing = [item for item in required if not item.present_in(candidate)]
        if not missing:
            return candidate
        if len(missing) < len(best_missing):
            best, best_missing = candidate, missing
    where = f"{root}" if best == root else f"{root} (looked inside {best.name}/)"
    first = best_missing[0]
    message = f"{display} root {where} has no {first.describe()}: expected {first.expected}"
    for item in best_missing[1:]:
        message += f"; no {item.describe()} either: expected {item.expected}"
    layout = ", ".join(item.relpath for item in required)
    message += f". A {display} root holds {layout}"
    if wrappers:
        message += " (directly or inside " + " or ".join(f"{w}/" for w in wrappers) + ")"
    message += "."
    if hint:
        message += f" {hint}"
    raise DatasetLayoutError(message)


@dataclass
class SkipReport:
    """Counts what a parser leaves out and reports unparseable names once, with an example."""

    display: str
    strict: bool = False
    junk: int = 0
    unparseable: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)

    def add_unparseable(self, where: str, name: str, grammar: str) -> None:
        self.unparseable.setdefault(where, (grammar, []))[1].append(name)

    def add_missing(self, where: str, name: str) -> None:
        self.missing.setdefault(where, []).append(name)

    def close(self) -> dict[str, int]:
        """Warn (or raise, when strict) about unparseable names and missing files; return the counts."""
        problems = []
        for where, (grammar, names) in self.unparseable.items():
            problems.append(
                f"{len(names)} file name(s) in {where} do not follow {grammar} (e.g. {names[0]!r})"
            )
        for where, names in self.missing.items():
            problems.append(f"{len(names)} image(s) listed in {where} do not exist (e.g. {names[0]!r})")
        if problems:
            message = f"{self.display}: " + "; ".join(problems)
            if self.strict:
                raise DatasetLayoutError(message + " (strict parsing: fix or remove them)")
            logger.warning("%s; they were skipped", message)
        return {
            "junk": self.junk,
            "unparseable": sum(len(names) for _, names in self.unparseable.values()),
            "missing": sum(len(names) for names in self.missing.values()),
        }


#: Parses one file name into (pid, 0-based camid, attrs); None when the name does not fit the grammar.
NameParser = Callable[[str], tuple[int, int, dict[str, Any]] | None]


def scan_folder(
    folder: Path, parse_name: NameParser, *, grammar: str, report: SkipReport, drop_junk: bool = True
) -> list[Sample]:
    """Samples of every image directly in ``folder`` whose name ``parse_name`` understands.

    Identity -1 (junk) is dropped and counted when ``drop_junk``; names that do not parse are
    counted in ``report``; files that are not images are ignored.
    """
    samples = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        parsed = parse_name(path.name)
        if parsed is None:
            report.add_unparseable(f"{folder.name}/", path.name, grammar)
            continue
        pid, camid, attrs = parsed
        if drop_junk and pid == -1:
            report.junk += 1
            continue
        samples.append(Sample(str(path), pid, camid, attrs))
    return samples


def read_list_file(path: Path, display: str) -> list[tuple[str, str]]:
    """Lines ``name label`` of a list file (MSMT17, VehicleID); blank lines are ignored.

    Raises:
        DatasetLayoutError: on a line without exactly two fields, naming the file and line.
    """
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise DatasetLayoutError(
                    f"{display}: line {number} of {path} is {line.strip()!r}: expected 'image_name identity'"
                )
            rows.append((fields[0], fields[1]))
    return rows


def parse_int(text: str) -> int | None:
    """``int(text)`` or None, for fields that may be malformed in user data."""
    try:
        return int(text)
    except ValueError:
        return None


def check_published_sizes(
    display: str, observed: Mapping[str, int], published: Mapping[str, int], *, source: str = ""
) -> str:
    """Compare per-split image counts with the published ones; warn when a full set differs.

    Rule: when the observed total reaches :data:`FULL_SET_FRACTION` of the published total the
    folder is taken to be the full release, and any per-split difference is logged as a warning
    (a truncated download, a mixed-up split, a different version). Smaller folders are subsets
    (or synthetic twins) and pass silently. Nothing here raises.

    Returns:
        ``"match"``, ``"differs"`` (warned) or ``"subset"``.
    """
    total_published = sum(published.values())
    total_observed = sum(observed.get(split, 0) for split in published)
    if all(observed.get(split, 0) == n for split, n in published.items()):
        logger.debug("%s: image counts match the published sizes", display)
        return "match"
    if total_published and total_observed >= FULL_SET_FRACTION * total_published:
        differences = ", ".join(
            f"{split} {observed.get(split, 0):,} (published {n:,})"
            for split, n in published.items()
            if observed.get(split, 0) != n
        )
        logger.warning(
            "%s looks like the full dataset but its image counts differ from the published sizes%s: %s",
            display,
            f" ({source})" if source else "",
            differences,
        )
        return "differs"
    logger.debug("%s: %d of %d published images: a subset", display, total_observed, total_published)
    return "subset"


def split_counts(
    train: Sequence[Sample], query: Sequence[Sample], gallery: Sequence[Sample]
) -> dict[str, int]:
    return {"train": len(train), "query": len(query), "gallery": len(gallery)}


_NUMBERED_TOKEN = re.compile(r"^(?:c|cam|camera)?[_-]?(\d+)$", re.IGNORECASE)


def token_number(token: str) -> int | None:
    """The number in a camera/identity token such as ``3``, ``c3``, ``cam03``; None otherwise."""
    match = _NUMBERED_TOKEN.match(token)
    return int(match.group(1)) if match else None
