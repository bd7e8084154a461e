"""A torch ``Dataset`` over re-identification samples that survives unreadable images.

Real datasets contain the odd truncated or zero-byte JPEG. Crashing a multi-hour run on one of them
is worse than skipping it, but skipping silently hides data problems, so an unreadable training
image is replaced by another image of the *same identity* (the PK batch keeps its shape and
labels) and reported in the returned item; the training loop counts and logs the skipped files.
Evaluation uses :class:`EvalImageDataset`, which marks unreadable images so the caller drops them
from the query/gallery lists and reports how many.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from training.data.dataset import Sample
from training.data.errors import DatasetError

__all__ = [
    "EvalImageDataset",
    "TrainImageDataset",
    "UnreadableIdentityError",
    "collate_eval",
    "load_rgb",
    "relabel",
]

log = logging.getLogger(__name__)

# What PIL raises for truncated, corrupt or non-image files (and the OS for missing ones).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


class UnreadableIdentityError(DatasetError):
    """Every image of one training identity is unreadable, so there is nothing to substitute."""


def load_rgb(path: str) -> Image.Image:
    """Opens and fully decodes an image (errors surface here, not later in a transform), as RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def relabel(samples: Sequence[Sample]) -> dict[int, int]:
    """Maps the training identities to contiguous class indices 0..C-1 in sorted order."""
    return {pid: label for label, pid in enumerate(sorted({s.pid for s in samples}))}


class TrainImageDataset(Dataset):
    """Training samples -> dicts with ``image``, ``label``, ``camid``, ``index`` and ``skipped``.

    Args:
        samples: the training split.
        transform: PIL image -> tensor (the training augmentation).
        label_map: identity -> class index; default :func:`relabel` of ``samples``.

    ``skipped`` is the path of an unreadable image that was replaced by another image of the same
    identity ("" when the requested image was read).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], torch.Tensor],
        label_map: Mapping[int, int] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.label_map = dict(label_map) if label_map is not None else relabel(self.samples)
        self._by_pid: dict[int, list[int]] = defaultdict(list)
        for index, sample in enumerate(self.samples):
            self._by_pid[sample.pid].append(index)
        # Per process (each DataLoader worker keeps its own): known-bad indices are not retried.
        self._bad: set[int] = set()

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, index: int) -> Image.Image | None:
        if index in self._bad:
            return None
        try:
            return load_rgb(self.samples[index].path)
        except DECODE_ERRORS as exc:
            self._bad.add(index)
            log.warning("skipping unreadable training image %s (%s)", self.samples[index].path, exc)
            return None

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = self._read(index)
        skipped = ""
        if image is None:
            skipped = sample.path
            # Deterministic substitute: the next readable image of the same identity, cyclically.
            same = self._by_pid[sample.pid]
            start = same.index(index)
            for offset in range(1, len(same)):
                image = self._read(same[(start + offset) % len(same)])
                if image is not None:
                    break
            if image is None:
                raise UnreadableIdentityError(
                    f"all {len(same)} training images of identity {sample.pid} are unreadable "
                    f"(e.g. {sample.path}); fix or remove them"
                )
        return {
            "image": self.transform(image),
            "label": self.label_map[sample.pid],
            "camid": sample.camid,
            "index": index,
            "skipped": skipped,
        }


class EvalImageDataset(Dataset):
    """Query/gallery samples -> ``(tensor or None, index)``; ``None`` marks an unreadable image."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        try:
            image = load_rgb(self.samples[index].path)
        except DECODE_ERRORS as exc:
            log.warning("skipping unreadable evaluation image %s (%s)", self.samples[index].path, exc)
            return None, index
        return self.transform(image), index


def collate_eval(
    items: Sequence[tuple[torch.Tensor | None, int]],
) -> tuple[torch.Tensor | None, list[int], int]:
    """Batches readable images: (NCHW tensor or None, their dataset indices, number dropped)."""
    kept = [(t, i) for t, i in items if t is not None]
    dropped = len(items) - len(kept)
    if not kept:
        return None, [], dropped
    return torch.stack([t for t, _ in kept]), [i for _, i in kept], dropped
