"""Feature files for offline evaluation: ``.npz`` with ``features`` (n x d), ``pids`` and ``camids`` (n ints).

Reading validates everything a later step would otherwise trip over (missing arrays, lengths, NaN,
non-integer labels) and says in one line what is wrong, so the CLI never shows a traceback.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED_ARRAYS: tuple[str, ...] = ("features", "pids", "camids")


class FeatureFileError(ValueError):
    """A feature file that is missing, unreadable or not of the expected form."""


@dataclass(frozen=True)
class FeatureSet:
    """Features with their identities and cameras, one row per image."""

    features: np.ndarray
    pids: np.ndarray
    camids: np.ndarray

    def __len__(self) -> int:
        return int(self.features.shape[0])


def save_feature_file(path: str | Path, features: np.ndarray, pids: np.ndarray, camids: np.ndarray) -> Path:
    """Write a feature file (uncompressed ``.npz``), checked as :func:`load_feature_file` would check it."""
    path = Path(path)
    fs = _validate(path, np.asarray(features), np.asarray(pids), np.asarray(camids))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:  # a file object keeps numpy from appending ".npz" to other suffixes
        np.savez(fh, features=fs.features, pids=fs.pids, camids=fs.camids)
    return path


def load_feature_file(path: str | Path) -> FeatureSet:
    """Read and validate a feature file.

    Raises:
        FeatureFileError: the file is missing or unreadable, an array is missing, the lengths differ,
            the features are not a finite 2-D float array, or the labels are not integers.
    """
    path = Path(path)
    if not path.is_file():
        raise FeatureFileError(f"{path}: no such feature file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in REQUIRED_ARRAYS if name not in data.files]
            if missing:
                raise FeatureFileError(
                    f"{path}: missing array(s) {', '.join(missing)}; a feature file holds "
                    f"{', '.join(REQUIRED_ARRAYS)} (found: {', '.join(data.files) or 'none'})"
                )
            arrays = {name: data[name] for name in REQUIRED_ARRAYS}
    except FeatureFileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise FeatureFileError(f"{path}: not a readable .npz feature file ({err})") from None
    return _validate(path, arrays["features"], arrays["pids"], arrays["camids"])


def _validate(path: Path, features: np.ndarray, pids: np.ndarray, camids: np.ndarray) -> FeatureSet:
    if features.ndim != 2:
        raise FeatureFileError(f"{path}: 'features' must be 2-D (n, d), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise FeatureFileError(f"{path}: 'features' must be floating point, got {features.dtype}")
    n = features.shape[0]
    if n == 0 or features.shape[1] == 0:
        raise FeatureFileError(f"{path}: 'features' is empty (shape {features.shape})")
    for name, labels in (("pids", pids), ("camids", camids)):
        if labels.ndim != 1 or labels.shape[0] != n:
            raise FeatureFileError(
                f"{path}: '{name}' must have one entry per feature row ({n}), got shape {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise FeatureFileError(f"{path}: '{name}' must be integers, got {labels.dtype}")
    bad = ~np.isfinite(features).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise FeatureFileError(
            f"{path}: 'features' has NaN or infinite values in {rows.size} row(s) (first: row {rows[0]}); "
            "re-extract the features"
        )
    return FeatureSet(features=features, pids=pids.astype(np.int64), camids=camids.astype(np.int64))
