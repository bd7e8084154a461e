"""Benchmark: what DenoiseRep fusion saves at inference, and that the fused model costs the baseline.

For each backbone, three models are timed side by side in one run: the plain timm model (baseline),
the DenoiseRep model before fusion (eval mode: the explicit denoise-then-layer computation, with
random nonzero denoisers) and the fused model. Rounds interleave the three in a rotating order so
that thermal or load drift hits them alike; each figure is the median over rounds. The report gives
fused/baseline (1.00 within noise if fusion is free) and unfused/fused (what fusion saves), with the
multiply-accumulate count of each model from torch's FLOP counter, parameter counts and state_dict
sizes, and the fused-vs-unfused output error in the working dtype.

Run from the repository root::

    python -m bench.fusion                      # cuda if available (fp16), else cpu (fp32)
    python -m bench.fusion --quick              # tiny settings, seconds: a smoke test
    python -m bench.fusion --device cpu --batch 8 --models vit_small_patch16_224,resnet50
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (python bench/fusion.py): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from bench.machine import write_result
from bench.timing import synchronize
from training.denoiserep import convert, denoising_layers, fuse

logger = logging.getLogger("bench.fusion")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = ("baseline", "unfused", "fused")


@dataclass(frozen=True)
class BackboneSpec:
    """One benchmarked backbone: its timm name and kwargs, the DenoiseRep layer spec, its input size."""

    name: str
    layers: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    quick_kwargs: dict[str, Any] = field(default_factory=dict)  # shrinks the model for --quick


BACKBONES = {
    spec.name: spec
    for spec in (
        BackboneSpec("vit_small_patch16_224", "mlp", {"img_size": (256, 128)}, {"depth": 2}),
        BackboneSpec("vit_base_patch16_224", "mlp", {"img_size": (256, 128)}, {"depth": 2}),
        BackboneSpec("resnet50", "conv", {}, {"layers": (1, 1, 1, 1)}),
    )
}
INPUT_SIZE = (256, 128)
QUICK_INPUT_SIZE = (64, 32)


@dataclass(frozen=True)
class BenchSettings:
    """How to time: device, dtype, batch size, timed iterations per round, warm-up, rounds."""

    device: str
    dtype: str
    batch: int
    iters: int
    warmup: int
    repeats: int
    input_size: tuple[int, int]
    quick: bool


def default_settings(quick: bool, device: str | None) -> BenchSettings:
    """CPU: fp32, batch 8 (the whole run fits in a few minutes on 2 cores); GPU: fp16, batch 256."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    if quick:
        return BenchSettings(device, "fp16" if on_gpu else "fp32", 2, 2, 1, 2, QUICK_INPUT_SIZE, True)
    if on_gpu:
        return BenchSettings(device, "fp16", 256, 20, 5, 7, INPUT_SIZE, False)
    return BenchSettings(device, "fp32", 8, 1, 1, 5, INPUT_SIZE, False)


def randomize_denoisers(model: nn.Module, seed: int, strength: float = 0.05) -> None:
    """Nonzero denoisers, each changing its layer's output by about ``strength`` (relative)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in denoising_layers(model):
            for p in layer.denoiser_parameters():
                fan = p.shape[-1] if p.dim() > 1 else 1
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
                p.copy_(noise * strength / (layer.step.c1 * math.sqrt(fan)))


def _state_dict_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _macs_per_image(model: nn.Module, input_size: tuple[int, int]) -> float:
    """Multiply-accumulates of one image's forward pass (matmuls and convs), from torch's counter."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, *input_size))
    return counter.get_total_flops() / 2


def _time_rounds(
    models: dict[str, nn.Module], x: torch.Tensor, settings: BenchSettings, label: str
) -> dict[str, list[float]]:
    """Seconds per batch of each model, one value per round; the order rotates every round."""
    device = x.device
    with torch.inference_mode():
        for model in models.values():
            for _ in range(settings.warmup):
                model(x)
        synchronize(device)
        seconds: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        for r in tqdm(range(settings.repeats), desc=label, leave=False):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                synchronize(device)
                start = time.perf_counter()
                for _ in range(settings.iters):
                    models[name](x)
                synchronize(device)
                seconds[name].append((time.perf_counter() - start) / settings.iters)
    return seconds


def bench_backbone(spec: BackboneSpec, settings: BenchSettings, seed: int = 0) -> dict[str, Any]:
    """Build baseline, unfused and fused models of one backbone and measure them side by side."""
    kwargs = {**spec.kwargs, **(spec.quick_kwargs if settings.quick else {})}
    if "img_size" in kwargs:
        kwargs["img_size"] = settings.input_size
    torch.manual_seed(seed)
    baseline = timm.create_model(spec.name, pretrained=False, num_classes=0, **kwargs).eval()
    # Fusion happens once, in float32 on the CPU as the exporter does; the models are cast afterwards.
    unfused = convert(copy.deepcopy(baseline), layers=spec.layers)
    randomize_denoisers(unfused, seed=seed + 1)
    fused = fuse(unfused)
    models = {"baseline": baseline, "unfused": unfused, "fused": fused}
    figures: dict[str, Any] = {
        "model": spec.name,
        "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "layers": spec.layers,
        "denoising_layers": len(denoising_layers(unfused)),
        "params": {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()},
        "state_dict_bytes_fp32": {name: _state_dict_bytes(m) for name, m in models.items()},
        "macs_per_image": {name: _macs_per_image(m, settings.input_size) for name, m in models.items()},
    }

    device, dtype = torch.device(settings.device), DTYPES[settings.dtype]
    memory_format = torch.channels_last if device.type == "cuda" and spec.layers == "conv" else None
    for model in models.values():
        model.to(device=device, dtype=dtype)
        if memory_format is not None:
            model.to(memory_format=memory_format)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(settings.batch, 3, *settings.input_size, generator=g).to(device=device, dtype=dtype)
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    with torch.inference_mode():
        out_unfused, out_fused = unfused(x).float(), fused(x).float()
    figures["fused_vs_unfused_rel_err"] = float((out_fused - out_unfused).norm() / out_unfused.norm())

    seconds = _time_rounds(models, x, settings, spec.name)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    figures["latency_ms_per_batch"] = {name: 1000 * s for name, s in median.items()}
    figures["latency_ms_per_batch_min_max"] = {
        name: [1000 * min(values), 1000 * max(values)] for name, values in seconds.items()
    }
    figures["images_per_s"] = {name: settings.batch / s for name, s in median.items()}
    figures["ratio_fused_over_baseline"] = median["fused"] / median["baseline"]
    figures["ratio_unfused_over_fused"] = median["unfused"] / median["fused"]
    figures["baseline_round_spread_max_over_min"] = _self_spread(seconds["baseline"])
    return figures


def _self_spread(values: list[float]) -> float:
    """max/min of one model's rounds: how far apart two timings of the *same* model fall (the noise)."""
    return max(values) / min(values)


def run(
    quick: bool = False,
    device: str | None = None,
    *,
    models: list[str] | None = None,
    batch: int | None = None,
    iters: int | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    dtype: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the fusion benchmark and return its figures (settings, then one entry per backbone).

    Args:
        quick: tiny models and inputs, for a smoke test that takes seconds.
        device: "cpu", "cuda", "cuda:1"...; default cuda when available.
        models: timm names among ``BACKBONES``; default all three.
        batch, iters, warmup, repeats, dtype: override the defaults of :func:`default_settings`.
        seed: seeds the models, the denoisers and the input.
    """
    base = default_settings(quick, device)
    settings = BenchSettings(
        device=base.device,
        dtype=dtype or base.dtype,
        batch=batch or base.batch,
        iters=iters or base.iters,
        warmup=base.warmup if warmup is None else warmup,
        repeats=repeats or base.repeats,
        input_size=base.input_size,
        quick=quick,
    )
    if settings.dtype not in DTYPES:
        raise ValueError(f"unknown dtype {settings.dtype!r}: use one of {', '.join(DTYPES)}")
    names = models or list(BACKBONES)
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}: use some of {', '.join(BACKBONES)}")
    # Other processes compete for a CPU: record the load so a reader can judge the CPU figures.
    load_before = list(os.getloadavg())
    results = []
    for name in names:
        logger.info(
            "benchmarking %s on %s (%s, batch %d)", name, settings.device, settings.dtype, settings.batch
        )
        results.append(bench_backbone(BACKBONES[name], settings, seed))
    return {
        "settings": {**settings.__dict__, "input_size": list(settings.input_size)},
        "load_average_1_5_15min": {"before": load_before, "after": list(os.getloadavg())},
        "models": results,
    }


def markdown_table(figures: dict[str, Any]) -> str:
    """The results as a markdown table (one row per backbone)."""
    s = figures["settings"]
    lines = [
        f"{s['device']}, {s['dtype']}, batch {s['batch']}, input {s['input_size'][0]}x{s['input_size'][1]}, "
        f"median of {s['repeats']} interleaved rounds of {s['iters']} forwards{_load_note(figures)}",
        "",
        "| model | layers | baseline img/s | unfused img/s | fused img/s | fused/baseline | unfused/fused "
        "| MACs unfused/fused | params baseline / unfused / fused (M) | state_dict fp32 unfused / fused (MB) "
        "| rel. err fused vs unfused |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in figures["models"]:
        ips, params, size, macs = (
            m["images_per_s"],
            m["params"],
            m["state_dict_bytes_fp32"],
            m["macs_per_image"],
        )
        lines.append(
            f"| {m['model']} | {m['layers']} ({m['denoising_layers']}) "
            f"| {ips['baseline']:.1f} | {ips['unfused']:.1f} | {ips['fused']:.1f} "
            f"| {m['ratio_fused_over_baseline']:.3f} | {m['ratio_unfused_over_fused']:.3f} "
            f"| {macs['unfused'] / macs['fused']:.2f} "
            f"| {params['baseline'] / 1e6:.1f} / {params['unfused'] / 1e6:.1f} / {params['fused'] / 1e6:.1f} "
            f"| {size['unfused'] / 1e6:.0f} / {size['fused'] / 1e6:.0f} "
            f"| {m['fused_vs_unfused_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def _load_note(figures: dict[str, Any]) -> str:
    load = figures.get("load_average_1_5_15min")
    if not load:
        return ""
    return f", 1-min load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--batch", type=int, default=None, help="images per forward (default 8 cpu, 256 gpu)")
    parser.add_argument("--iters", type=int, default=None, help="timed forwards per model and round")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards per model first")
    parser.add_argument(
        "--repeats", type=int, default=None, help="interleaved rounds (the median is reported)"
    )
    parser.add_argument("--models", default=None, help=f"comma-separated, among {', '.join(BACKBONES)}")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on cpu, fp16 on gpu"
    )
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/fusion-{cpu,gpu}.json)")
    parser.add_argument("--quick", action="store_true", help="tiny models and inputs: a smoke test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    figures = run(
        args.quick,
        args.device,
        models=args.models.split(",") if args.models else None,
        batch=args.batch,
        iters=args.iters,
        warmup=args.warmup,
        repeats=args.repeats,
        dtype=args.dtype,
        seed=args.seed,
    )
    kind = "gpu" if figures["settings"]["device"].startswith("cuda") else "cpu"
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"fusion-{kind}.json"
    write_result(out, "fusion", figures)
    print(markdown_table(figures))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
