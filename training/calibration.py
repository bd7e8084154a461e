"""`reid calibrate`: DenoiseRep in closed form on an exported model and a folder of unlabelled images.

The exported (plain) backbone is converted, each denoiser is set to the exact minimiser of its
expected denoising loss from the streamed statistics of its layer's input
(:func:`training.denoiserep.calibration.calibrate`), and the result is fused and exported again as a
new model directory. No label, no gradient, one pass: what the label-free stage converges to.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from training.data.transforms import Preprocess, build_test_transform
from training.denoiserep import DenoiseRepError
from training.export import export_model, load_model

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


@dataclass(frozen=True)
class CalibrationReport:
    """What ``reid calibrate`` did: the new model, images used and skipped, the fused weight change."""

    model_dir: Path
    images: int
    skipped: int
    weight_change: dict[str, float]


def unlabelled_images(folder: Path, max_images: int | None) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted), at most ``max_images`` spread evenly."""
    if not folder.is_dir():
        raise DenoiseRepError(f"--images {folder} is not a folder: pass a folder of camera crops")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DenoiseRepError(
            f"--images {folder} holds no image ({', '.join(IMAGE_SUFFIXES)}): pass a folder of camera crops"
        )
    if max_images is not None and len(paths) > max_images:
        stride = len(paths) / max_images
        paths = [paths[int(i * stride)] for i in range(max_images)]
    return paths


def _batches(
    paths: Sequence[Path], prep: Preprocess, batch_size: int, skipped: list[str]
) -> Iterator[torch.Tensor]:
    transform = build_test_transform(prep)
    batch: list[torch.Tensor] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                batch.append(transform(image))
        except (OSError, UnidentifiedImageError, ValueError):
            skipped.append(path.name)  # unreadable crops are left out, as in ingestion
            continue
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def calibrate_model(
    model_dir: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    layers: str = "auto",
    beta: tuple[float, float] = (1e-4, 2e-3),
    timesteps: int = 1000,
    conv_side: str = "input",
    batch_size: int = 32,
    max_images: int | None = 2000,
    max_rows_per_batch: int = 4096,
    seed: int = 0,
    overwrite: bool = False,
) -> CalibrationReport:
    """Calibrate the exported model at ``model_dir`` on the images under ``images``; write ``out``.

    Args:
        layers, beta, timesteps, conv_side: the DenoiseRep conversion (see ``convert``); beta_T is
            the strength knob.
        max_images: images used at most (spread over the sorted folder).
        max_rows_per_batch: feature vectors per layer and batch kept for the statistics.

    Raises:
        ModelFormatError: ``model_dir`` is not a loadable model; DenoiseRepError: bad settings, or a
        folder without readable images.
    """
    from training import denoiserep
    from training.denoiserep.calibration import calibrate

    loaded = load_model(model_dir, "cpu", runtime="torch")
    model = loaded.module
    model.requires_grad_(False)
    denoiserep.convert(model.backbone, layers=layers, beta=beta, timesteps=timesteps, conv_side=conv_side)
    prep = Preprocess.from_dict(loaded.meta["input"])
    paths = unlabelled_images(Path(images), max_images)
    skipped: list[str] = []
    generator = torch.Generator().manual_seed(seed)
    calibrate(
        model.backbone,
        _batches(paths, prep, batch_size, skipped),
        max_rows_per_batch=max_rows_per_batch,
        generator=generator,
    )
    described = denoiserep.describe(model.backbone)
    described["calibration"] = {"images": len(paths) - len(skipped), "skipped": len(skipped), "seed": seed}
    meta: dict[str, Any] = loaded.meta
    training = dict(meta.get("training") or {})
    training["calibrated_from"] = {"name": meta.get("name"), "weights_sha256": meta.get("weights_sha256")}
    path = export_model(
        model,
        out,
        kind=str(meta["kind"]),
        preprocess=prep,
        training=training,
        denoiserep=described,
        include_classifier=False,
        overwrite=overwrite,
        onnx=meta.get("onnx") is not None,
    )
    log.info(
        "calibrated %d layers on %d images -> %s", described["num_layers"], len(paths) - len(skipped), path
    )
    return CalibrationReport(path, len(paths) - len(skipped), len(skipped), described["weight_change"])
