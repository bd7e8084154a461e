"""Which images a synthetic dataset has, where each goes, and the list files of each real layout.

:func:`plan_dataset` decides identities, cameras, splits and file names from the seed alone,
without drawing anything; :mod:`training.data.synthetic.writer` then renders every planned image.
Every layout follows its dataset's release: same folders, same file-name grammar (through the
parsers' own ``format_*`` functions), same list and label files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from training.data.cuhk03 import VARIANTS as CUHK03_VARIANTS
from training.data.cuhk03 import format_cuhk03_name
from training.data.dukemtmc import format_duke_name
from training.data.errors import DatasetError
from training.data.market1501 import format_market_name
from training.data.msmt17 import format_msmt17_name
from training.data.synthetic.identities import vehicle_labels
from training.data.synthetic.scene import STREAM_PLAN, rng_for
from training.data.synthetic.vehicles import BODY_TYPES, COLOUR_NAMES
from training.data.vehicleid import TEST_SIZES
from training.data.veri776 import format_veri_name


@dataclass(frozen=True)
class LayoutSpec:
    """Defaults and limits of one layout."""

    kind: str
    cameras: int
    max_cameras: int
    views: tuple[str, ...] = ("front", "back", "left", "right")
    #: Why the number of cameras is fixed, for layouts where it is.
    camera_note: str = ""


LAYOUTS: dict[str, LayoutSpec] = {
    "market1501": LayoutSpec("person", 6, 9),
    "dukemtmc": LayoutSpec("person", 8, 9),
    "cuhk03": LayoutSpec("person", 2, 2, camera_note="the two views of each identity's camera pair"),
    "msmt17": LayoutSpec("person", 15, 99),
    "veri776": LayoutSpec("vehicle", 20, 999),
    # VehicleID has no camera ids; its pictures are taken from the front or from behind.
    "vehicleid": LayoutSpec(
        "vehicle",
        2,
        2,
        views=("front", "back"),
        camera_note="VehicleID records no camera: front and rear views",
    ),
    "folder": LayoutSpec("person", 4, 999),
}


@dataclass(frozen=True)
class PlannedImage:
    """One image to render.

    Args:
        relpath: file path relative to the output folder.
        identity: index of the identity whose look is drawn (-1: a stranger, for distractors).
        pid: the label the layout records (-1 junk, 0 Market distractor, else the dataset's number).
        camid: 0-based camera.
        index: image number within (identity, camera), for the per-image random generator.
        split: ``train``, ``query`` or ``gallery`` (what the parser should find).
        role: ``normal``, ``junk`` (badly cropped) or ``distractor`` (a false detection).
        variant: rendering variant (CUHK03 ``detected`` crops are looser than ``labeled``).
        camera: the camera that renders it when the layout records another ``camid`` (VehicleID
            records 0 for all; its pictures still come from different viewpoints).
    """

    relpath: str
    identity: int
    pid: int
    camid: int
    index: int
    split: str
    role: str = "normal"
    variant: str = ""
    camera: int | None = None

    @property
    def render_camera(self) -> int:
        return self.camid if self.camera is None else self.camera


@dataclass
class Plan:
    """All images and text files of one synthetic dataset."""

    images: list[PlannedImage] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    #: Per identity: the attributes a layout records (VehicleID colour/model, VeRi colour/type).
    identity_attrs: dict[int, dict[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Shot:
    identity: int
    camid: int
    index: int  # within (identity, camera)
    number: int  # within the identity, over all cameras
    frame: int  # per-camera increasing counter
    split: str


def validate(layout: str, kind: str, ids: int, images_per_id: int, cameras: int) -> LayoutSpec:
    """Check the requested kind and sizes against the layout; the message says what would work."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown synthetic layout {layout!r}: choose one of {', '.join(sorted(LAYOUTS))}")
    spec = LAYOUTS[layout]
    if kind not in ("person", "vehicle"):
        raise DatasetError(f"kind must be person or vehicle, got {kind!r}")
    # A dataset's parser declares its kind, so only the generic layout may hold either.
    if layout != "folder" and kind != spec.kind:
        raise DatasetError(
            f"layout {layout} holds {spec.kind} images; use kind {spec.kind}, "
            f"or layout folder for {kind} images"
        )
    if ids < 4:
        raise DatasetError(f"--ids must be at least 4 (2 training and 2 test identities), got {ids}")
    if images_per_id < 4:
        raise DatasetError(
            f"--images-per-id must be at least 4 (a test identity needs 2 images in each of 2 cameras "
            f"for a query and a cross-camera match), got {images_per_id}"
        )
    if spec.camera_note and cameras != spec.cameras:
        raise DatasetError(f"{layout} always has {spec.cameras} cameras ({spec.camera_note}), got {cameras}")
    if not 2 <= cameras <= spec.max_cameras:
        raise DatasetError(f"{layout} takes 2 to {spec.max_cameras} cameras, got {cameras}")
    return spec


def _shots(seed: int, ids: int, images_per_id: int, cameras: int) -> tuple[list[_Shot], set[int]]:
    """Every identity's images over its cameras, and which identities are for training."""
    rng = rng_for(seed, STREAM_PLAN, 0)
    order = rng.permutation(ids)
    train_ids = {int(i) for i in order[: ids // 2 + ids % 2]}
    frames = np.zeros(cameras, dtype=np.int64)
    shots = []
    for identity in range(ids):
        k = int(rng.integers(2, min(cameras, images_per_id // 2, 6) + 1))
        cams = sorted(int(c) for c in rng.choice(cameras, size=k, replace=False))
        counts = 2 + rng.multinomial(images_per_id - 2 * k, np.full(k, 1.0 / k))
        number = 0
        for cam, count in zip(cams, counts, strict=True):
            for index in range(int(count)):
                frames[cam] += int(rng.integers(5, 60))
                # Test identities: one query per camera, as Market-1501 picks them; the rest is gallery.
                split = "train" if identity in train_ids else ("query" if index == 0 else "gallery")
                shots.append(_Shot(identity, cam, index, number, int(frames[cam]), split))
                number += 1
    return shots, train_ids


def plan_dataset(layout: str, *, seed: int, ids: int, images_per_id: int, cameras: int, kind: str) -> Plan:
    """Decide every file of a synthetic dataset in ``layout`` (nothing is drawn here)."""
    validate(layout, kind, ids, images_per_id, cameras)
    if seed < 0:
        raise DatasetError(f"--seed must be a non-negative integer, got {seed}")
    shots, train_ids = _shots(seed, ids, images_per_id, cameras)
    return _PLANNERS[layout](shots, train_ids, seed, ids, kind)


def _market(shots: list[_Shot], train_ids: set[int], seed: int, ids: int, kind: str) -> Plan:
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    rng = rng_for(seed, STREAM_PLAN, 1)
    plan = Plan()
    for shot in shots:
        sequence = 1 + (shot.identity + shot.camid) % 6
        name = format_market_name(shot.identity + 1, shot.camid, sequence, shot.frame, 1)
        plan.images.append(
            PlannedImage(
                f"{folders[shot.split]}/{name}",
                shot.identity,
                shot.identity + 1,
                shot.camid,
                shot.index,
                shot.split,
            )
        )
    # Market's gallery also holds junk (-1: boxes that cut a person) and distractors (0000: false
    # detections); a few of each make the parser's and the evaluator's rules matter.
    gallery = [s for s in shots if s.split == "gallery"]
    cameras = 1 + max(s.camid for s in shots)
    extra_frame = 1 + max(s.frame for s in shots)
    for role, pid, fraction in (("junk", -1, 0.04), ("distractor", 0, 0.06)):
        for k in range(max(2, round(fraction * len(gallery)))):
            source = gallery[int(rng.integers(len(gallery)))]
            camid = int(rng.integers(cameras)) if role == "distractor" else source.camid
            name = format_market_name(pid, camid, 1, extra_frame, 2 if role == "junk" else 3)
            extra_frame += 1
            identity = source.identity if role == "junk" else -1
            plan.images.append(
                PlannedImage(f"bounding_box_test/{name}", identity, pid, camid, 1000 + k, "gallery", role)
            )
    return plan


def _duke(shots: list[_Shot], train_ids: set[int], seed: int, ids: int, kind: str) -> Plan:
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    return Plan(
        images=[
            PlannedImage(
                f"{folders[s.split]}/{format_duke_name(s.identity + 1, s.camid, s.frame)}",
                s.identity,
                s.identity + 1,
                s.camid,
                s.index,
                s.split,
            )
            for s in shots
        ]
    )


def _cuhk03(shots: list[_Shot], train_ids: set[int], seed: int, ids: int, kind: str) -> Plan:
    folders = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
    plan = Plan()
    for variant in CUHK03_VARIANTS:
        for s in shots:
            name = format_cuhk03_name(s.identity + 1, s.camid, s.number + 1)
            plan.images.append(
                PlannedImage(
                    f"{variant}/{folders[s.split]}/{name}",
                    s.identity,
                    s.identity + 1,
                    s.camid,
                    s.index,
                    s.split,
                    variant=variant,
                )
            )
    return plan


_MSMT_DAYS = ("0113", "0117", "0302", "0303")
_MSMT_TIMES = ("morning", "noon", "afternoon")


def _msmt17(shots: list[_Shot], train_ids: set[int], seed: int, ids: int, kind: str) -> Plan:
    rng = rng_for(seed, STREAM_PLAN, 2)
    # Train and test identities are numbered from 0 separately, as in the release.
    train_number = {i: n for n, i in enumerate(sorted(train_ids))}
    test_number = {i: n for n, i in enumerate(sorted(set(range(ids)) - train_ids))}
    val_ids = {i for i in sorted(train_ids) if rng.random() < 0.15}
    plan = Plan()
    lists: dict[str, list[str]] = {
        "list_train.txt": [],
        "list_val.txt": [],
        "list_query.txt": [],
        "list_gallery.txt": [],
    }
    for s in shots:
        numbering = train_number if s.split == "train" else test_number
        pid = numbering[s.identity]
        day = _MSMT_DAYS[s.camid % len(_MSMT_DAYS)]
        time_of_day = _MSMT_TIMES[(s.frame // 97) % len(_MSMT_TIMES)]
        relname = format_msmt17_name(pid, s.number, s.camid, day, time_of_day, s.frame % 10000)
        folder = "train" if s.split == "train" else "test"
        if s.split == "train":
            # Some training identities give their first image to list_val.txt, as the release does.
            is_val = s.identity in val_ids and s.number == 0
            lists["list_val.txt" if is_val else "list_train.txt"].append(f"{relname} {pid}")
        else:
            lists[f"list_{s.split}.txt"].append(f"{relname} {pid}")
        plan.images.append(PlannedImage(f"{folder}/{relname}", s.identity, pid, s.camid, s.index, s.split))
    plan.texts = {name: "\n".join(lines) + "\n" for name, lines in lists.items()}
    return plan


def _veri776(shots: list[_Shot], train_ids: set[int], seed: int, ids: int, kind: str) -> Plan:
    folders = {"train": "image_train", "query": "image_query", "gallery": "image_test"}
    lists = {"train": "name_train.txt", "query": "name_query.txt", "gallery": "name_test.txt"}
    plan = Plan()
    names: dict[str, list[str]] = {split: [] for split in folders}
    items: dict[str, list[str]] = {"train": [], "test": []}
    for s in shots:
        name = format_veri_name(s.identity + 1, s.camid, s.frame)
        names[s.split].append(name)
        plan.images.append(
            PlannedImage(f"{folders[s.split]}/{name}", s.identity, s.identity + 1, s.camid, s.index, s.split)
        )
        labels = vehicle_labels(seed, s.identity)
        plan.identity_attrs[s.identity] = labels
        items["train" if s.split == "train" else "test"].append(
            f'<Item imageName="{name}" vehicleID="{s.identity + 1:04d}" cameraID="c{s.camid + 1:03d}" '
            f'colorID="{labels["colour"] + 1}" typeID="{labels["type"] + 1}" />'
        )
    for split, filename in lists.items():
        plan.texts[filename] = "\n".join(names[split]) + "\n"
    for part, root_tag in (("train", "TrainingImages"), ("test", "TestImages")):
        # The release declares gb2312 (its file is ASCII in practice): keep that, the parser copes.
        plan.texts[f"{part}_label.xml"] = (
            '<?xml version="1.0" encoding="gb2312"?>\n'
            f'<{root_tag} Version="1.0">\n<Items number="{len(items[part])}">\n'
            + "\n".join(items[part])
            + f"\n</Items>\n</{root_tag}>\n"
        )
    plan.texts["list_color.txt"] = "".join(f"{i + 1} {name}\n" for i, name in enumerate(COLOUR_NAMES))
    plan.texts["list_type.txt"] = "".join(f"{i + 1} {name}\n" for i, name in enumerate(BODY_TYPES))
    return plan


def _vehicleid(shots: list[_Shot], train_ids: set[int], seed: int, ids: int, kind: str) -> Plan:
    rng = rng_for(seed, STREAM_PLAN, 3)
    numbers = rng.permutation(len(shots)) + 1
    plan = Plan()
    train_lines, test_lines, img2vid = [], [], []
    for s, number in zip(shots, numbers, strict=True):
        name = f"{int(number):07d}"
        vid = s.identity + 1
        split = "train" if s.split == "train" else "gallery"
        plan.images.append(
            PlannedImage(f"image/{name}.jpg", s.identity, vid, 0, s.index, split, camera=s.camid)
        )
        (train_lines if split == "train" else test_lines).append((name, vid))
        img2vid.append(f"{name} {vid}")
    test_vids = sorted({vid for _, vid in test_lines})
    # Three nested test lists standing for the small / medium / large sets.
    for k, size in enumerate(TEST_SIZES, start=1):
        chosen = set(test_vids[: math.ceil(len(test_vids) * k / len(TEST_SIZES))])
        plan.texts[f"train_test_split/test_list_{size}.txt"] = "".join(
            f"{name} {vid}\n" for name, vid in test_lines if vid in chosen
        )
    plan.texts["train_test_split/train_list.txt"] = "".join(f"{name} {vid}\n" for name, vid in train_lines)
    colour_lines, model_lines = [], []
    for identity in range(ids):
        labels = vehicle_labels(seed, identity)
        plan.identity_attrs[identity] = labels
        colour_lines.append(f"{identity + 1} {labels['colour']}\n")
        model_lines.append(f"{identity + 1} {labels['model']}\n")
    plan.texts["attribute/color_attr.txt"] = "".join(colour_lines)
    plan.texts["attribute/model_attr.txt"] = "".join(model_lines)
    plan.texts["attribute/img2vid.txt"] = "\n".join(img2vid) + "\n"
    return plan


#: Fixed start of the synthetic clock (2024-01-01 UTC): timestamps never depend on "now".
_EPOCH = 1_704_067_200.0
_FPS = 25.0


def _folder(shots: list[_Shot], train_ids: set[int], seed: int, ids: int, kind: str) -> Plan:
    plan = Plan()
    rows = ["path,identity,camera,timestamp,split"]
    for s in shots:
        relpath = f"{s.split}/{s.identity + 1:04d}/c{s.camid + 1}_{s.frame:06d}.jpg"
        plan.images.append(PlannedImage(relpath, s.identity, s.identity + 1, s.camid, s.index, s.split))
        rows.append(f"{relpath},{s.identity + 1:04d},c{s.camid + 1},{_EPOCH + s.frame / _FPS:.2f},{s.split}")
    plan.texts["manifest.csv"] = "\n".join(rows) + "\n"
    return plan


_PLANNERS: dict[str, Callable[[list[_Shot], set[int], int, int, str], Plan]] = {
    "market1501": _market,
    "dukemtmc": _duke,
    "cuhk03": _cuhk03,
    "msmt17": _msmt17,
    "veri776": _veri776,
    "vehicleid": _vehicleid,
    "folder": _folder,
}
