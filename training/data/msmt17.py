"""MSMT17: images in ``train/`` and ``test/``, splits given by ``list_*.txt`` files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from training.data.dataset import (
    DatasetParser,
    LayoutItem,
    ReIDDataset,
    Sample,
    SkipReport,
    check_published_sizes,
    find_layout_root,
    parse_int,
    read_list_file,
    split_counts,
)
from training.data.errors import DatasetLayoutError
from training.data.registry import register_dataset

#: Image folders of the two releases: V2 blurs faces and renames the folders.
_IMAGE_DIRS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))
_DAY_TIME = re.compile(r"^(\d{4})([a-z]+)$", re.IGNORECASE)
GRAMMAR = "PPPP_NNN_CC_DDDDtime_FFFF_K.jpg"


def parse_msmt17_name(name: str) -> tuple[int, dict[str, Any]] | None:
    """``0000_000_01_0303morning_0015_0.jpg`` -> (0-based camera, {day, time_of_day, frame}).

    Only the camera field (the third) is required; the identity comes from the list file.
    """
    fields = Path(name).stem.split("_")
    if len(fields) < 3:
        return None
    cam = parse_int(fields[2])
    if cam is None or cam < 1:
        return None
    attrs: dict[str, Any] = {}
    if len(fields) > 3 and (match := _DAY_TIME.match(fields[3])):
        attrs["day"], attrs["time_of_day"] = match.group(1), match.group(2).lower()
    if len(fields) > 4 and (frame := parse_int(fields[4])) is not None:
        attrs["frame"] = frame
    return cam - 1, attrs


def format_msmt17_name(pid: int, index: int, cam: int, day: str, time_of_day: str, frame: int) -> str:
    """Inverse of :func:`parse_msmt17_name` (``cam`` 0-based), with the identity folder prefix."""
    return f"{pid:04d}/{pid:04d}_{index:03d}_{cam + 1:02d}_{day}{time_of_day}_{frame:04d}_0.jpg"


@register_dataset("msmt17", kind="person")
class MSMT17(DatasetParser):
    """MSMT17 (Wei et al., "Person Transfer GAN to Bridge Domain Gap", CVPR 2018), V1 or V2.

    Layout: ``train/`` and ``test/`` (V2: ``mask_train_v2/``, ``mask_test_v2/``) with
    ``list_train.txt``, ``list_val.txt``, ``list_query.txt``, ``list_gallery.txt`` whose lines read
    ``PPPP/PPPP_NNN_CC_DDDDtime_FFFF_K.jpg PID`` (paths relative to the image folder). The root may
    also be the parent of ``MSMT17_V1/`` or ``MSMT17_V2/``. The identity comes from the list, the
    camera (1-15, stored 0-based) from the third name field; day, time of day and frame go to
    ``attrs``. Train and test identities are numbered independently (both start at 0): they are
    different people, as in the release.

    Args:
        include_val: add ``list_val.txt`` to the training split (default True). The published
            training set, 32,621 images of 1,041 identities, is train + val.

    Published sizes: 32,621 train (with val), 11,659 query, 82,161 gallery images (3,060 test ids).
    """

    display_name = "MSMT17"
    wrappers = ("MSMT17_V1", "MSMT17_V2", "MSMT17")
    published: ClassVar[dict[str, int]] = {"train": 32621, "query": 11659, "gallery": 82161}

    def __init__(self, root: str | Path, *, include_val: bool = True, strict: bool = False) -> None:
        super().__init__(root, strict=strict)
        self.include_val = include_val

    def load(self) -> ReIDDataset:
        lists = ["list_train.txt", "list_query.txt", "list_gallery.txt"]
        if self.include_val:
            lists.insert(1, "list_val.txt")
        required = [LayoutItem(name, f"ROOT/{name} with lines 'PPPP/{GRAMMAR} PID'") for name in lists]
        hint = "Pass include_val=False if your copy has no list_val.txt." if self.include_val else ""
        root = find_layout_root(self.root, self.display_name, required, self.wrappers, hint=hint)
        train_dir, test_dir = self._image_dirs(root)
        report = SkipReport(self.display_name, strict=self.strict)
        train = self._read(root / "list_train.txt", train_dir, report)
        if self.include_val:
            train = sorted(train + self._read(root / "list_val.txt", train_dir, report), key=lambda s: s.path)
        query = self._read(root / "list_query.txt", test_dir, report)
        gallery = self._read(root / "list_gallery.txt", test_dir, report)
        published = dict(self.published)
        if not self.include_val:
            # No published figure for train without val: compare what can be compared.
            published.pop("train")
        counts = split_counts(train, query, gallery)
        check_published_sizes(self.display_name, counts, published, source=str(root))
        return self._dataset(root, train, query, gallery, skipped=report)

    def _image_dirs(self, root: Path) -> tuple[Path, Path]:
        for train_name, test_name in _IMAGE_DIRS:
            if (root / train_name).is_dir() and (root / test_name).is_dir():
                return root / train_name, root / test_name
        raise DatasetLayoutError(
            f"MSMT17 root {root} has its list files but no image folders: expected ROOT/train/ and "
            "ROOT/test/ (V1) or ROOT/mask_train_v2/ and ROOT/mask_test_v2/ (V2) holding PPPP/*.jpg"
        )

    def _read(self, list_path: Path, image_dir: Path, report: SkipReport) -> list[Sample]:
        samples = []
        rows = read_list_file(list_path, self.display_name)
        for relpath, label in rows:
            pid = parse_int(label)
            parsed = parse_msmt17_name(relpath)
            if pid is None or parsed is None:
                report.add_unparseable(list_path.name, f"{relpath} {label}", f"'PPPP/{GRAMMAR} PID'")
                continue
            path = image_dir / relpath
            if not path.is_file():
                report.add_missing(f"{list_path.name} (under {image_dir.name}/)", relpath)
                continue
            camid, attrs = parsed
            samples.append(Sample(str(path), pid, camid, attrs))
        if rows and not samples and report.missing:
            raise DatasetLayoutError(
                f"MSMT17: none of the {len(rows)} images listed in {list_path.name} exist under {image_dir}: "
                "is the image folder from another release?"
            )
        return sorted(samples, key=lambda s: s.path)
