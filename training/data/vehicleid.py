"""VehicleID: ``image/`` plus ``train_test_split/`` list files and optional ``attribute/`` files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar

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
from training.data.errors import DatasetError, DatasetLayoutError
from training.data.registry import register_dataset

logger = logging.getLogger(__name__)

TEST_SIZES = (800, 1600, 2400)

#: Optional per-vehicle attribute files (lines ``vehicle_id attribute_id``) -> the attrs key.
ATTRIBUTE_FILES = {"color_attr.txt": "colour", "model_attr.txt": "model"}


@register_dataset("vehicleid", kind="vehicle", aliases=("pkuvehicleid",))
class VehicleID(DatasetParser):
    """VehicleID (Liu et al., "Deep Relative Distance Learning: Tell the Difference Between Similar
    Vehicles", CVPR 2016).

    Layout: ``image/NNNNNNN.jpg``, ``train_test_split/train_list.txt`` and
    ``test_list_{800,1600,2400}.txt`` (lines ``image_name vehicle_id``, the name without
    ``.jpg``), optionally ``attribute/color_attr.txt`` and ``attribute/model_attr.txt`` (lines
    ``vehicle_id attribute_id``), under the root or inside ``VehicleID_V1.0/``.

    The test split has no fixed query/gallery: ``query`` is empty and ``gallery`` holds every image
    of ``test_list_{test_size}.txt``. The VehicleID protocol (``evaluation.metrics``) draws one gallery
    image per vehicle from these at evaluation time, makes all the others queries, and repeats the
    draw with a seed. VehicleID records no cameras: every sample has ``camid`` 0 (so the Market
    same-camera rule must not be applied to it). Colour and model ids go to ``attrs`` when the
    attribute files list the vehicle.

    Args:
        test_size: 800 (small), 1600 (medium) or 2400 (large) test vehicles.

    Published sizes: 113,346 train images (13,164 vehicles); test lists of 6,493 (800),
    13,377 (1,600) and 19,777 (2,400) images.
    """

    display_name = "VehicleID"
    wrappers = ("VehicleID_V1.0", "VehicleID")
    published_train = 113346
    published_test: ClassVar[dict[int, int]] = {800: 6493, 1600: 13377, 2400: 19777}

    def __init__(self, root: str | Path, *, test_size: int = 800, strict: bool = False) -> None:
        super().__init__(root, strict=strict)
        if test_size not in TEST_SIZES:
            raise DatasetError(
                f"VehicleID test_size must be one of {', '.join(map(str, TEST_SIZES))} "
                f"(small, medium, large), got {test_size!r}"
            )
        self.test_size = test_size

    def load(self) -> ReIDDataset:
        test_list = f"train_test_split/test_list_{self.test_size}.txt"
        required = [
            LayoutItem("image/", "ROOT/image/*.jpg (the images named in the list files)"),
            LayoutItem("train_test_split/train_list.txt", "lines 'image_name vehicle_id'"),
            LayoutItem(test_list, "lines 'image_name vehicle_id'"),
        ]
        root = find_layout_root(self.root, self.display_name, required, self.wrappers)
        attributes = self._read_attributes(root / "attribute")
        report = SkipReport(self.display_name, strict=self.strict)
        train = self._read(root / "train_test_split/train_list.txt", root / "image", attributes, report)
        gallery = self._read(root / test_list, root / "image", attributes, report)
        published = {"train": self.published_train, "gallery": self.published_test[self.test_size]}
        counts = split_counts(train, [], gallery)
        check_published_sizes(self.display_name, counts, published, source=str(root))
        return self._dataset(root, train, [], gallery, skipped=report)

    def _read_attributes(self, folder: Path) -> dict[int, dict[str, int]]:
        attributes: dict[int, dict[str, int]] = {}
        for filename, key in ATTRIBUTE_FILES.items():
            path = folder / filename
            if not path.is_file():
                continue
            for vid_text, value_text in read_list_file(path, self.display_name):
                vid, value = parse_int(vid_text), parse_int(value_text)
                if vid is None or value is None:
                    logger.warning("VehicleID: ignoring line %r of %s", f"{vid_text} {value_text}", path)
                    continue
                attributes.setdefault(vid, {})[key] = value
        return attributes

    def _read(
        self, list_path: Path, image_dir: Path, attributes: dict[int, dict[str, int]], report: SkipReport
    ) -> list[Sample]:
        rows = read_list_file(list_path, self.display_name)
        samples = []
        for name, label in rows:
            vid = parse_int(label)
            if vid is None:
                report.add_unparseable(list_path.name, f"{name} {label}", "'image_name vehicle_id'")
                continue
            path = image_dir / (name if name.lower().endswith(".jpg") else f"{name}.jpg")
            if not path.is_file():
                report.add_missing(list_path.name, path.name)
                continue
            samples.append(Sample(str(path), vid, 0, dict(attributes.get(vid, {}))))
        if rows and not samples and report.missing:
            raise DatasetLayoutError(
                f"VehicleID: none of the {len(rows)} images listed in {list_path.name} "
                f"exist under {image_dir}"
            )
        return sorted(samples, key=lambda s: s.path)
