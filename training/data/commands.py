"""`reid synth`: write a synthetic dataset in a real dataset's layout.

Foreseeable mistakes (a non-empty output folder, a layout that cannot hold the kind asked for,
sizes out of range) end as one ``error:`` line and exit code 1, never a traceback. The heavy
imports happen inside the command so that ``reid --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_LAYOUT_HELP = "market1501, dukemtmc, cuhk03, msmt17, veri776, vehicleid or folder"


def synth(
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (created; must be empty or a previous output).")
    ],
    layout: Annotated[
        str | None,
        typer.Option(help=f"Dataset layout: {_LAYOUT_HELP} (default: market1501, or veri776 for vehicles)."),
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help="person or vehicle (default: what the layout holds).")
    ] = None,
    ids: Annotated[int, typer.Option(help="Number of identities (half for training).")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of every random choice: same seed, same bytes.")] = 0,
    images_per_id: Annotated[int, typer.Option(help="Images of each identity (at least 4).")] = 12,
    cameras: Annotated[
        int | None, typer.Option(help="Number of cameras (default: the real dataset's).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Write into a non-empty folder that is not a previous output (deletes nothing)."
        ),
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Write a synthetic dataset (drawn pedestrians or vehicles) in a real dataset's on-disk layout."""
    from training.data.errors import DatasetError
    from training.data.registry import build_dataset
    from training.data.synthetic import write_synthetic

    if layout is None:
        layout = "veri776" if kind == "vehicle" else "market1501"
    try:
        root = write_synthetic(
            out,
            layout=layout,
            kind=kind,
            ids=ids,
            seed=seed,
            images_per_id=images_per_id,
            cameras=cameras,
            progress=progress,
            force=force,
        )
        # Read it back with the real parser: what the user will train on, in the usual table.
        options = {"manifest": "manifest.csv", "kind": kind or "person"} if layout == "folder" else {}
        summary = build_dataset(layout, root, **options).summary()
    except DatasetError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(summary)
    typer.echo(f"{layout} layout written to {root}")


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)
