"""``python -m training``: the training commands without the rest of ``reid`` (what torchrun runs).

Example: ``torchrun --nproc-per-node 2 -m training train --config configs/tiny_cpu.yaml --out runs/x``.
"""

from __future__ import annotations

import logging
import os

import typer

from training.commands import register

os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(
    name="training",
    help="Train, export and evaluate re-identification models (the `reid` training commands).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
    )


register(app)

if __name__ == "__main__":
    app()
