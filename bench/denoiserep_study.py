"""Study: does DenoiseRep improve retrieval, at the same backbone budget, against a size-matched control?

A small CNN (timm's ``test_resnet``) is trained on synthetic person (Market-1501 layout) and vehicle
(VeRi-776 layout) sets into which a nuisance the denoisers could remove is planted: every camera adds
its own faint grating and colour cast to its crops (train, gallery and "corrupted" queries; "clean"
queries are left untouched). Per seed, one shared pretraining run, then the arms, all with the same
number of backbone epochs after it:

* **A, plain**: ``m`` more epochs of ordinary fine-tuning.
* **B, SGD DenoiseRep**: the ``denoiserep`` stage, alternating ``m`` label-free denoiser epochs
  with ``m`` backbone epochs (same backbone epochs as A; the denoiser epochs read no label).
* **C, closed form**: A's model with every denoiser set to its exact optimum (``calibrate``) on
  the unlabelled training crops (beta_T = 2e-3, the reference schedule).
* **D, strength sweep**: C at beta_T in {2e-2, 2e-1} (C is the 2e-3 point).
* **E, random control**: A's model with random denoisers scaled so that every layer's
  ``||W' - W|| / ||W||`` equals C's: a change of the same size but without the content.

Reported per arm: mAP and rank-1 (clean and corrupted queries), the fused weight change, and, for
each arm with denoisers, the exact expected L2 denoising loss of its D against the analytic minimum
on its own backbone's features (as the fraction of the possible reduction from D = 0 left over) and
``||D - D*|| / ||D*||``. Differences to A are paired by seed, with 95 % t intervals. A gain counts
only if C beats both A and E and grows with strength.

Run from the repository root::

    python -m bench.denoiserep_study               # 5 seeds, both kinds (about 10 min on 2 cores)
    python -m bench.denoiserep_study --quick       # 2 seeds, tiny sets: a smoke test (under a minute)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.machine import write_result
from training import denoiserep
from training.checkpoint import load_checkpoint, model_from_checkpoint, resolve_checkpoint
from training.config import config_from_dict
from training.data.registry import build_dataset
from training.data.transforms import Preprocess, build_test_transform
from training.denoiserep.calibration import (
    calibrate,
    collect_moments,
    denoiser_tensors,
    expected_l2_loss,
    optimal_denoiser,
)
from training.embedding import evaluate_embedder
from training.engine import train
from training.export import fused_model

log = logging.getLogger("bench.denoiserep_study")

ARMS = ("A", "B", "C", "D 2e-2", "D 2e-1", "E")
ARM_NAMES = {
    "A": "plain fine-tuning",
    "B": "SGD DenoiseRep (alternating)",
    "C": "closed form, beta_T 2e-3",
    "D 2e-2": "closed form, beta_T 2e-2",
    "D 2e-1": "closed form, beta_T 2e-1",
    "E": "random D, C's weight change",
}
STRENGTHS = {"C": 2e-3, "D 2e-2": 2e-2, "D 2e-1": 2e-1}
# Two-sided 95 % Student t quantiles by degrees of freedom (for paired differences over seeds).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

KINDS = {
    # kind: (layout, size, ids, images per id, cameras)
    "person": ("market1501", (64, 32), 40, 8, 6),
    "vehicle": ("veri776", (64, 64), 40, 8, 6),
}


# ----------------------------------------------------------------------------- the planted nuisance


def camera_pattern(camera: int, size: tuple[int, int], seed: int, amplitude: float) -> np.ndarray:
    """A faint oriented grating plus a colour cast, fixed per (seed, camera), as an HxWx3 float array."""
    rng = np.random.default_rng([seed, 7919, camera])
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(3.0, 7.0)
    phase = rng.uniform(0, 2 * math.pi)
    grating = np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period + phase)
    cast = rng.normal(0.0, 0.5, size=3)
    return amplitude * (grating[..., None] * rng.choice([-1.0, 1.0], size=3) + cast)


def corrupt_dataset(
    source: Path, target: Path, layout: str, seed: int, amplitude: float, clean_queries: bool
) -> Path:
    """Copy ``source`` to ``target`` with every crop of camera c carrying camera c's pattern.

    The query split is left clean when ``clean_queries``; train and gallery are always corrupted.
    """
    shutil.copytree(source, target)
    dataset = build_dataset(layout, target)
    splits = [("train", dataset.train), ("gallery", dataset.gallery)]
    if not clean_queries:
        splits.append(("query", dataset.query))
    for _, samples in splits:
        for sample in samples:
            with Image.open(sample.path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
            pattern = camera_pattern(sample.camid, pixels.shape[:2], seed, amplitude)
            noisy = np.clip(pixels + pattern, 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(sample.path, quality=95)
    return target


# ----------------------------------------------------------------------------- training the arms


def _config(
    layout: str, root: Path, size: tuple[int, int], seed: int, stage: str, epochs: int, **extra: Any
) -> dict:
    return {
        "data": {
            "dataset": layout,
            "root": str(root),
            "size": list(size),
            "p": 8,
            "k": 4,
            "num_workers": 0,
            "eval_batch_size": 64,
            "pad": 2,
            "erasing_prob": 0.0,
        },
        "model": {"backbone": "test_resnet"},
        "optim": {
            "name": "sgd",
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "schedule": "multistep",
            "milestones": [],
            "warmup_epochs": 0,
            **extra.pop("optim", {}),
        },
        "eval": {"every": -1},
        "train": {"stage": stage, "epochs": epochs, "seed": seed, "device": "cpu", **extra.pop("train", {})},
        **extra,
    }


def _trained(run_dir: Path) -> Any:
    return model_from_checkpoint(load_checkpoint(resolve_checkpoint(run_dir)))


def train_arms(
    kind: str,
    root: Path,
    work: Path,
    seed: int,
    pre_epochs: int,
    epochs: int,
    denoiser_lr: float | None = None,
) -> dict[str, Any]:
    """The shared pretraining, then A (plain) and B (SGD DenoiseRep) with ``epochs`` backbone epochs each."""
    layout, size, *_ = KINDS[kind]
    lr = 0.01  # the continuation's rate, the same for A's epochs and B's backbone phases
    pre = work / "pre"
    train(
        config_from_dict(_config(layout, root, size, seed, "baseline", pre_epochs, optim={"lr": 0.05})), pre
    )
    plain = work / "A"
    train(
        config_from_dict(
            _config(layout, root, size, seed, "baseline", epochs, optim={"lr": lr}, train={"init": str(pre)})
        ),
        plain,
    )
    dr = work / "B"
    train(
        config_from_dict(
            _config(
                layout, root, size, seed, "denoiserep", 1, optim={"lr": lr}, train={"init": str(pre)},
                denoiserep={"epochs": 2 * epochs, "denoiser_epochs": 1, "backbone_epochs": 1, "lr": lr,
                            **({} if denoiser_lr is None else {"denoiser_lr": denoiser_lr}),
                            "warmup_epochs": 0},
            )
        ),
        dr,
    )  # fmt: skip
    return {
        "A": _trained(plain),
        "B": _trained(dr),
        "preprocess": Preprocess.from_dict(load_checkpoint(resolve_checkpoint(plain))["preprocess"]),
    }


def _train_batches(root: Path, layout: str, prep: Preprocess, limit: int = 256) -> list[torch.Tensor]:
    """Unlabelled training crops (at most ``limit``) as test-time tensors, for calibration and moments."""
    transform = build_test_transform(prep)
    samples = build_dataset(layout, root).train[:limit]
    tensors = []
    for sample in samples:
        with Image.open(sample.path) as image:
            tensors.append(transform(image))
    return [torch.stack(tensors[i : i + 64]) for i in range(0, len(tensors), 64)]


def calibrated(model: Any, batches: list[torch.Tensor], beta_t: float) -> Any:
    """A converted copy of ``model`` with closed-form denoisers at strength ``beta_t``."""
    model = copy.deepcopy(model)
    denoiserep.convert(model.backbone, beta=(1e-4, beta_t))
    calibrate(model.backbone, batches, generator=torch.Generator().manual_seed(0))
    return model


def random_control(model: Any, reference: Any, seed: int) -> Any:
    """A converted copy of ``model`` with Gaussian denoisers, each scaled to ``reference``'s weight change."""
    model = copy.deepcopy(model)
    denoiserep.convert(model.backbone)
    target = denoiserep.weight_changes(reference.backbone)
    g = torch.Generator().manual_seed(seed)
    for name, layer in denoiserep.denoising_layers(model.backbone):
        with torch.no_grad():
            layer.denoiser_weight.copy_(torch.randn(layer.denoiser_weight.shape, generator=g))
            # ||W' - W|| is (c3 - 1) W - c1 W D: bisect the scale of D that gives the reference's change.
            direction = layer.denoiser_weight.clone()
            lo, hi = 0.0, 1.0
            while _change_at(layer, direction, hi) < target[name]:
                hi *= 2
            for _ in range(50):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if _change_at(layer, direction, mid) < target[name] else (lo, mid)
            layer.denoiser_weight.copy_(direction * hi)
    return model


def _change_at(layer: Any, direction: torch.Tensor, scale: float) -> float:
    layer.denoiser_weight.copy_(direction * scale)
    return layer.weight_change()


# ----------------------------------------------------------------------------- measuring an arm


def denoiser_quality(model: Any, batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean over layers of the loss gap left and of ``||D - D*|| / ||D*||``.

    The gap left is ``(L(D) - L*) / (L(0) - L*)`` of the exact expected L2 loss on the arm's own
    backbone features: 0 at the optimum, 1 no better than D = 0.
    """
    probe = copy.deepcopy(model.backbone)
    trained = {name: denoiser_tensors(layer) for name, layer in denoiserep.denoising_layers(probe)}
    with torch.no_grad():
        for _, layer in denoiserep.denoising_layers(probe):
            for p in layer.denoiser_parameters():
                p.zero_()
    found = collect_moments(probe, batches, generator=torch.Generator().manual_seed(0))
    gaps, distances, reductions = [], [], []
    for name, layer in denoiserep.denoising_layers(probe):
        step, moments = layer.step, found[name].moments
        a, s = step.sqrt_abar, step.sqrt_one_minus_abar
        best_w, best_b = optimal_denoiser(moments, a, s, layer.denoiser_bias is not None)
        weight, bias = trained[name]
        zero = expected_l2_loss(
            torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias), moments, a, s
        )
        minimum = expected_l2_loss(best_w, best_b, moments, a, s)
        reached = expected_l2_loss(weight, bias, moments, a, s)
        gaps.append((reached - minimum) / max(zero - minimum, 1e-12))
        distances.append(float((weight - best_w).norm() / best_w.norm()))
        reductions.append((zero - minimum) / zero)
    return {
        "loss_gap_left": statistics.fmean(gaps),
        "d_distance": statistics.fmean(distances),
        # How much lower than its D = 0 value the loss can go at all (the scale of the gap above).
        "possible_reduction": statistics.fmean(reductions),
    }


def retrieval(model: Any, root: Path, layout: str, prep: Preprocess) -> dict[str, float]:
    plain = fused_model(model)

    def embed(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return F.normalize(plain.embed(batch).float(), dim=1)

    result = evaluate_embedder(
        embed, build_dataset(layout, root), build_test_transform(prep), protocol="market1501"
    )
    return {"mAP": result["mAP"], "rank1": result["cmc"]["1"]}


def measure(
    model: Any, arm: str, roots: dict[str, Path], layout: str, prep: Preprocess, batches: list[torch.Tensor]
) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for queries, root in roots.items():
        for key, value in retrieval(model, root, layout, prep).items():
            row[f"{key}_{queries}"] = value
    if denoiserep.is_converted(model.backbone):
        row["weight_change"] = denoiserep.summarize_changes(denoiserep.weight_changes(model.backbone))["mean"]
        row.update(denoiser_quality(model, batches))
    else:
        row.update(weight_change=0.0, loss_gap_left=None, d_distance=None, possible_reduction=None)
    return row


# ----------------------------------------------------------------------------- the study


def paired(values: list[float], baseline: list[float]) -> dict[str, float]:
    """Mean paired difference with its 95 % t interval (half-width), over seeds."""
    diffs = [v - b for v, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "half_width": float("nan")}
    half = T975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "half_width": half}


def run_seed(
    kind: str,
    seed: int,
    work: Path,
    *,
    ids: int,
    images_per_id: int,
    pre_epochs: int,
    epochs: int,
    amplitude: float,
) -> dict[str, dict]:
    from training.data.synthetic import write_synthetic

    layout, _, _, _, cameras = KINDS[kind]
    clean = write_synthetic(work / "clean", layout=layout, ids=ids, seed=seed, images_per_id=images_per_id,
                            cameras=cameras, progress=False)  # fmt: skip
    roots = {
        "corrupted": corrupt_dataset(clean, work / "corrupted", layout, seed, amplitude, clean_queries=False),
        "clean": corrupt_dataset(clean, work / "clean_queries", layout, seed, amplitude, clean_queries=True),
    }
    models = train_arms(kind, roots["corrupted"], work / "runs", seed, pre_epochs, epochs)
    prep = models.pop("preprocess")
    batches = _train_batches(roots["corrupted"], layout, prep)
    for arm, beta_t in STRENGTHS.items():
        models[arm] = calibrated(models["A"], batches, beta_t)
    models["E"] = random_control(models["A"], models["C"], seed)
    return {arm: measure(models[arm], arm, roots, layout, prep, batches) for arm in ARMS}


def run_study(seeds: list[int], *, quick: bool, work: Path) -> dict[str, Any]:
    settings = (
        {"ids": 16, "images_per_id": 6, "pre_epochs": 3, "epochs": 1, "amplitude": 12.0}
        if quick
        else {"ids": 60, "images_per_id": 10, "pre_epochs": 24, "epochs": 4, "amplitude": 12.0}
    )
    rows: dict[str, dict[str, list[dict]]] = {}
    for kind in KINDS:
        rows[kind] = {arm: [] for arm in ARMS}
        for seed in seeds:
            start = time.perf_counter()
            result = run_seed(kind, seed, work / f"{kind}-{seed}", **settings)
            for arm in ARMS:
                rows[kind][arm].append(result[arm])
            log.info("%s seed %d: %.0f s", kind, seed, time.perf_counter() - start)
    summary: dict[str, Any] = {}
    for kind, arms in rows.items():
        summary[kind] = {}
        for arm, per_seed in arms.items():
            entry: dict[str, Any] = {"name": ARM_NAMES[arm]}
            for key in per_seed[0]:
                values = [r[key] for r in per_seed]
                entry[key] = None if values[0] is None else statistics.fmean(values)
            for key in ("mAP_clean", "mAP_corrupted", "rank1_clean", "rank1_corrupted"):
                entry[f"{key}_vs_A"] = paired([r[key] for r in per_seed], [r[key] for r in arms["A"]])
            entry["mAP_clean_vs_E"] = paired(
                [r["mAP_clean"] for r in per_seed], [r["mAP_clean"] for r in arms["E"]]
            )
            summary[kind][arm] = entry
    return {"seeds": seeds, "settings": settings, "summary": summary, "per_seed": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for kind, arms in result["summary"].items():
        lines += [
            f"**{kind}** ({len(result['seeds'])} seeds; differences to A paired by seed, "
            "mean ± 95 % t half-width)",
            "",
            "| arm | mAP clean | mAP corrupted | rank-1 clean | mAP clean − A | mAP corrupted − A "
            "| rank-1 clean − A | mAP clean − E | ‖W'−W‖/‖W‖ | loss gap left | ‖D−D*‖/‖D*‖ "
            "| possible loss reduction |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, e in arms.items():

            def pm(d: dict[str, float]) -> str:
                return f"{d['mean']:+.4f} ± {d['half_width']:.4f}"

            def opt(v: float | None, fmt: str) -> str:
                return "—" if v is None else format(v, fmt)

            lines.append(
                f"| {arm}: {e['name']} | {e['mAP_clean']:.4f} | {e['mAP_corrupted']:.4f} "
                f"| {e['rank1_clean']:.4f} "
                f"| {pm(e['mAP_clean_vs_A'])} | {pm(e['mAP_corrupted_vs_A'])} | {pm(e['rank1_clean_vs_A'])} "
                f"| {pm(e['mAP_clean_vs_E'])} | {e['weight_change']:.2e} | {opt(e['loss_gap_left'], '.3f')} "
                f"| {opt(e['d_distance'], '.3f')} | {opt(e['possible_reduction'], '.2%')} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """One figure: mAP difference to A (clean queries) with its 95 % interval, per arm and kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if a != "A"]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    for offset, (kind, summary) in zip((-0.15, 0.15), result["summary"].items(), strict=False):
        means = [summary[a]["mAP_clean_vs_A"]["mean"] for a in arms]
        errors = [summary[a]["mAP_clean_vs_A"]["half_width"] for a in arms]
        ax.errorbar(
            [i + offset for i in range(len(arms))], means, yerr=errors, fmt="o", capsize=3, label=kind
        )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(arms)), arms)
    ax.set_ylabel("mAP − plain (clean queries)")
    ax.set_title(
        f"DenoiseRep arms vs plain fine-tuning, {len(result['seeds'])} paired seeds, 95 % t intervals"
    )
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, tiny sets: a smoke test")
    parser.add_argument("--seeds", type=int, default=None, help="number of paired seeds (default 5, quick 2)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/denoiserep_study.json"))
    parser.add_argument("--plot", type=Path, default=None, help="PNG of the mAP differences (default: none)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the data and runs here (default: temp)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("training").setLevel(logging.WARNING)
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 5)))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="reid-study-") as tmp:
        work = args.workdir or Path(tmp)
        start = time.perf_counter()
        result = run_study(seeds, quick=args.quick, work=work)
        result["seconds"] = round(time.perf_counter() - start, 1)
    write_result(args.out, "denoiserep_study", result)
    print(markdown(result))
    if args.plot is not None:
        plot(result, args.plot)
    print(json.dumps({"seconds": result["seconds"], "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
