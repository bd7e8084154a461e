"""TensorBoard as an optional training-log sink beside ``metrics.jsonl`` (``train.tensorboard: true``).

Every numeric field of an epoch record goes to ``train/<field>`` at step = epoch, the fused model's
evaluation to ``eval/mAP`` and ``eval/rank1``: the same numbers as the JSONL line, so either file can
be read. View with ``tensorboard --logdir RUN/tensorboard``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: Sub-directory of the run directory that holds the event files.
TENSORBOARD_DIR = "tensorboard"


class TensorBoardUnavailableError(RuntimeError):
    """``train.tensorboard`` is on but the ``tensorboard`` package is not installed."""


class TensorBoardSink:
    """Writes epoch records as TensorBoard scalars under ``run_dir/tensorboard``."""

    def __init__(self, run_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise TensorBoardUnavailableError(
                "train.tensorboard is on but the tensorboard package is missing: "
                "pip install tensorboard (or the project's tensorboard extra), or set train.tensorboard=false"
            ) from exc
        self._writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD_DIR))

    def write(self, record: Mapping[str, Any]) -> None:
        """One epoch record (the dict written to ``metrics.jsonl``)."""
        epoch = int(record["epoch"])
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(f"train/{key}", value, epoch)
        evaluation = record.get("evaluation") or {}
        if "mAP" in evaluation:
            self._writer.add_scalar("eval/mAP", evaluation["mAP"], epoch)
            self._writer.add_scalar("eval/rank1", evaluation["cmc"]["1"], epoch)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
