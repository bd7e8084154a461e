"""CUHK03-NP (the "new protocol" split of CUHK03): Market-style folders per variant."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from training.data.errors import DatasetError
from training.data.market1501 import MarketStyleParser
from training.data.registry import register_dataset

VARIANTS = ("detected", "labeled")

_CUHK03_NAME = re.compile(r"^(-?\d+)_c(\d+)_(\d+)\.(?:png|jpe?g)$", re.IGNORECASE)


def parse_cuhk03_name(name: str) -> tuple[int, int, dict[str, Any]] | None:
    """``PPPP_cC_NN.png`` -> (pid, 0-based camera, {index}); None if malformed."""
    match = _CUHK03_NAME.match(name)
    if match is None:
        return None
    pid, cam, index = (int(g) for g in match.groups())
    if cam < 1:
        return None
    return pid, cam - 1, {"index": index}


def format_cuhk03_name(pid: int, cam: int, index: int) -> str:
    """Inverse of :func:`parse_cuhk03_name` (``cam`` 0-based)."""
    return f"{pid:04d}_c{cam + 1}_{index}.png"


@register_dataset("cuhk03", kind="person", aliases=("cuhk03np",))
class CUHK03NP(MarketStyleParser):
    """CUHK03-NP (Li et al., CVPR 2014; new protocol of Zhong et al., CVPR 2017).

    Layout: ``detected/`` and ``labeled/`` (the two ways the boxes were drawn), each with
    ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` of PNG files named
    ``PPPP_cC_NN.png`` (identity, camera 1-2 of the identity's camera pair, image index). The root
    may be the ``cuhk03-np/`` folder, its parent, or one variant folder itself. Cameras 0-based.

    Args:
        variant: ``detected`` (default, as torchreid) or ``labeled``.

    Published sizes: detected 7,365 train / 1,400 query / 5,332 gallery; labeled 7,368 / 1,400 /
    5,328 (767 training and 700 test identities).
    """

    display_name = "CUHK03-NP"
    grammar = "PPPP_cC_NN.png"
    example = "0001_c1_1.png"
    extension = "png"
    published_by_variant: ClassVar[dict[str, dict[str, int]]] = {
        "detected": {"train": 7365, "query": 1400, "gallery": 5332},
        "labeled": {"train": 7368, "query": 1400, "gallery": 5328},
    }

    def __init__(self, root: str | Path, *, variant: str = "detected", strict: bool = False) -> None:
        super().__init__(root, strict=strict)
        if variant not in VARIANTS:
            raise DatasetError(f"CUHK03-NP variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        self.variant = variant
        self.display_name = f"CUHK03-NP ({variant})"

    def layout_wrappers(self) -> tuple[str, ...]:
        return (self.variant, f"cuhk03-np/{self.variant}", f"cuhk03_np/{self.variant}")

    def published_sizes(self) -> dict[str, int]:
        return self.published_by_variant[self.variant]

    def parse_name(self, name: str) -> tuple[int, int, dict[str, Any]] | None:
        return parse_cuhk03_name(name)
