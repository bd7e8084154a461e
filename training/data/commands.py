"""`reid synth`: write a synthetic dataset in a real dataset's layout."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
