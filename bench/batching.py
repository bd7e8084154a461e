"""Benchmark: the micro-batcher's waiting policy, with a model that takes a GPU's measured time.

How long should a lone query wait for company before its forward pass runs? The service's
:class:`service.embedder.MicroBatcher` is driven here by closed-loop clients (each sends its next
request when the last one is answered) against a stand-in model whose forward pass *sleeps* for
the time a real one took on the H200 (ViT-S/16 fp16: 0.56 ms at batch 1 through a CUDA graph,
33,836 images/s at batch 256; bench/README.md), so the figures isolate the scheduling policy from
the model and can be measured on any machine. For each ``max_wait`` and number of clients: p50/p99
latency, requests/s and the mean batch size, measured in one run side by side.

With ``max_wait = 0`` a request arriving at an idle model runs at once, and the requests that arrive
while a forward pass runs form the next batch: batching comes from the load itself.

Run from the repository root::

    python -m bench.batching            # about 30 s
    python -m bench.batching --quick
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.machine import write_result
from bench.timing import latency_ms

logger = logging.getLogger("bench.batching")

#: Forward time of the stand-in model: fixed + per image (H200, ViT-S/16 fp16, bench/README.md).
FIXED_MS = 0.56
PER_IMAGE_MS = 1000.0 / 33_836
WAITS_MS = (0.0, 0.5, 2.0)
CLIENTS = (1, 8, 32)


@dataclass
class TimedModel:
    """Sleeps for ``fixed_ms + per_image_ms * batch`` per forward pass, like a GPU the host waits on."""

    fixed_ms: float
    per_image_ms: float
    name: str = "timed"
    dim: int = 8
    batches: list[int] = field(default_factory=list)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(batch.shape[0])
        time.sleep((self.fixed_ms + self.per_image_ms * batch.shape[0]) / 1000.0)
        return torch.zeros((batch.shape[0], self.dim))


async def _level(max_wait_ms: float, clients: int, seconds: float, model: TimedModel) -> dict[str, Any]:
    from service.embedder import MicroBatcher

    batcher = MicroBatcher(model, max_batch_size=64, max_wait_s=max_wait_ms / 1000.0, queue_size=4096)  # type: ignore[arg-type]
    batcher.start()
    image = torch.zeros((3, 4, 2))
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    warm_until = loop.time() + min(0.5, seconds / 4)
    stop_at = warm_until + seconds

    async def client() -> None:
        while (now := loop.time()) < stop_at:
            await batcher.embed(image)
            if now >= warm_until:
                latencies.append(loop.time() - now)

    model.batches.clear()
    try:
        await asyncio.gather(*(client() for _ in range(clients)))
    finally:
        await batcher.stop()
    return {
        "max_wait_ms": max_wait_ms,
        "clients": clients,
        "requests_per_s": round(len(latencies) / seconds, 1),
        **latency_ms(latencies, percentiles=(50, 99), digits=3),
        "mean_batch": round(statistics.fmean(model.batches), 2) if model.batches else 0.0,
    }


def run(quick: bool = False, device: str | None = None) -> dict[str, Any]:
    """Every (max_wait, clients) level, interleaved per clients so that drift hits all policies alike."""
    del device  # the stand-in model runs nowhere: the figures are the policy's
    seconds = 0.5 if quick else 3.0
    model = TimedModel(FIXED_MS, PER_IMAGE_MS)
    # The floor: one forward pass of batch 1 as this host's sleep() delivers it.
    floor = []
    for _ in range(50 if quick else 300):
        t0 = time.perf_counter()
        model.embed(torch.zeros((1, 3, 4, 2)))
        floor.append((time.perf_counter() - t0) * 1000.0)
    levels = []
    for clients in CLIENTS:
        for wait in WAITS_MS:
            level = asyncio.run(_level(wait, clients, seconds, model))
            logger.info("%s", level)
            levels.append(level)
    by_clients: dict[str, Any] = {}
    for clients in CLIENTS:
        rows = {lv["max_wait_ms"]: lv for lv in levels if lv["clients"] == clients}
        base = rows[max(WAITS_MS)]
        by_clients[str(clients)] = {
            f"wait_{w:g}_vs_{max(WAITS_MS):g}": {
                "p50": round(rows[w]["p50_ms"] / base["p50_ms"], 3),
                "requests_per_s": round(rows[w]["requests_per_s"] / base["requests_per_s"], 3),
            }
            for w in WAITS_MS
            if w != max(WAITS_MS)
        }
    return {
        "model": {"fixed_ms": FIXED_MS, "per_image_ms": round(PER_IMAGE_MS, 4), "kind": "sleep stand-in"},
        "forward_batch1_ms_median": round(statistics.median(floor), 3),
        "seconds_per_level": seconds,
        "levels": levels,
        "ratios": by_clients,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/batching-cpu.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    figures = run(args.quick)
    path = write_result(args.out, "batching", figures)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
