"""`reid evaluate-features`: offline evaluation of stored features (.npz with features, pids, camids)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

_METRICS = "cosine|euclidean|sqeuclidean"


def evaluate_features_command(
    gallery: Annotated[
        Path | None,
        typer.Option("--gallery", "-g", help="Gallery .npz (for --protocol vehicleid: the whole test set)."),
    ] = None,
    query: Annotated[
        Path | None, typer.Option("--query", "-q", help="Query .npz (market1501 protocol only).")
    ] = None,
    metric: Annotated[str, typer.Option(help=f"Distance: {_METRICS}.")] = "cosine",
    protocol: Annotated[str, typer.Option(help="market1501 (same-camera rule) or vehicleid.")] = "market1501",
    test_size: Annotated[
        int | None,
        typer.Option(help="vehicleid: identities per trial (800/1600/2400); default: all in the file."),
    ] = None,
    trials: Annotated[int, typer.Option(help="vehicleid: number of random gallery draws.")] = 10,
    seed: Annotated[int, typer.Option(help="vehicleid: seed of the draws.")] = 0,
    rerank: Annotated[
        bool, typer.Option("--rerank", help="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3).")
    ] = False,
    ap_mode: Annotated[
        str, typer.Option(help="standard (torchreid/fast-reid) or devkit (Market-1501 devkit).")
    ] = "standard",
    max_rank: Annotated[int, typer.Option(help="Length of the CMC curve.")] = 50,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1... (default: cuda when available).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Evaluate stored features: mAP, CMC and mINP under the Market-1501 or VehicleID protocol."""
    from evaluation.distance import DistanceError
    from evaluation.feature_file import FeatureFileError, load_feature_file
    from evaluation.metrics import EvaluationError, evaluate_features, format_table, vehicleid_protocol
    from evaluation.rerank import RerankError, RerankMemoryError

    try:
        if gallery is None:
            raise EvaluationError("--gallery is required (for --protocol vehicleid: the whole test set)")
        if protocol == "vehicleid":
            if query is not None:
                raise EvaluationError(
                    "--protocol vehicleid draws query and gallery itself: give the whole test set as "
                    "--gallery and no --query"
                )
            g = load_feature_file(gallery)
            result = vehicleid_protocol(
                g.features, g.pids, g.camids, trials=trials, seed=seed, test_size=test_size, metric=metric,
                rerank=rerank, ap_mode=ap_mode, device=device, max_rank=max_rank,
            )
        else:
            if query is None:
                raise EvaluationError(f"--query is required with --protocol {protocol}")
            if test_size is not None:
                raise EvaluationError("--test-size applies to --protocol vehicleid only")
            q = load_feature_file(query)
            g = load_feature_file(gallery)
            result = evaluate_features(
                q.features, g.features, q.pids, g.pids, q.camids, g.camids, metric=metric, rerank=rerank,
                ap_mode=ap_mode, max_rank=max_rank, device=device, protocol=protocol,
            )
    except (FeatureFileError, EvaluationError, DistanceError, RerankError, RerankMemoryError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(json.dumps(result) if as_json else format_table(result))


def register(app: typer.Typer) -> None:
    app.command("evaluate-features")(evaluate_features_command)
