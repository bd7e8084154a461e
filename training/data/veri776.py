"""VeRi-776: ``image_train/``, ``image_query/``, ``image_test/`` with names ``VVVV_cCCC_FFFFFFFF_N.jpg``."""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
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
    scan_folder,
    split_counts,
)
from training.data.registry import register_dataset

logger = logging.getLogger(__name__)

GRAMMAR = "VVVV_cCCC_FFFFFFFF_N.jpg"
_VERI_NAME = re.compile(r"^(-?\d+)_c(\d+)_(\d+)_(\d+)\.jpe?g$", re.IGNORECASE)
_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")
LABEL_FILES = ("train_label.xml", "test_label.xml")


def parse_veri_name(name: str) -> tuple[int, int, dict[str, Any]] | None:
    """``0001_c001_00016450_0.jpg`` -> (vehicle id, 0-based camera, {frame, index}); None if malformed."""
    match = _VERI_NAME.match(name)
    if match is None:
        return None
    vid, cam, frame, index = (int(g) for g in match.groups())
    if cam < 1:
        return None
    return vid, cam - 1, {"frame": frame, "index": index}


def format_veri_name(vid: int, cam: int, frame: int, index: int = 0) -> str:
    """Inverse of :func:`parse_veri_name` (``cam`` 0-based)."""
    return f"{vid:04d}_c{cam + 1:03d}_{frame:08d}_{index}.jpg"


def read_veri_labels(path: Path) -> dict[str, dict[str, int]]:
    """Per-image ``colour`` and ``type`` ids from ``train_label.xml`` / ``test_label.xml``.

    The release declares ``encoding="gb2312"``, which the XML parser cannot decode by itself, so
    the bytes are decoded here and the declaration is dropped. An unreadable file is logged and
    ignored: labels are extras, not part of the re-identification protocol.
    """
    raw = path.read_bytes()
    for encoding in ("utf-8", "gb2312"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        text = raw.decode("latin-1")
    try:
        tree = ET.fromstring(_XML_DECLARATION.sub("", text, count=1))
    except ET.ParseError as error:
        logger.warning("VeRi-776: cannot read %s (%s); colour/type attributes left out", path, error)
        return {}
    labels = {}
    for item in tree.iter("Item"):
        name = item.get("imageName")
        if not name:
            continue
        attrs = {}
        for key, xml_key in (("colour", "colorID"), ("type", "typeID")):
            value = parse_int(item.get(xml_key, ""))
            if value is not None:
                attrs[key] = value
        labels[name] = attrs
    return labels


@register_dataset("veri776", kind="vehicle", aliases=("veri",))
class VeRi776(DatasetParser):
    """VeRi-776 (Liu et al., "A Deep Learning-Based Approach to Progressive Vehicle Re-identification
    for Urban Surveillance", ECCV 2016).

    Layout: ``image_train/``, ``image_query/``, ``image_test/`` (the gallery) under the root or
    inside ``VeRi/``; file names ``VVVV_cCCC_FFFFFFFF_N.jpg`` (vehicle, camera 1-20, frame, index).
    Cameras are stored 0-based. When ``train_label.xml`` / ``test_label.xml`` are present, each
    image's ``colour`` and ``type`` ids (the release's colorID / typeID) go to ``attrs``; labels
    are per vehicle, so an image missing from the XML takes its vehicle's labels.

    Published sizes: 37,778 train images (576 vehicles), 1,678 query, 11,579 gallery (200 vehicles).
    """

    display_name = "VeRi-776"
    wrappers = ("VeRi", "VeRi-776", "VeRi776")
    published: ClassVar[dict[str, int]] = {"train": 37778, "query": 1678, "gallery": 11579}

    def load(self) -> ReIDDataset:
        expected = f"*.jpg named {GRAMMAR} (e.g. 0001_c001_00016450_0.jpg)"
        folders = ("image_train", "image_query", "image_test")
        required = [LayoutItem(f"{folder}/", f"ROOT/{folder}/{expected}") for folder in folders]
        root = find_layout_root(self.root, self.display_name, required, self.wrappers)
        report = SkipReport(self.display_name, strict=self.strict)
        splits = [scan_folder(root / f, parse_veri_name, grammar=GRAMMAR, report=report) for f in folders]
        labels: dict[str, dict[str, int]] = {}
        for name in LABEL_FILES:
            if (root / name).is_file():
                labels.update(read_veri_labels(root / name))
        if labels:
            splits = [self._with_labels(samples, labels) for samples in splits]
        check_published_sizes(self.display_name, split_counts(*splits), self.published, source=str(root))
        return self._dataset(root, *splits, skipped=report)

    @staticmethod
    def _with_labels(samples: list[Sample], labels: dict[str, dict[str, int]]) -> list[Sample]:
        by_vehicle: dict[int, dict[str, int]] = {}
        for name, attrs in labels.items():
            parsed = parse_veri_name(name)
            if parsed is not None:
                by_vehicle.setdefault(parsed[0], attrs)
        out = []
        for s in samples:
            extra = labels.get(Path(s.path).name) or by_vehicle.get(s.pid, {})
            out.append(Sample(s.path, s.pid, s.camid, {**s.attrs, **extra}))
        return out
