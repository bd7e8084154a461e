"""`reid evaluate-features`: offline evaluation of stored features."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
