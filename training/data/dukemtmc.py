"""DukeMTMC-reID: Market-style folders, file names ``PPPP_cC_fFFFFFFF.jpg``."""

from __future__ import annotations

import re
from typing import Any, ClassVar

from training.data.market1501 import MarketStyleParser
from training.data.registry import register_dataset

_DUKE_NAME = re.compile(r"^(-?\d+)_c(\d+)_f(\d+)\.jpe?g$", re.IGNORECASE)


def parse_duke_name(name: str) -> tuple[int, int, dict[str, Any]] | None:
    """``PPPP_cC_fFFFFFFF.jpg`` -> (pid, 0-based camera, {frame}); None if malformed."""
    match = _DUKE_NAME.match(name)
    if match is None:
        return None
    pid, cam, frame = (int(g) for g in match.groups())
    if cam < 1:
        return None
    return pid, cam - 1, {"frame": frame}


def format_duke_name(pid: int, cam: int, frame: int) -> str:
    """Inverse of :func:`parse_duke_name` (``cam`` 0-based)."""
    return f"{pid:04d}_c{cam + 1}_f{frame:07d}.jpg"


@register_dataset("dukemtmc", kind="person", aliases=("dukemtmcreid", "duke"))
class DukeMTMCreID(MarketStyleParser):
    """DukeMTMC-reID (Ristani et al., ECCVW 2016; Zheng et al., ICCV 2017 re-id split).

    Layout: ``bounding_box_train/``, ``query/``, ``bounding_box_test/`` under the root or inside
    ``DukeMTMC-reID/``. File names ``PPPP_cC_fFFFFFFF.jpg`` (identity, camera 1-8, frame). The
    gallery's 408 distractor identities carry ordinary numbers and are kept. Cameras 0-based.

    Published sizes: 16,522 train images (702 ids), 2,228 query (702 ids), 17,661 gallery (1,110 ids).
    """

    display_name = "DukeMTMC-reID"
    grammar = "PPPP_cC_fFFFFFFF.jpg"
    example = "0001_c2_f0046182.jpg"
    wrappers = ("DukeMTMC-reID",)
    published: ClassVar[dict[str, int]] = {"train": 16522, "query": 2228, "gallery": 17661}

    def parse_name(self, name: str) -> tuple[int, int, dict[str, Any]] | None:
        return parse_duke_name(name)
