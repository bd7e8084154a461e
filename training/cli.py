"""Registers the training package's `reid` subcommands (see reid_cli)."""

from __future__ import annotations

import importlib

import typer

# Each module defines register(app); kept separate so that one file owns one group of commands.
_COMMAND_MODULES = ("training.data.commands", "training.commands")


def register(app: typer.Typer) -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(app)
