"""Training checkpoints: atomic writes, safe loading, exact resume, architecture checks.

A checkpoint is a dict saved with ``torch.save`` and read back with ``weights_only=True`` (no
arbitrary code runs on load), so it holds only tensors and plain Python data: the model, optimiser,
LR schedule and AMP scaler states, every RNG state (Python, NumPy, torch CPU and CUDA), the epoch and
DenoiseRep phase, the resolved config, the label map and the best evaluation so far. A run directory
keeps ``last.pt`` (after every epoch) and ``best.pt`` (best mAP so far).
"""

from __future__ import annotations

import logging
import os
import random
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from training.model import ReIDModel

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "LAST_NAME",
    "CheckpointError",
    "capture_rng_state",
    "check_architecture",
    "convert_backbone",
    "load_checkpoint",
    "model_from_checkpoint",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "reid-training-checkpoint"
CHECKPOINT_VERSION = 1
LAST_NAME = "last.pt"
BEST_NAME = "best.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, of another format, or does not fit the requested model."""


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Writes ``payload`` atomically: a temp file in the same directory, fsync, then rename.

    A crash while saving leaves the previous checkpoint intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint file, or the one a run directory holds: ``best.pt`` if present, else ``last.pt``.

    Raises:
        CheckpointError: nothing usable at ``source``.
    """
    source = Path(source)
    if source.is_file():
        return source
    if source.is_dir():
        for name in (BEST_NAME, LAST_NAME):
            if (source / name).is_file():
                return source / name
        raise CheckpointError(
            f"run directory {source} has no {BEST_NAME} or {LAST_NAME}; pass a finished `reid train` "
            "run directory or a checkpoint file"
        )
    raise CheckpointError(f"checkpoint {source} does not exist; pass a run directory or a .pt file")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a training checkpoint safely (``weights_only=True``) and checks its format.

    Raises:
        CheckpointError: a missing, corrupt or foreign file.
    """
    path = resolve_checkpoint(path)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean "not a readable checkpoint"
        raise CheckpointError(
            f"{path} is not a readable training checkpoint ({type(exc).__name__}: {exc}); it may be "
            "truncated or from another program"
        ) from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not a `reid train` checkpoint (no {CHECKPOINT_FORMAT!r} marker); for raw backbone "
            "weights use --pretrained instead"
        )
    if data.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {data.get('version')!r}; this code reads version "
            f"{CHECKPOINT_VERSION}"
        )
    return data


def check_architecture(checkpoint: Mapping[str, Any], backbone: str, kwargs: Mapping[str, Any]) -> None:
    """Refuses a checkpoint trained with another backbone or other backbone kwargs.

    Raises:
        CheckpointError: naming both architectures and what to do.
    """
    arch = checkpoint.get("architecture") or {}
    saved_backbone, saved_kwargs = arch.get("backbone"), dict(arch.get("kwargs") or {})
    # img_size is derived from the input size, not chosen in model.kwargs; the checkpoint's wins.
    wanted = {k: v for k, v in dict(kwargs).items() if k != "img_size"}
    saved = {k: v for k, v in saved_kwargs.items() if k != "img_size"}
    if saved_backbone != backbone or _norm(saved) != _norm(wanted):
        raise CheckpointError(
            f"the checkpoint was trained with backbone {saved_backbone!r} {saved_kwargs}, but this run "
            f"asks for {backbone!r} {dict(kwargs)}; drop --backbone/model settings to use the checkpoint's "
            "architecture, or start from a matching checkpoint"
        )


def _norm(value: Any) -> Any:
    # Tuples from configs and lists from checkpoints describe the same kwargs.
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_norm(v) for v in value]
    return value


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning(
                "checkpoint saved %d CUDA RNG states, this machine has %d GPUs: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def convert_backbone(backbone: nn.Module, settings: Mapping[str, Any]) -> None:
    """Applies DenoiseRep ``convert`` with the settings a checkpoint or config records."""
    from training import denoiserep

    denoiserep.convert(
        backbone,
        layers=settings["layers"],
        schedule=settings["schedule"],
        timesteps=int(settings["timesteps"]),
        beta=tuple(settings["beta"]),
        # Checkpoints written before the input-side conv form had their denoisers on the output.
        conv_side=settings.get("conv_side", "output"),
    )


def model_from_checkpoint(checkpoint: Mapping[str, Any], *, with_classifier: bool = True) -> ReIDModel:
    """Rebuilds the trained model of a checkpoint (converted again when it was a DenoiseRep model).

    Raises:
        CheckpointError: the backbone is unknown or the weights do not fit the recorded architecture.
    """
    from training.model import ReIDModel, UnknownBackboneError

    arch = checkpoint.get("architecture") or {}
    if "backbone" not in arch or "model" not in checkpoint:
        raise CheckpointError("the checkpoint records no architecture or weights; it is not a training run's")
    try:
        model = ReIDModel(
            arch["backbone"],
            num_classes=int(arch.get("num_classes", 0)),
            img_size=None,
            embedding=arch.get("embedding", "bn"),
            backbone_kwargs=arch.get("kwargs") or {},
        )
    except UnknownBackboneError as exc:
        raise CheckpointError(f"the checkpoint's backbone cannot be built: {exc}") from exc
    if checkpoint.get("denoiserep"):
        convert_backbone(model.backbone, checkpoint["denoiserep"])
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit architecture {arch}: {exc}") from exc
    if not with_classifier:
        model.classifier, model.num_classes = None, 0
    return model
