"""Server-side dataset folders for jobs, confined to the configured ``dataset_roots``.

A client names a folder on the server; the service reads it only when the folder, with every
symbolic link resolved, lies inside one of the roots the operator allowed. ``..`` components and
``~`` (which would reveal which users exist) are refused outright; every path-valued layout option
(the ``folder`` layout's ``manifest``) is confined the same way, relative to the dataset folder; the
options themselves must be ones the layout knows; and each image a dataset lists is checked again
(a CSV manifest or a symbolic link inside an allowed folder must not lead outside it), for
ingestion and evaluation alike. Messages name paths as the client gave them or relative to a root
(:func:`relative_message`), never the server's absolute paths, and never a file's contents.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from training.data.registry import build_dataset


class DatasetPathForbiddenError(PermissionError):
    """The folder lies outside the allowed dataset roots (or no roots are configured)."""


class DatasetPathInvalidError(ValueError):
    """The folder does not exist or is not a folder."""


class DatasetOptionsError(ValueError):
    """An option the layout does not know, or a path-valued option that is not a usable file."""


#: Layout options whose value is a path on the server (confined like the dataset folder itself).
PATH_OPTIONS = frozenset({"manifest"})


def _refuse_client_path(path: str, what: str) -> None:
    if ".." in PurePath(path).parts:
        raise DatasetPathForbiddenError(f"{what} {path!r} contains '..'; give a path inside a dataset root")
    if path.startswith("~"):
        raise DatasetPathForbiddenError(
            f"{what} {path!r} starts with '~'; home folders are not expanded: "
            "give a path inside a dataset root"
        )


def _real_roots(allowed_roots: Sequence[Path]) -> list[Path]:
    return [Path(r).expanduser().resolve() for r in allowed_roots]


def relative_message(message: str, allowed_roots: Sequence[Path]) -> str:
    """``message`` with every allowed root's absolute path replaced by a path relative to it.

    Dataset parsers name the files they read in full; a client must learn neither the server's
    folder layout nor where the operator keeps the roots.
    """
    roots = sorted({str(r) for r in _real_roots(allowed_roots)} | {str(r) for r in allowed_roots}, key=len)
    for root in reversed(roots):  # longest first: a root inside another root
        message = message.replace(root + "/", "").replace(root, ".")
    return message


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
    _refuse_client_path(root, "dataset path")
    real_roots = _real_roots(allowed_roots)
    candidate = Path(root)
    if not candidate.is_absolute():
        candidate = real_roots[0] / candidate
    real = candidate.resolve()
    if not any(real == r or real.is_relative_to(r) for r in real_roots):
        raise DatasetPathForbiddenError(
            f"dataset path {root!r} is outside the allowed dataset roots "
            "(a relative path is taken inside the first root)"
        )
    if not real.is_dir():
        raise DatasetPathInvalidError(f"dataset path {root!r} is not an existing folder on the server")
    return real


def inside_roots(path: str | Path, allowed_roots: Sequence[Path]) -> bool:
    """Whether ``path`` (symbolic links resolved) lies inside one of the allowed roots."""
    real = Path(path).resolve()
    return any(real.is_relative_to(r) for r in _real_roots(allowed_roots))


def confined_options(
    layout: str, options: dict[str, Any] | None, root: Path, allowed_roots: Sequence[Path]
) -> dict[str, Any]:
    """The layout ``options`` checked: known names only, path options confined and made real.

    A path option is taken relative to the dataset folder ``root`` (an absolute one must lie inside
    a root too) and must name an existing file; the message never says more about a path outside
    the roots than that it is not allowed (not whether it exists).

    Raises:
        DatasetOptionsError: an unknown option, or a path option that is not an existing file.
        DatasetPathForbiddenError: a path option outside the roots, or with '..' / '~'.
    """
    from training.data.registry import dataset_options

    options = dict(options or {})
    known = dataset_options(layout)
    unknown = sorted(set(options) - set(known))
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise DatasetOptionsError(
            f"layout {layout!r} has no option {', '.join(map(repr, unknown))}; its options are: {allowed}"
        )
    for name in sorted(PATH_OPTIONS & set(options)):
        value = options[name]
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise DatasetOptionsError(f"option {name!r} must be a file path inside the dataset folder")
        _refuse_client_path(value, f"option {name!r}")
        candidate = Path(value) if Path(value).is_absolute() else root / value
        real = candidate.resolve()
        if not inside_roots(real, allowed_roots):
            raise DatasetPathForbiddenError(f"option {name!r} names a file outside the allowed dataset roots")
        if not real.is_file():
            raise DatasetOptionsError(
                f"option {name!r}: {value!r} is not an existing file in the dataset folder"
            )
        options[name] = str(real)
    return options


def open_dataset(
    layout: str, root: str, options: dict[str, Any] | None, allowed_roots: Sequence[Path]
) -> Any:
    """Parse a client-named server-side dataset, with every path it names confined to the roots.

    Raises:
        DatasetPathForbiddenError: the folder, a path option or any image the dataset lists lies
            outside the roots. DatasetPathInvalidError, DatasetOptionsError,
            training.data.errors.DatasetError: see above and the parsers.
    """
    real = resolve_dataset_root(root, allowed_roots)
    dataset = build_dataset(layout, real, **confined_options(layout, options, real, allowed_roots))
    outside = sum(
        1
        for split in (dataset.train, dataset.query, dataset.gallery)
        for s in split
        if not inside_roots(s.path, allowed_roots)
    )
    if outside:
        raise DatasetPathForbiddenError(
            f"{outside} image(s) the dataset lists lie outside the allowed dataset roots; "
            "a manifest or a symbolic link may only name images inside them"
        )
    return dataset


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
    dataset = open_dataset(source["layout"], source["root"], source.get("options"), allowed_roots)
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
) -> int:
    """Images of ``splits`` in a server-side dataset, read at job creation.

    A job larger than the service allows is refused before it is queued, and a dataset that does
    not parse, or names paths outside the roots, is refused at once with the parser's message
    rather than as a job that fails later.

    Raises:
        the errors of :func:`open_dataset`.
    """
    dataset = open_dataset(layout, root, options, allowed_roots)
    return sum(len(dataset.split(s)) for s in splits)
