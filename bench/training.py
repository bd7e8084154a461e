"""Training benchmarks: step throughput with and without DenoiseRep, and DenoiseRep's effect on mAP.

Two parts:

1. **Throughput**: images per second of a full training step (forward, ID + triplet loss, plus the
   denoising loss when converted, backward, SGD step) for the default backbones
   (``vit_small_patch16_224`` at 256x128 with DenoiseRep on its MLP layers, ``resnet50`` at 256x128
   with DenoiseRep on its convolutions), random-init weights and random images.
2. **Effect**: on synthetic person (Market-1501 layout) and vehicle (VehicleID layout) data, a
   baseline trained for E epochs is continued for E' more epochs (a) as a plain baseline and
   (b) as a DenoiseRep stage (alternating denoiser / backbone phases), same learning rate and the
   same number of epochs; mean and std over 3 training seeds of mAP and rank-1 of the final models,
   evaluated fused (as exported). A small backbone (timm's ``test_resnet``) keeps it within minutes
   on a CPU.

Run: ``python -m bench.training [--quick] [--device cpu|cuda] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.machine import write_result

log = logging.getLogger("bench.training")

DEFAULT_OUT = Path(__file__).parent / "results" / "training-cpu.json"


def _step_throughput(
    backbone: str, *, denoise: bool, size: tuple[int, int], batch: int, steps: int, device: torch.device
) -> float:
    """Images/s of full training steps on random data (after one warm-up step)."""
    from training import denoiserep
    from training.losses import ReIDLoss
    from training.model import ReIDModel

    torch.manual_seed(0)
    model = ReIDModel(backbone, num_classes=batch // 4, img_size=size).to(device).train()
    if denoise:
        denoiserep.convert(model.backbone, layers="conv" if model.is_cnn else "mlp")
        denoiserep.set_phase(model.backbone, "joint")
        model.to(device)
    cnn_cuda = device.type == "cuda" and model.is_cnn
    if cnn_cuda:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
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
            logits, feat, _ = model(x)
            loss = loss_fn(logits, feat, labels).total
            if denoise:
                loss = loss + 0.1 * denoiserep.denoise_loss(model.backbone)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def throughput(quick: bool, device: torch.device) -> dict[str, Any]:
    """Training-step throughput of the default backbones, plain and DenoiseRep-converted."""
    cuda = device.type == "cuda"
    batch = 64 if cuda else (4 if quick else 8)
    steps = 20 if cuda else (1 if quick else 3)
    size = (256, 128)
    rows = []
    for backbone in ("vit_small_patch16_224", "resnet50"):
        plain = _step_throughput(backbone, denoise=False, size=size, batch=batch, steps=steps, device=device)
        denoised = _step_throughput(
            backbone, denoise=True, size=size, batch=batch, steps=steps, device=device
        )
        rows.append(
            {
                "backbone": backbone,
                "input": list(size),
                "batch": batch,
                "steps": steps,
                "precision": "bf16 autocast" if cuda else "fp32",
                "images_per_s_plain": round(plain, 2),
                "images_per_s_denoiserep": round(denoised, 2),
                "denoiserep_step_cost": round(plain / denoised, 3),
            }
        )
        log.info("throughput %s: plain %.1f img/s, DenoiseRep %.1f img/s", backbone, plain, denoised)
    return {"rows": rows}


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.pstdev(values), 4) if len(values) > 1 else 0.0,
        "values": [round(v, 4) for v in values],
    }


def _effect_for(kind: str, *, quick: bool, seeds: list[int], device: str, workdir: Path) -> dict[str, Any]:
    from training.config import load_config
    from training.data.registry import build_dataset
    from training.data.synthetic import write_synthetic
    from training.engine import Trainer

    ids = 32 if quick else 64
    if kind == "person":
        root = write_synthetic(
            workdir / "market",
            layout="market1501",
            ids=ids,
            images_per_id=8,
            cameras=3,
            seed=0,
            progress=False,
        )
        dataset = build_dataset("market1501", root)
        size = [64, 32]
    else:
        root = write_synthetic(
            workdir / "vehicleid", layout="vehicleid", ids=ids, images_per_id=8, seed=0, progress=False
        )
        dataset = build_dataset("vehicleid", root, test_size=2400)  # the largest list: every test vehicle
        size = [48, 48]
    base_epochs = 4 if quick else 12
    extra_epochs = 2 if quick else 4
    finetune_lr = 0.005
    common = [
        "model.backbone=test_resnet",
        f"data.size={size}",
        "data.p=8",
        "data.k=4",
        "data.num_workers=0",
        "data.pad=2",
        "data.erasing_prob=0.0",
        "optim.name=sgd",
        "optim.lr=0.05",
        "optim.warmup_epochs=2",
        f"train.device={device}",
        "eval.every=0",
        "eval.trials=10",
    ]
    names = ("baseline", "continued", "denoiserep")
    results: dict[str, list[float]] = {f"{n}_{m}": [] for n in names for m in ("mAP", "rank1")}
    seconds: dict[str, float] = {"baseline": 0.0, "continued": 0.0, "denoiserep": 0.0}
    for seed in seeds:
        run = workdir / f"{kind}_seed{seed}"
        stages = {
            "baseline": [*common, f"train.seed={seed}", f"train.epochs={base_epochs}"],
            # Same budget and learning rate for both continuations: only DenoiseRep differs.
            "continued": [
                *common,
                f"train.seed={seed}",
                f"train.epochs={extra_epochs}",
                f"optim.lr={finetune_lr}",
                "optim.warmup_epochs=0",
                f"train.init={run / 'baseline'}",
            ],
            "denoiserep": [
                *common,
                f"train.seed={seed}",
                "train.stage=denoiserep",
                f"denoiserep.epochs={extra_epochs}",
                f"denoiserep.lr={finetune_lr}",
                "denoiserep.denoiser_lr=0.05",
                "denoiserep.layers=conv",
                "denoiserep.mode=alternate",
                f"train.init={run / 'baseline'}",
            ],
        }
        for name, overrides in stages.items():
            start = time.perf_counter()
            result = Trainer(load_config(None, overrides), run / name, dataset=dataset).fit()
            seconds[name] += time.perf_counter() - start
            final = result.last_evaluation
            results[f"{name}_mAP"].append(final["mAP"])
            results[f"{name}_rank1"].append(final["cmc"]["1"])
            log.info("%s seed %d %s: mAP %.4f rank-1 %.4f", kind, seed, name, final["mAP"], final["cmc"]["1"])
    return {
        "dataset": dataset.name,
        "protocol": "vehicleid (10 trials)" if kind == "vehicle" else "market1501",
        "train_identities": dataset.num_train_pids,
        "train_images": len(dataset.train),
        "backbone": "test_resnet",
        "input": size,
        "baseline_epochs": base_epochs,
        "extra_epochs": extra_epochs,
        "finetune_lr": finetune_lr,
        "denoiserep": {"layers": "conv", "mode": "alternate", "denoiser_lr": 0.05, "loss_weight": 0.1},
        "seeds": seeds,
        **{key: _mean_std(values) for key, values in results.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def effect(quick: bool, device: torch.device) -> dict[str, Any]:
    """DenoiseRep vs plain continuation of the same baselines, on synthetic persons and vehicles."""
    seeds = [0, 1] if quick else [0, 1, 2]
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        return {
            kind: _effect_for(kind, quick=quick, seeds=seeds, device=str(device), workdir=Path(tmp) / kind)
            for kind in ("person", "vehicle")
        }


def run(quick: bool, device: str | torch.device | None = None) -> dict[str, Any]:
    """Both benchmarks; ``quick`` shrinks every size so the whole run takes a minute or two on a CPU."""
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
        "effect": effect(quick, dev),
    }
    figures["seconds"] = round(time.perf_counter() - start, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", type=Path, default=None, help=f"result JSON (default {DEFAULT_OUT})")
    args = parser.parse_args()
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
