"""``write_synthetic``: render a planned synthetic dataset to disk in a real dataset's layout."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from tqdm import tqdm

from training.data.dataset import SPLITS
from training.data.errors import DatasetError, SynthOutputError
from training.data.synthetic.identities import person_identity, stranger, vehicle_identity
from training.data.synthetic.layouts import LAYOUTS, Plan, PlannedImage, plan_dataset
from training.data.synthetic.persons import draw_person
from training.data.synthetic.scene import (
    STREAM_IMAGE,
    Camera,
    background_crop,
    draw_occluder,
    finish,
    make_camera,
    pick_view,
    rng_for,
)
from training.data.synthetic.vehicles import draw_vehicle
from training.data.vehicleid import TEST_SIZES

logger = logging.getLogger(__name__)

#: Written last into every synthetic output: what was generated and every file it wrote, so that a
#: later run may replace exactly those files and nothing else.
MARKER = "reid-synth.json"
MARKER_FORMAT = 1

#: Image (height, width): Market-1501's 128x64 person crops; square vehicle crops.
IMAGE_SIZES = {"person": (128, 64), "vehicle": (128, 128)}
JPEG_QUALITY = 90

_ROLE_CODES = {"normal": 0, "junk": 1, "distractor": 2}
_VARIANT_CODES = {"": 0, "labeled": 1, "detected": 2}


def write_synthetic(
    out: str | Path,
    *,
    layout: str,
    kind: str | None = None,
    ids: int = 100,
    seed: int = 0,
    images_per_id: int = 12,
    cameras: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Write a synthetic dataset in the on-disk layout of ``layout`` and return its root.

    The result reads unchanged with ``build_dataset(layout, root)`` (for ``folder``, also with
    ``manifest="manifest.csv"``). Half the identities (rounded up) are for training; each test
    identity gives one query per camera it appears in and the rest to the gallery. Output is a
    pure function of the arguments: the same seed gives the same bytes.

    Args:
        out: output folder; created if missing. A folder that is not empty is refused unless it
            holds a previous synthetic output (whose files, and only those, are replaced) or
            ``force`` is set (files are then written alongside what is there; nothing is deleted).
        layout: ``market1501``, ``dukemtmc``, ``cuhk03``, ``msmt17``, ``veri776``, ``vehicleid``
            or ``folder``.
        kind: ``person`` or ``vehicle``; defaults to the layout's (only ``folder`` takes both).
        ids: number of identities (at least 4).
        seed: seed of every random choice.
        images_per_id: images of each identity (at least 4: two cameras with two images each).
        cameras: number of cameras; defaults to the real dataset's (Market-1501: 6, VeRi-776: 20).
        progress: show a progress bar.
        force: write into a non-empty folder that is not a previous synthetic output.

    Raises:
        SynthOutputError: ``out`` is not empty and neither a previous output nor ``force``.
        DatasetError: unknown layout, kind that the layout cannot hold, or sizes out of range.
    """
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown synthetic layout {layout!r}: choose one of {', '.join(sorted(LAYOUTS))}")
    spec = LAYOUTS[layout]
    kind = kind or spec.kind
    n_cameras = spec.cameras if cameras is None else cameras
    plan = plan_dataset(layout, seed=seed, ids=ids, images_per_id=images_per_id, cameras=n_cameras, kind=kind)
    root = Path(out).expanduser()
    _prepare_output(root, force=force)

    size = IMAGE_SIZES[kind]
    camera_models = [make_camera(seed, c, size, kind, spec.views) for c in range(n_cameras)]
    made_dirs: set[Path] = set()
    for item in tqdm(plan.images, desc=f"synth {layout}", unit="img", disable=not progress):
        path = root / item.relpath
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        image = render(item, seed=seed, kind=kind, size=size, cameras=camera_models)
        if path.suffix == ".png":
            image.save(path, format="PNG")
        else:
            image.save(path, format="JPEG", quality=JPEG_QUALITY)
    for relpath, text in plan.texts.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")

    marker = {
        "generator": "reid synth",
        "format": MARKER_FORMAT,
        "layout": layout,
        "kind": kind,
        "ids": ids,
        "seed": seed,
        "images_per_id": images_per_id,
        "cameras": n_cameras,
        "image_size": list(size),
        "expected": expected_counts(plan, layout),
        "files": sorted([item.relpath for item in plan.images] + list(plan.texts)),
    }
    (root / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    logger.info("wrote %d %s images in the %s layout to %s", len(plan.images), kind, layout, root)
    return root


def render(
    item: PlannedImage, *, seed: int, kind: str, size: tuple[int, int], cameras: list[Camera]
) -> Image.Image:
    """Draw one planned image: background, subject, occluder, then the camera's degradations."""
    camera = cameras[item.render_camera]
    rng = rng_for(
        seed,
        STREAM_IMAGE,
        item.identity,
        item.render_camera,
        item.index,
        _VARIANT_CODES[item.variant],
        _ROLE_CODES[item.role],
    )
    height, width = size
    canvas = background_crop(camera, size, rng)
    view = pick_view(camera, rng)
    scale = camera.scale * rng.uniform(0.94, 1.06)
    # "detected" boxes (CUHK03) come from a detector: looser and less centred than hand-drawn ones.
    shift = 7.0 if item.variant == "detected" else 3.0
    dx = camera.offset[0] + rng.uniform(-shift, shift)
    dy = camera.offset[1] + rng.uniform(-shift, shift)
    subject: Any
    if item.role == "junk":
        # A box that cuts the person: far off-centre.
        if rng.random() < 0.5:
            dx += (1 if rng.random() < 0.5 else -1) * rng.uniform(0.35, 0.5) * width
        else:
            dy += (1 if rng.random() < 0.5 else -1) * rng.uniform(0.3, 0.45) * height
    if item.role == "distractor":
        if rng.random() < 0.4:
            subject = None  # a false detection of background only
        else:
            subject = stranger(seed, item.index, kind)
            scale *= rng.uniform(0.45, 0.7)
            dx += rng.uniform(-0.3, 0.3) * width
    elif kind == "person":
        subject = person_identity(seed, item.identity)
    else:
        subject = vehicle_identity(seed, item.identity)
    if subject is not None:
        draw = draw_person if kind == "person" else draw_vehicle
        canvas.alpha_composite(draw(subject, view, size, scale, (dx, dy), rng))
    if rng.random() < camera.occlusion:
        draw_occluder(ImageDraw.Draw(canvas), camera, size, rng)
    return finish(canvas, camera, rng)


def expected_counts(plan: Plan, layout: str) -> dict[str, Any]:
    """What a parser should find: ids / images / cameras per split, junk and distractors written."""
    # CUHK03 writes the same plan twice (detected/labeled): count one copy.
    variant = min(item.variant for item in plan.images)
    images = [i for i in plan.images if i.variant == variant]
    counts: dict[str, Any] = {}
    for split in SPLITS:
        kept = [i for i in images if i.split == split and i.role != "junk"]
        counts[split] = {
            "ids": len({i.pid for i in kept}),
            "images": len(kept),
            "cameras": len({i.camid for i in kept}),
        }
    counts["junk"] = sum(i.role == "junk" for i in images)
    counts["distractors"] = sum(i.role == "distractor" for i in images)
    if layout == "vehicleid":
        counts["test_lists"] = {}
        for size in TEST_SIZES:
            lines = plan.texts[f"train_test_split/test_list_{size}.txt"].split()
            counts["test_lists"][str(size)] = {"images": len(lines) // 2, "ids": len(set(lines[1::2]))}
    return counts


def read_marker(root: str | Path) -> dict[str, Any] | None:
    """The marker of a synthetic output folder, or None when ``root`` is not one."""
    path = Path(root) / MARKER
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("generator") != "reid synth":
        return None
    return marker


def _prepare_output(root: Path, *, force: bool) -> None:
    if root.exists() and not root.is_dir():
        raise SynthOutputError(f"synthetic output {root} exists and is not a folder")
    if not root.exists() or not any(root.iterdir()):
        root.mkdir(parents=True, exist_ok=True)
        return
    marker = read_marker(root)
    if marker is not None:
        _remove_previous(root, marker)
        return
    if not force:
        raise SynthOutputError(
            f"synthetic output {root} is not empty and was not written by `reid synth`: choose an empty or "
            "new folder, or pass --force to write alongside its files (nothing there is deleted)"
        )
    logger.warning("writing synthetic data into non-empty %s (--force); existing files are kept", root)


def _remove_previous(root: Path, marker: dict[str, Any]) -> None:
    """Delete exactly the files a previous synthetic run listed, then the folders they leave empty."""
    base = root.resolve()
    parents: dict[int, set[Path]] = defaultdict(set)
    for relpath in marker.get("files", []):
        path = (root / str(relpath)).resolve()
        if base not in path.parents:  # never follow a listed path out of the output folder
            continue
        if path.is_file():
            path.unlink()
        for parent in path.parents:
            if parent == base:
                break
            parents[len(parent.parts)].add(parent)
    for depth in sorted(parents, reverse=True):
        for folder in parents[depth]:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    (root / MARKER).unlink()
