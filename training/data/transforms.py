"""Image transforms for re-identification: the test-time transform and the reID training augmentation.

The test-time transform is defined once here. Its settings (:class:`Preprocess`) are saved in the
exported ``model.json`` and :func:`training.export.load_model` rebuilds the very same transform, so
the service preprocesses exactly as evaluation during training did.

The training augmentation is the "bag of tricks" recipe (Luo et al., 2019): resize, random horizontal
flip, zero padding + random crop back to size, then normalisation and random erasing. The random
choices come from torch's global generator, which the DataLoader seeds per worker from its own
generator, so a run is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "Augmentation",
    "Preprocess",
    "build_test_transform",
    "build_train_transform",
    "preprocess_for_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS: dict[str, InterpolationMode] = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "lanczos": InterpolationMode.LANCZOS,
}


def _interpolation(name: str) -> InterpolationMode:
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {name!r}: expected one of {', '.join(sorted(INTERPOLATIONS))}"
        ) from None


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input at test time: RGB, resize, scale to [0, 1], normalise.

    Args:
        size: (height, width) of the model input.
        interpolation: resize filter, one of ``nearest``, ``bilinear``, ``bicubic``, ``lanczos``.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by after subtracting the mean.
    """

    size: tuple[int, int] = (256, 128)
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"input size must be two positive integers (height, width), got {self.size!r}")
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need three values (RGB): mean={self.mean!r}, std={self.std!r}")
        if min(std) <= 0:
            raise ValueError(f"std values must be positive, got {self.std!r}")
        _interpolation(self.interpolation)
        # Frozen dataclass: normalise lists from JSON/YAML to tuples so equality and hashing work.
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    def to_dict(self) -> dict[str, Any]:
        """The ``input`` section of ``model.json``."""
        return {
            "size": list(self.size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict`; missing keys take the defaults."""
        known = {"size", "interpolation", "mean", "std"}
        return cls(**{k: data[k] for k in known if k in data})


class _ToRGB:
    """Converts any PIL mode (L, RGBA, P, CMYK) to RGB; reID models are trained on RGB crops."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_test_transform(preprocess: Preprocess) -> T.Compose:
    """The deterministic test-time transform: PIL image -> CHW float32 tensor (on CPU)."""
    return T.Compose(
        [
            _ToRGB(),
            T.Resize(preprocess.size, interpolation=_interpolation(preprocess.interpolation), antialias=True),
            T.ToTensor(),
            T.Normalize(mean=preprocess.mean, std=preprocess.std),
        ]
    )


@dataclass(frozen=True)
class Augmentation:
    """Settings of the reID training augmentation (bag-of-tricks defaults).

    Args:
        flip_prob: probability of a horizontal flip.
        pad: zero padding in pixels on every side before the random crop back to the input size
            (0 disables padding and cropping).
        erasing_prob: probability of random erasing (Zhong et al., 2020) on the normalised tensor.
        erasing_scale: range of the erased area as a fraction of the image.
        erasing_ratio: range of the erased rectangle's aspect ratio.
    """

    flip_prob: float = 0.5
    pad: int = 10
    erasing_prob: float = 0.5
    erasing_scale: tuple[float, float] = (0.02, 0.4)
    erasing_ratio: tuple[float, float] = (0.3, 3.3)

    def __post_init__(self) -> None:
        for name in ("flip_prob", "erasing_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation {name} must lie in [0, 1], got {value}")
        if self.pad < 0:
            raise ValueError(f"augmentation pad must be >= 0, got {self.pad}")


def build_train_transform(preprocess: Preprocess, augmentation: Augmentation | None = None) -> T.Compose:
    """The training transform: resize, flip, pad + random crop, to tensor, normalise, random erasing.

    Normalisation is the model's (``preprocess.mean``/``std``), and the erased region is filled with
    zeros *after* normalisation, i.e. with the mean pixel, as in the bag-of-tricks recipe.
    """
    aug = augmentation or Augmentation()
    steps: list[Any] = [
        _ToRGB(),
        T.Resize(preprocess.size, interpolation=_interpolation(preprocess.interpolation), antialias=True),
    ]
    if aug.flip_prob > 0:
        steps.append(T.RandomHorizontalFlip(p=aug.flip_prob))
    if aug.pad > 0:
        steps += [T.Pad(aug.pad, fill=0), T.RandomCrop(preprocess.size)]
    steps += [T.ToTensor(), T.Normalize(mean=preprocess.mean, std=preprocess.std)]
    if aug.erasing_prob > 0:
        steps.append(
            T.RandomErasing(p=aug.erasing_prob, scale=aug.erasing_scale, ratio=aug.erasing_ratio, value=0)
        )
    return T.Compose(steps)


def preprocess_for_backbone(
    pretrained_cfg: Mapping[str, Any] | None, size: Sequence[int], interpolation: str | None = None
) -> Preprocess:
    """Normalisation and filter of a timm backbone's pretrained config, at the reID input size.

    Backbones trained with other statistics (e.g. ViT augreg: mean 0.5) must be fed the same ones,
    so the defaults come from the timm config rather than being hard-coded to ImageNet's.
    """
    cfg = dict(pretrained_cfg or {})
    return Preprocess(
        size=(int(size[0]), int(size[1])),
        interpolation=interpolation or cfg.get("interpolation") or "bicubic",
        mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
        std=tuple(cfg.get("std") or IMAGENET_STD),
    )
