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
import logging
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
