"""Server-side dataset folders for jobs, confined to the configured ``dataset_roots``.

A client names a folder on the server; the service reads it only when the folder, with every
symbolic link resolved, lies inside one of the roots the operator allowed. ``..`` components are
refused outright, and each image a dataset lists is checked again (a CSV manifest or a symbolic
link inside an allowed folder must not lead outside it).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from training.data.registry import build_dataset

logger = logging.getLogger(__name__)


class DatasetPathForbiddenError(PermissionError):
    """The folder lies outside the allowed dataset roots (or no roots are configured)."""


class DatasetPathInvalidError(ValueError):
    """The folder does not exist or is not a folder."""


def resolve_dataset_root(root: str, allowed_roots: Sequence[Path]) -> Path:
    """The real path of ``root`` after checking it lies inside an allowed root.

    Relative paths are taken relative to the first allowed root.

    Raises:
        DatasetPathForbiddenError: no roots configured, a ``..`` component, or outside every root.
        DatasetPathInvalidError: the folder does not exist.
    """
    if not allowed_roots:
        raise DatasetPathForbiddenError(
            "this service reads no server-side folders: start it with --dataset-root DIR "
            "(or REID_DATASET_ROOTS) to allow jobs to read DIR"
        )
    if ".." in PurePath(root).parts:
        raise DatasetPathForbiddenError(
            f"dataset path {root!r} contains '..'; give a path inside a dataset root"
        )
    real_roots = [Path(r).expanduser().resolve() for r in allowed_roots]
    candidate = Path(root).expanduser()
    if not candidate.is_absolute():
        candidate = real_roots[0] / candidate
    real = candidate.resolve()
    if not any(real == r or real.is_relative_to(r) for r in real_roots):
        raise DatasetPathForbiddenError(
            f"dataset path {root!r} is outside the allowed dataset roots "
            f"({', '.join(str(r) for r in allowed_roots)})"
        )
    if not real.is_dir():
        raise DatasetPathInvalidError(f"dataset path {root!r} is not an existing folder on the server")
    return real


def inside_roots(path: str | Path, allowed_roots: Sequence[Path]) -> bool:
    """Whether ``path`` (symbolic links resolved) lies inside one of the allowed roots."""
    real = Path(path).resolve()
    return any(real.is_relative_to(Path(r).expanduser().resolve()) for r in allowed_roots)


@dataclass(frozen=True)
class SourceImage:
    """One image a job reads, with the labels its dataset gives it."""

    path: str
    identity: str | None
    camera: str | None
    captured_at: dt.datetime | None


def load_source_images(source: dict[str, Any], allowed_roots: Sequence[Path]) -> list[SourceImage]:
    """The images of an ingestion source ``{"layout", "root", "split", "options"}``, in dataset order.

    Raises:
        DatasetPathForbiddenError, DatasetPathInvalidError, training.data.errors.DatasetError.
    """
    root = resolve_dataset_root(source["root"], allowed_roots)
    dataset = build_dataset(source["layout"], root, **(source.get("options") or {}))
    split = source.get("split") or "gallery"
    images = []
    for sample in dataset.split(split):
        attrs = sample.attrs or {}
        captured = attrs.get("captured_at")
        # Layouts with names of their own (folder, CSV manifest) keep them in attrs; the others
        # are known by the dataset's numbers.
        identity, camera = attrs.get("identity"), attrs.get("camera")
        images.append(
            SourceImage(
                path=str(sample.path),
                identity=str(sample.pid if identity is None else identity),
                camera=str(sample.camid if camera is None else camera),
                captured_at=dt.datetime.fromtimestamp(float(captured), dt.UTC)
                if captured is not None
                else None,
            )
        )
    return images


def count_dataset_images(
    layout: str, root: str, options: dict[str, Any], splits: tuple[str, ...], allowed_roots: list[Path]
) -> int | None:
    """Images of ``splits`` in a server-side dataset, or None when it cannot be read yet.

    Used at job creation to refuse a job larger than the service allows; a dataset that does not
    parse is left to the job, which reports the parser's message as its error.
    """
    try:
        real = resolve_dataset_root(root, allowed_roots)
        dataset = build_dataset(layout, real, **(options or {}))
        return sum(len(dataset.split(s)) for s in splits)
    except Exception as exc:  # the job will fail with the same error, and say so
        logger.debug("dataset %s at %s not counted at job creation: %s", layout, root, exc)
        return None
