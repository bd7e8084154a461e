"""Benchmark: query latency from 32 concurrent clients while an ingestion job runs.

The scenario an operator lives with: a gallery being filled by an ingestion job while investigators
search it. Against a real ``reid serve`` process on 127.0.0.1:

1. **Reference**: 32 clients search the gallery (one query image each, k=10) with no job running;
   p50/p95/p99 latency and requests/s.
2. **Under ingestion**: an ingestion job over a synthetic Market-1501 gallery split fills the same
   gallery while the 32 clients search it, until the job ends (or a time/count bound). Latency
   percentiles, requests/s, the job's rate under load, and how many requests overlapped the job.

Every answer must be a 200 or an explicit 429/503; anything else (a 5xx, a dropped connection, an
unsorted result list, a lost request id) is counted as an error. The figures also hold the
service's own view: the search count of its ``/metrics`` (which must equal the requests sent), the
deepest embedding queue seen while scraping, and whether the running job's progress showed there.
``tests/service/test_load.py`` runs the same scenario, smaller, and asserts on these figures.

Run from the repository root::

    python -m bench.load --quick                    # seconds: tiny model, small job
    python -m bench.load --out bench/results/load-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
from PIL import Image

from bench.machine import write_result
from bench.server import FINAL_JOB_STATES, export_model, reid_server, serve_args, wait_job
from bench.timing import latency_ms

logger = logging.getLogger("bench.load")

CLIENTS = 32
SEARCH_ROUTE = "/v1/galleries/{gallery_id}/search"
#: Answers that are not errors: success, and the service's explicit "slow down" (rate limit) and
#: "busy" (embedding queue full) refusals.
ACCEPTED_STATUSES = frozenset({200, 429, 503})


@dataclass(frozen=True)
class Scenario:
    """The sizes of one run.

    Args:
        clients: concurrent HTTP clients (each one request at a time).
        arch: timm backbone of the exported model; input_size its (height, width).
        ids: identities of the synthetic Market-1501 set; images_per_id their images.
        prefill: random images uploaded to the gallery before anything else.
        reference_seconds: length of the reference phase (0: none).
        max_seconds / max_requests: bounds of the phase under ingestion (it also ends with the job).
        ingest_batch_size / ingest_pause_s: the job's batch size and pause between batches.
        k: results per query.
    """

    clients: int = CLIENTS
    arch: str = "resnet18"
    input_size: tuple[int, int] = (256, 128)
    ids: int = 120
    images_per_id: int = 12
    prefill: int = 32
    reference_seconds: float = 15.0
    max_seconds: float = 90.0
    max_requests: int = 100_000
    ingest_batch_size: int = 64
    ingest_pause_s: float = 0.0
    k: int = 10


def random_jpegs(n: int, seed: int, size: tuple[int, int] = (64, 128)) -> list[bytes]:
    """``n`` distinct random RGB JPEGs of (width, height) ``size``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


async def query_load(
    url: str,
    gallery_id: int,
    queries: list[bytes],
    *,
    clients: int,
    max_seconds: float,
    max_requests: int,
    k: int = 10,
    stop: asyncio.Event | None = None,
    tag: str = "load",
) -> dict[str, Any]:
    """``clients`` concurrent clients searching a gallery until a bound is reached or ``stop`` is set.

    Each request carries the ``X-Request-ID`` ``{tag}-{n}``, which the answer must echo.

    Returns:
        The phase's figures (see the module docstring), with ``completed_at``: the wall-clock time
        (epoch seconds) at which each request ended, to line the requests up with a job's run.
    """
    stop = stop or asyncio.Event()
    path = f"/v1/galleries/{gallery_id}/search"
    latencies: list[float] = []
    completed_at: list[float] = []
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    sent = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    def error(message: str) -> None:
        if len(errors) < 20:  # the first few tell the story
            errors.append(message)
        statuses["error"] += 1

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while not stop.is_set() and time.perf_counter() < deadline and sent < max_requests:
            n, sent = sent, sent + 1
            request_id = f"{tag}-{n}"
            image = queries[n % len(queries)]
            t0 = time.perf_counter()
            try:
                r = await client.post(
                    path,
                    files={"image": ("q.jpg", image, "image/jpeg")},
                    data={"k": str(k)},
                    headers={"X-Request-ID": request_id},
                )
            except httpx.HTTPError as exc:
                error(f"{request_id}: {type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - t0
            completed_at.append(time.time())
            if r.status_code not in ACCEPTED_STATUSES:
                error(f"{request_id}: HTTP {r.status_code}: {r.text[:300]}")
                continue
            if r.headers.get("x-request-id") != request_id:
                error(f"{request_id}: answered with request id {r.headers.get('x-request-id')!r}")
                continue
            statuses[str(r.status_code)] += 1
            if r.status_code == 200:
                results = r.json()["queries"][0]["results"]
                scores = [hit["score"] for hit in results]
                if len(results) > k or scores != sorted(scores, reverse=True):
                    error(f"{request_id}: {len(results)} results, scores not best first: {scores}")
                    continue
                latencies.append(elapsed)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    ok = statuses["200"]
    return {
        "clients": clients,
        "requests": sent,
        "ok": ok,
        "statuses": dict(statuses),
        "error_count": statuses["error"],
        "errors": errors,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(ok / elapsed, 2) if elapsed > 0 else None,
        **latency_ms(latencies),
        "completed_at": completed_at,
    }


def _epoch(value: str | None) -> float | None:
    """Epoch seconds of an ISO 8601 time from the API (UTC when it names no offset)."""
    if not value:
        return None
    parsed = dt.datetime.fromisoformat(value)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()


async def _watch(
    url: str, job_location: str, stop: asyncio.Event, labels: dict[str, str], period_s: float = 0.25
) -> dict[str, Any]:
    """Poll the job (set ``stop`` when it ends) and scrape ``/metrics`` while the load runs."""
    from service.http.prometheus import read_samples

    seen_progress, max_depth, scrapes = False, 0.0, 0
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            job = (await client.get(job_location)).json()
            if job["status"] in FINAL_JOB_STATES:
                stop.set()
                break
            text = (await client.get("/metrics")).text
            scrapes += 1
            seen_progress |= bool(read_samples(text, "reid_job_done_items", {"job_id": job["id"]}))
            depth = read_samples(text, "reid_embed_queue_depth", labels)
            max_depth = max([max_depth, *depth])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)
    return {"scrapes": scrapes, "job_progress_seen": seen_progress, "max_queue_depth": max_depth}


async def _under_ingestion(
    url: str,
    gallery_id: int,
    queries: list[bytes],
    job_location: str,
    scenario: Scenario,
    labels: dict[str, str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch(url, job_location, stop, labels))
    try:
        load = await query_load(
            url,
            gallery_id,
            queries,
            clients=scenario.clients,
            max_seconds=scenario.max_seconds,
            max_requests=scenario.max_requests,
            k=scenario.k,
            stop=stop,
            tag="ingest",
        )
    finally:
        stop.set()
        watched = await watcher
    return load, watched


def run_scenario(workdir: Path, scenario: Scenario, device: str = "cpu") -> dict[str, Any]:
    """Run the load scenario in ``workdir`` (dataset, model, database, server log); returns its figures.

    Figures beyond the module docstring's: ``log_path`` (the server's JSON log) and, for the test,
    ``search_requests_sent`` against ``metrics_search_requests``.
    """
    from training.data.registry import build_dataset
    from training.data.synthetic import write_synthetic

    datasets = workdir / "datasets"
    market = write_synthetic(
        datasets / "market",
        layout="market1501",
        ids=scenario.ids,
        images_per_id=scenario.images_per_id,
        seed=0,
        progress=False,
    )
    query_paths = [Path(s.path) for s in build_dataset("market1501", market).query]
    queries = [p.read_bytes() for p in query_paths[:64]]
    model_dir = export_model(workdir / "model", scenario.arch, scenario.input_size)
    args = serve_args(model_dir, f"sqlite:///{workdir / 'reid.sqlite3'}", workdir / "data", datasets, device)
    env = {
        "REID_INGEST_BATCH_SIZE": str(scenario.ingest_batch_size),
        "REID_INGEST_BATCH_PAUSE_S": str(scenario.ingest_pause_s),
        "REID_SNAPSHOT_INTERVAL_S": "3600",
        "REID_LOG_FORMAT": "json",
        # Latency under load is the question here, not the per-address limit (50/s by default),
        # which 32 clients on one address would reach on a fast machine.
        "REID_RATE_LIMIT_PER_S": "0",
    }
    log_path = workdir / "serve.log"
    with reid_server(args, env, log_path) as url, httpx.Client(base_url=url, timeout=120) as client:
        model = client.get("/v1/models/person").json()
        labels = {"model": "person", "version": model["version"]}
        r = client.post("/v1/galleries", json={"name": "load", "model": "person"})
        r.raise_for_status()
        gallery_id = r.json()["id"]
        prefill = random_jpegs(scenario.prefill, seed=1)
        for start in range(0, len(prefill), 16):
            files = [
                ("image", (f"p{i}.jpg", b, "image/jpeg")) for i, b in enumerate(prefill[start : start + 16])
            ]
            client.post(f"/v1/galleries/{gallery_id}/items", files=files).raise_for_status()
        # Warm-up at full concurrency: the first forward passes of each batch size, the allocator
        # and the thread pools are slow once, and belong to neither phase.
        warmup = asyncio.run(
            query_load(
                url,
                gallery_id,
                queries,
                clients=scenario.clients,
                max_seconds=60,
                max_requests=2 * scenario.clients,
                k=scenario.k,
                tag="warmup",
            )
        )
        if warmup["error_count"]:
            raise RuntimeError(f"the warm-up queries failed: {warmup['errors']}")

        reference = None
        if scenario.reference_seconds > 0:
            reference = asyncio.run(
                query_load(
                    url,
                    gallery_id,
                    queries,
                    clients=scenario.clients,
                    max_seconds=scenario.reference_seconds,
                    max_requests=scenario.max_requests,
                    k=scenario.k,
                    tag="reference",
                )
            )
            logger.info(
                "reference (no job): p50 %s ms, p95 %s ms, p99 %s ms, %s req/s",
                reference["p50_ms"],
                reference["p95_ms"],
                reference["p99_ms"],
                reference["requests_per_s"],
            )

        r = client.post(
            f"/v1/galleries/{gallery_id}/ingest-jobs",
            json={"source": {"layout": "market1501", "root": str(market), "split": "gallery"}},
        )
        r.raise_for_status()
        job_location = r.headers["location"]
        load, watched = asyncio.run(
            _under_ingestion(url, gallery_id, queries, job_location, scenario, labels)
        )
        job = wait_job(client, job_location)
        count = client.get(f"/v1/galleries/{gallery_id}").json()["count"]
        from service.http.prometheus import read_samples

        metrics = client.get("/metrics").text
        metrics_search = sum(read_samples(metrics, "reid_http_requests_total", {"route": SEARCH_ROUTE}))

    started, finished = _epoch(job.get("started_at")), _epoch(job.get("finished_at"))
    completed_at = load.pop("completed_at")
    overlapped = sum(
        1 for t in completed_at if started is not None and finished is not None and started <= t <= finished
    )
    if reference is not None:
        reference.pop("completed_at")
    job_seconds = (finished - started) if started is not None and finished is not None else None
    sent = warmup["requests"] + load["requests"] + (reference["requests"] if reference else 0)
    return {
        "device": device,
        "model": {"arch": scenario.arch, "input_size": list(scenario.input_size), "dim": model["dim"]},
        "gallery_items_before_job": scenario.prefill,
        "reference": reference,
        "under_ingestion": load,
        "job": {
            "status": job["status"],
            "images": job["total"],
            "done": job["done"],
            "failed": job["failed"],
            "skipped": job.get("skipped", 0),
            "seconds": round(job_seconds, 2) if job_seconds is not None else None,
            "images_per_s": round(job["done"] / job_seconds, 1) if job_seconds else None,
            "batch_size": scenario.ingest_batch_size,
            "pause_s": scenario.ingest_pause_s,
        },
        "requests_during_job": overlapped,
        "gallery_count_after": count,
        "metrics": {**watched, "search_requests": metrics_search},
        "search_requests_sent": sent,
        "log_path": str(log_path),
    }


def run(quick: bool = False, device: str | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); ``quick`` shrinks it to seconds."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    if quick:
        scenario = Scenario(
            arch="mobilenetv3_small_050",
            input_size=(128, 64),
            ids=24,
            images_per_id=8,
            reference_seconds=3.0,
            max_seconds=20.0,
            ingest_batch_size=8,
            ingest_pause_s=0.2,
        )
    elif on_gpu:
        scenario = Scenario(
            arch="resnet50", ids=1000, images_per_id=12, ingest_batch_size=256, max_seconds=120
        )
    else:
        scenario = Scenario()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="reid-bench-load-") as tmp:
        figures = run_scenario(Path(tmp), scenario, device)
    figures.pop("log_path")
    # Other processes' load on the machine, which every figure here shares (1-minute averages).
    figures["load_average_start_end"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and job: seconds")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/load-{cpu,gpu}.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    figures = run(args.quick, args.device)
    kind = "gpu" if figures["device"].startswith("cuda") else "cpu"
    out = Path(args.out or f"bench/results/load-{kind}{'-quick' if args.quick else ''}.json")
    write_result(out, "load", figures)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
