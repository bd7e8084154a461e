"""The `reid` command: one Typer app whose subcommands each package contributes.

Packages register through the ``reid.commands`` entry-point group (see pyproject.toml), so
``training`` never imports ``service`` and ``reid --help`` stays fast: each command imports
its heavy dependencies only when it runs.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points

import typer

# No network at run time: timm and huggingface_hub must never try to download weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

app = typer.Typer(
    name="reid",
    help="Person and vehicle re-identification: train (DenoiseRep), export, evaluate, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load_commands() -> None:
    for ep in sorted(entry_points(group="reid.commands"), key=lambda e: e.name):
        ep.load()(app)


def main() -> None:
    _load_commands()
    app()


if __name__ == "__main__":
    main()
