"""Benchmark: the retrieval service's ingestion throughput against the model's own, and query latency.

One run, one machine, every figure beside its reference:

1. **Pure forward throughput** of the exported model in this process: preprocessed batches of the
   ingestion batch size through ``LoadedModel.embed`` (warm-up excluded), images/s.
2. **Ingestion throughput** of a real ``reid serve`` process on 127.0.0.1 running an ingestion job
   over a synthetic Market-1501 gallery split (read, hash, decode, preprocess, embed, commit to the
   database, add to the index): images/s from the job's own start and finish times, and its ratio to
   (1). The goal is to be model-bound: close to 1.0.
3. **Query latency** at 1, 8 and 32 concurrent HTTP clients against a 100k-item gallery (random unit
   embeddings written straight into the database, so the server's start-up also measures an index
   rebuild from stored embeddings): each request uploads one query image and asks for k=10;
   p50/p95/p99 and requests/s over a fixed time per level.

Run from the repository root::

    python -m bench.service                 # cuda if available, else cpu
    python -m bench.service --quick         # small model, small gallery, seconds per level
    python -m bench.service --device cpu --out bench/results/service-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import torch
from PIL import Image

from bench.machine import write_result
from bench.server import export_model, reid_server, serve_args, wait_job

logger = logging.getLogger("bench.service")

CONCURRENCY = (1, 8, 32)


def forward_throughput(model_dir: Path, images: list[Path], device: str, batch: int, seconds: float) -> float:
    """Images/s of ``LoadedModel.embed`` on preprocessed batches (the model alone)."""
    from training.export import load_model

    model = load_model(model_dir, device=device)
    with Image.open(images[0]) as img:
        tensor = model.preprocess(img.convert("RGB"))
    x = tensor[None].expand(batch, *tensor.shape).contiguous()
    for _ in range(3):  # warm-up: oneDNN/cuDNN kernel selection and the allocator take a few batches
        model.embed(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 5 * batch:
        model.embed(x)  # returns on the CPU: includes the copy back, as the service's does
        done += batch
    return done / (time.perf_counter() - start)


@contextlib.contextmanager
def serve(args: list[str], env: dict[str, str], log: Path) -> Iterator[tuple[str, float]]:
    """A quiet ``reid serve`` subprocess; yields (base URL, seconds until it was ready)."""
    start = time.perf_counter()
    # A 100k-item gallery is rebuilt from the database at start-up: allow it ten minutes.
    with reid_server(args, env, log, log_level="warning", timeout=600) as url:
        yield url, time.perf_counter() - start


def insert_random_gallery(
    database_url: str, gallery_id: int, model_id: int, dim: int, n: int, seed: int
) -> None:
    """Write ``n`` items with random unit embeddings (and their log entries) straight into the database."""
    from sqlalchemy import insert

    from service.db.models import Embedding, Item, Operation, utcnow
    from service.db.session import create_db_engine

    rng = np.random.default_rng(seed)
    engine = create_db_engine(database_url)
    now = utcnow()
    chunk = 10_000
    with engine.begin() as conn:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            vectors = rng.standard_normal((m, dim), dtype=np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            items = [
                {
                    "gallery_id": gallery_id,
                    "identity": str(int(rng.integers(0, n // 10 + 1))),
                    "camera": str(int(rng.integers(0, 8))),
                    "captured_at": now - dt.timedelta(seconds=int(rng.integers(0, 30 * 86400))),
                    "source_path": None,
                    "content_hash": hashlib.sha256(f"{seed}-{start + i}".encode()).hexdigest(),
                    "image_format": "JPEG",
                    "width": 64,
                    "height": 128,
                    "status": "active",
                    "created_at": now,
                }
                for i in range(m)
            ]
            ids = list(conn.scalars(insert(Item).returning(Item.id, sort_by_parameter_order=True), items))
            conn.execute(
                insert(Embedding),
                [
                    {"item_id": i, "model_id": model_id, "vector": vectors[j].tobytes()}
                    for j, i in enumerate(ids)
                ],
            )
            conn.execute(
                insert(Operation),
                [
                    {
                        "gallery_id": gallery_id,
                        "item_id": i,
                        "model_id": model_id,
                        "op": "add",
                        "created_at": now,
                    }
                    for i in ids
                ],
            )
    engine.dispose()


async def _latency_level(url: str, path: str, image: bytes, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = await client.post(path, files={"image": ("q.jpg", image, "image/jpeg")}, data={"k": "10"})
            dt_s = time.perf_counter() - t0
            if r.status_code == 200:
                latencies.append(dt_s)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for _ in range(3):  # warm-up
            await client.post(path, files={"image": ("q.jpg", image, "image/jpeg")}, data={"k": "10"})
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000.0
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 2) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 2) if len(ms) else None,
        "p99_ms": round(float(np.percentile(ms, 99)), 2) if len(ms) else None,
        "mean_ms": round(float(statistics.fmean(ms)), 2) if len(ms) else None,
    }


def run(
    quick: bool = False,
    device: str | None = None,
    *,
    arch: str | None = None,
    gallery_size: int | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns its figures (see the module docstring)."""
    from training.data.registry import build_dataset
    from training.data.synthetic import write_synthetic

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    arch = arch or ("mobilenetv3_small_050" if quick else ("resnet50" if on_gpu else "resnet18"))
    size = (128, 64) if quick else (256, 128)
    gallery_size = gallery_size or (5_000 if quick else 100_000)
    batch = 64 if quick or not on_gpu else 256
    level_seconds = 1.0 if quick else 15.0
    ids = 12 if quick else (400 if on_gpu else 120)

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="reid-bench-service-") as tmp_name:
        tmp = Path(tmp_name)
        datasets = tmp / "datasets"
        market = write_synthetic(
            datasets / "market", layout="market1501", ids=ids, images_per_id=12, seed=0, progress=False
        )
        gallery_images = [Path(s.path) for s in build_dataset("market1501", market).gallery]
        model_dir = export_model(tmp / "model", arch, size)
        forward_seconds = 1.0 if quick else 10.0
        forward_before = forward_throughput(model_dir, gallery_images, device, batch, forward_seconds)
        logger.info("pure forward: %.1f images/s (%s, batch %d, %s)", forward_before, arch, batch, device)

        database_url = f"sqlite:///{tmp / 'reid.sqlite3'}"
        args = serve_args(model_dir, database_url, tmp / "data", datasets, device)
        env = {
            "REID_INGEST_BATCH_SIZE": str(batch),
            "REID_DECODE_THREADS": str(max(2, (os.cpu_count() or 2))),
            "REID_SNAPSHOT_INTERVAL_S": "3600",
            # Latency under load is the figure; the per-client rate limit would answer 429s instead.
            "REID_RATE_LIMIT_PER_S": "0",
        }
        log = tmp / "serve.log"
        with serve(args, env, log) as (url, _), httpx.Client(base_url=url, timeout=60) as client:
            model = client.get("/v1/models/person").json()
            ingest_gallery = client.post("/v1/galleries", json={"name": "ingest", "model": "person"}).json()
            r = client.post(
                f"/v1/galleries/{ingest_gallery['id']}/ingest-jobs",
                json={"source": {"layout": "market1501", "root": str(market)}},
            )
            job = wait_job(client, r.headers["location"])
            if job["status"] != "succeeded":
                raise RuntimeError(f"ingestion job failed: {job}")
            started = dt.datetime.fromisoformat(job["started_at"])
            finished = dt.datetime.fromisoformat(job["finished_at"])
            ingest_rate = job["done"] / max((finished - started).total_seconds(), 1e-9)
            big = client.post("/v1/galleries", json={"name": "big", "model": "person"}).json()
        # The reference is measured right before and right after the job, so slow drift (thermal,
        # other load on the machine) hits both sides alike.
        forward_after = forward_throughput(model_dir, gallery_images, device, batch, forward_seconds)
        forward = (forward_before + forward_after) / 2
        logger.info("ingestion: %.1f images/s (%.2fx the forward pass)", ingest_rate, ingest_rate / forward)

        with Path(gallery_images[0]).open("rb") as fh:
            query = fh.read()
        from sqlalchemy import select

        from service.db.models import ModelRow
        from service.db.session import create_db_engine

        engine = create_db_engine(database_url)
        with engine.connect() as conn:
            model_id = conn.scalar(select(ModelRow.id).where(ModelRow.version == model["version"]))
        engine.dispose()
        t0 = time.perf_counter()
        insert_random_gallery(database_url, big["id"], model_id, model["dim"], gallery_size, seed=1)
        insert_s = time.perf_counter() - t0
        latency = []
        with serve(args, env, log) as (url, ready_s):
            with httpx.Client(base_url=url, timeout=60) as client:
                count = client.get(f"/v1/galleries/{big['id']}").json()["index"]["size"]
            for clients in CONCURRENCY:
                level = asyncio.run(
                    _latency_level(url, f"/v1/galleries/{big['id']}/search", query, clients, level_seconds)
                )
                logger.info(
                    "%2d clients: p50 %.1f ms, p95 %.1f ms, p99 %.1f ms, %.1f req/s",
                    clients,
                    level["p50_ms"],
                    level["p95_ms"],
                    level["p99_ms"],
                    level["requests_per_s"],
                )
                latency.append(level)

    return {
        "device": device,
        # Other processes' load on the machine, which every figure here shares (1-minute averages).
        "load_average_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "model": {"arch": arch, "input_size": list(size), "dim": model["dim"], "dtype": model["dtype"]},
        "batch_size": batch,
        "forward_images_per_s": round(forward, 1),
        "forward_images_per_s_before_after": [round(forward_before, 1), round(forward_after, 1)],
        "ingest": {
            "images": job["done"],
            "images_per_s": round(ingest_rate, 1),
            "ratio_to_forward": round(ingest_rate / forward, 3),
            "database": "sqlite",
        },
        "query": {
            "gallery_items": count,
            "index": "faiss flat (exact)",
            "k": 10,
            "seconds_per_level": level_seconds,
            "startup_with_rebuild_s": round(ready_s, 2),
            "direct_insert_s": round(insert_s, 2),
            "levels": latency,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and gallery, 1 s per level")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--arch", default=None, help="timm backbone (default: resnet18 on CPU, resnet50 on GPU)"
    )
    parser.add_argument("--gallery-size", type=int, default=None, help="items in the search gallery")
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/service-{cpu,gpu}.json)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    figures = run(args.quick, args.device, arch=args.arch, gallery_size=args.gallery_size)
    kind = "gpu" if figures["device"].startswith("cuda") else "cpu"
    out = Path(args.out or f"bench/results/service-{kind}{'-quick' if args.quick else ''}.json")
    write_result(out, "service", figures)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
