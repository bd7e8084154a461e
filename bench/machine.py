"""What machine a benchmark ran on, and one way to write its results.

Every benchmark records this next to its numbers, so a figure is never read without knowing the
CPU/GPU, the software and the date that produced it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
import traceback
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model and count, GPU name (if torch sees one), library versions and the UTC date."""
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "gpu": None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        pass
    return info


def write_result(path: str | Path, name: str, figures: dict[str, Any]) -> Path:
    """Write one benchmark's figures with the machine description as pretty JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine_info(), "figures": figures}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def portable_traceback() -> str:
    """The current exception's traceback with this checkout's and Python's folders made relative.

    Results are committed: they must not carry the absolute paths of the machine that ran them.
    """
    text = traceback.format_exc()
    repo = str(Path(__file__).resolve().parent.parent) + "/"
    text = text.replace(repo, "")
    for prefix in sorted({sys.prefix, sys.base_prefix, sys.exec_prefix}, key=len, reverse=True):
        text = text.replace(prefix + "/", "<python>/")
    return text
