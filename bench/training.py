"""Training benchmark: step throughput with and without DenoiseRep.

Images per second of a full training step (forward, ID + triplet loss, plus the denoising loss when
converted, backward, SGD step) for the default backbones (``vit_small_patch16_224`` at 256x128 with
DenoiseRep on its MLP layers, ``resnet50`` at 256x128 with DenoiseRep on its convolutions),
random-init weights and random images. What DenoiseRep does to retrieval is measured by
``bench/denoiserep_study.py`` (same backbone budget, paired seeds, a size-matched control).

Run: ``python -m bench.training [--quick] [--device cpu|cuda] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.machine import write_result
from bench.timing import synchronize

log = logging.getLogger("bench.training")

DEFAULT_OUT = Path(__file__).parent / "results" / "training-cpu.json"


VARIANTS = (
    "plain",
    "joint",
    "backbone",
    "backbone-unfolded",
    "denoiser",
    "denoiser-rebuilt",
    "denoiser-4096-rows",
)
#: (loss rows, fused refresh) of the denoiser-phase variants; None: the trainer's default.
DENOISER_SETTINGS: dict[str, tuple[int | None, int | None]] = {
    "denoiser": (None, None),
    # The fused weights rebuilt every step (fused_refresh 1): what the reuse saves.
    "denoiser-rebuilt": (None, 1),
    # The defaults before issue 13's last change: 4096 rows per layer, rebuilt every step.
    "denoiser-4096-rows": (4096, 1),
}


def _step_throughput(
    backbone: str, variant: str, *, size: tuple[int, int], batch: int, steps: int, device: torch.device
) -> float:
    """Images/s of full training steps of one variant on random data (after one warm-up step).

    ``plain``: the unconverted model, ID + triplet. ``joint``: converted, task loss + 0.1 x the
    denoising loss, both optimisers step. ``backbone``: a backbone-phase step as the trainer runs
    it (denoisers frozen and folded into the weights, ``denoiserep.fold_backbone``);
    ``backbone-unfolded``: the same with the fused weights rebuilt every step. ``denoiser``: a
    denoiser-phase step as the trainer runs it (backbone under no_grad, the denoising loss alone on
    ``denoiserep.loss_rows`` rows per layer, fused weights reused for ``denoiserep.fused_refresh``
    steps, only the denoisers' Adam steps); ``denoiser-rebuilt`` and ``denoiser-4096-rows``: see
    :data:`DENOISER_SETTINGS`. A denoiser phase times whole refresh periods (every rebuild counted).
    """
    from training import denoiserep
    from training.config import DenoiseRepConfig
    from training.losses import ReIDLoss
    from training.model import ReIDModel

    torch.manual_seed(0)
    model = ReIDModel(backbone, num_classes=batch // 4, img_size=size).to(device).train()
    if variant != "plain":
        denoiserep.convert(model.backbone)
        # What the trainer does: the denoising loss on at most denoiserep.loss_rows rows per layer,
        # fused weights reused for denoiserep.fused_refresh denoiser-phase steps.
        defaults = DenoiseRepConfig()
        rows, refresh = DENOISER_SETTINGS.get(variant, (None, None))
        denoiserep.set_loss_rows(model.backbone, defaults.loss_rows if rows is None else rows)
        denoiserep.set_fused_refresh(model.backbone, defaults.fused_refresh if refresh is None else refresh)
        if variant in DENOISER_SETTINGS:
            variant = "denoiser"
            period = defaults.fused_refresh if refresh is None else refresh
            steps = period * -(-steps // period)  # the warm-up step built them; the last rebuilds
        phase = variant.removesuffix("-unfolded")
        denoiserep.set_phase(model.backbone, "joint" if variant == "joint" else phase)
        if variant == "backbone":
            denoiserep.fold(model.backbone)
        model.to(device)
    cnn_cuda = device.type == "cuda" and model.is_cnn
    if cnn_cuda:
        model.to(memory_format=torch.channels_last)
    denoisers = (
        {id(p) for p in denoiserep.denoiser_parameters(model.backbone)} if variant != "plain" else set()
    )
    backbone_params = [p for p in model.parameters() if p.requires_grad and id(p) not in denoisers]
    optimizers: list[torch.optim.Optimizer] = []
    if variant in ("plain", "joint", "backbone", "backbone-unfolded"):
        optimizers.append(torch.optim.SGD(backbone_params, lr=1e-3, momentum=0.9))
    if variant in ("joint", "denoiser"):
        optimizers.append(torch.optim.Adam(denoiserep.denoiser_parameters(model.backbone), lr=1e-3))
    loss_fn = ReIDLoss()
    x = torch.randn(batch, 3, *size, device=device)
    if cnn_cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch // 4, device=device).repeat_interleave(4)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        with amp:
            if variant == "denoiser":
                with torch.no_grad():
                    model(x)
                loss = denoiserep.denoise_loss(model.backbone)
            else:
                logits, feat, _ = model(x)
                loss = loss_fn(logits, feat, labels).total
                if variant == "joint":
                    loss = loss + 0.1 * denoiserep.denoise_loss(model.backbone)
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()

    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def _rss_bytes() -> int:
    """The process's resident set size now (Linux /proc), in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_variant(
    backbone: str, variant: str, size: tuple[int, int], batch: int, steps: int, device: str
) -> dict:
    """Throughput and peak training memory of one variant (run in its own process on a CPU).

    Memory: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the peak RSS above the RSS the
    process had before building the model (so imports do not dilute the ratio).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        torch.set_num_threads(1)
        before = _rss_bytes()
    ips = _step_throughput(backbone, variant, size=size, batch=batch, steps=steps, device=dev)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"images_per_s": ips, "peak_bytes": peak}


def _measure_isolated(
    backbone: str, variant: str, size: tuple[int, int], batch: int, steps: int, device: torch.device
) -> dict:
    if device.type == "cuda":
        return measure_variant(backbone, variant, size, batch, steps, str(device))
    # Peak RSS never goes down: each CPU variant gets a fresh process.
    args = json.dumps([backbone, variant, list(size), batch, steps, "cpu"])
    proc = subprocess.run(
        [sys.executable, "-m", "bench.training", "--child", args],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def throughput(quick: bool, device: torch.device) -> dict[str, Any]:
    """Training-step throughput and peak memory of the default backbones, plain and per DenoiseRep step."""
    cuda = device.type == "cuda"
    batch = 64 if cuda else (4 if quick else 8)
    steps = 20 if cuda else (1 if quick else 3)
    size = (128, 64) if quick else (256, 128)
    rows = []
    for backbone in ("vit_small_patch16_224", "resnet50"):
        measured = {v: _measure_isolated(backbone, v, size, batch, steps, device) for v in VARIANTS}
        plain = measured["plain"]
        # A 1:1 alternation's average step: one backbone-phase step and one denoiser-phase step.
        alternating_s = 0.5 * (
            1 / measured["backbone"]["images_per_s"] + 1 / measured["denoiser"]["images_per_s"]
        )
        row = {
            "backbone": backbone,
            "input": list(size),
            "batch": batch,
            "steps": steps,
            "precision": "bf16 autocast" if cuda else "fp32, 1 thread",
            "images_per_s": {v: round(m["images_per_s"], 2) for v, m in measured.items()},
            "peak_mb": {v: round(m["peak_bytes"] / 2**20, 1) for v, m in measured.items()},
            "step_cost": {
                v: round(plain["images_per_s"] / m["images_per_s"], 3)
                for v, m in measured.items()
                if v != "plain"
            },
            "alternating_step_cost": round(alternating_s * plain["images_per_s"], 3),
            "memory_ratio": {
                v: round(m["peak_bytes"] / max(plain["peak_bytes"], 1), 3)
                for v, m in measured.items()
                if v != "plain"
            },
        }
        rows.append(row)
        log.info("throughput %s: %s", backbone, row["step_cost"])
    return {"rows": rows}


def run(quick: bool, device: str | torch.device | None = None) -> dict[str, Any]:
    """The throughput benchmark; ``quick`` shrinks every size so the run takes seconds on a CPU."""
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    start = time.perf_counter()
    figures = {
        "device": str(dev),
        "quick": quick,
        "throughput": throughput(quick, dev),
    }
    figures["seconds"] = round(time.perf_counter() - start, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT})")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one isolated measurement
    args = parser.parse_args()
    if args.child is not None:
        backbone, variant, size, batch, steps, device = json.loads(args.child)
        print(json.dumps(measure_variant(backbone, variant, tuple(size), batch, steps, device)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("training").setLevel(logging.WARNING)
    figures = run(args.quick, args.device)
    out = args.out or (
        DEFAULT_OUT if figures["device"] == "cpu" else DEFAULT_OUT.with_name("training-gpu.json")
    )
    path = write_result(out, "training", figures)
    print(path)


if __name__ == "__main__":
    main()
