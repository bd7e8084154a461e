"""What every benchmark times with: device synchronisation and latency percentiles.

A CUDA call returns before the work is done, so a wall-clock time is only what a caller waits
after :func:`synchronize`; percentiles are reported in milliseconds under one set of names
(``p50_ms``, ``p95_ms``...) so the results files of every benchmark read alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def synchronize(device: str | torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(
    seconds: Sequence[float], *, percentiles: Sequence[int] = (50, 95, 99), digits: int = 2
) -> dict[str, float | None]:
    """``p{q}_ms`` for each percentile, ``mean_ms`` and ``max_ms`` of ``seconds``; None when empty."""
    names = [f"p{q}_ms" for q in percentiles] + ["mean_ms", "max_ms"]
    if len(seconds) == 0:
        return dict.fromkeys(names)
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    values = [*np.percentile(ms, list(percentiles)), ms.mean(), ms.max()]
    return {name: round(float(v), digits) for name, v in zip(names, values, strict=True)}
