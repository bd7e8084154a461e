"""Benchmark: the retrieval service's ingestion throughput against the model's own, and query latency
against the model forward plus an exact search.

One run, one machine, every figure beside its reference:

1. **Pure forward throughput** of the exported model in this process: preprocessed batches of the
   ingestion batch size through ``LoadedModel.embed`` (warm-up excluded), images/s.
2. **Ingestion throughput** of a real ``reid serve`` process on 127.0.0.1 running an ingestion job
   over a synthetic Market-1501 gallery split (read, hash, decode, preprocess, embed, commit to the
   database, add to the index): images/s from the job's own start and finish times, and its ratio to
   (1). The goal is to be model-bound: close to 1.0.
3. **Query latency** at 1, 8 and 32 concurrent HTTP clients against a large gallery (1M items on a
   GPU, 100k on a CPU): each request uploads one 64x128 JPEG and asks for k=10; p50/p95/p99 and
   requests/s over a fixed time per level. The gallery's random unit embeddings are written straight
   into the database (items, embeddings), and the server loads them the way it loads any gallery at
   start-up: from an index snapshot written by the service's own ``IndexManager`` (the default), or
   by rebuilding the index from the stored embeddings (``--gallery-start rebuild``). Beside them,
   the same client's empty request (``GET /health/live``): what HTTP alone costs. The micro-batcher's
   ``max_wait_ms`` (the service's default unless ``--max-wait-ms``) is recorded with the figures.
4. **The reference of (3)**, in this process, on the same device, with the same exported model and
   the same query image: the batch-1 forward of the model loaded as the service loads it
   (``training.export.load_model`` with the service's half-precision and CUDA-graph choices), on an
   input already on the device, plus a bare matrix product + top-k (k=10) over a gallery of the same
   size and dimension in the device and dtype the service's index uses (the torch index: float16 on
   a GPU; FAISS flat on a CPU: float32). Medians, in rounds before the server starts, between the
   levels (the server idle) and after it stops; the lowest median of each part counts.
   ``ratio_to_reference`` is the 1-client p50 (and p99) over ``forward_ms + search_ms``; the issue's
   goal is <= 2 on a GPU.

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
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from bench.machine import write_result
from bench.server import export_model, reid_server, serve_args, wait_job
from bench.timing import latency_ms, synchronize

logger = logging.getLogger("bench.service")

CONCURRENCY = (1, 8, 32)
#: Results per query, in the HTTP requests and in the reference search.
K = 10
#: How the server gets the search gallery's index at start-up (see the module docstring).
GALLERY_STARTS = ("snapshot", "rebuild")
#: The issue's goal for the 1-client p50 over the reference, on a GPU.
GOAL_RATIO = 2.0
#: Rows written per database transaction (and added to the index at once).
INSERT_CHUNK = 20_000


class GalleryStartError(ValueError):
    """The search gallery cannot be prepared the way that was asked for."""


@dataclass(frozen=True)
class Plan:
    """Sizes and models of one run (see :func:`plan`)."""

    device: str
    quick: bool
    arch: str
    input_size: tuple[int, int]
    gallery_size: int
    batch: int
    forward_seconds: float
    level_seconds: float
    ids: int
    reference_seconds: float
    reference_min_iters: int

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")


def plan(quick: bool, device: str, *, arch: str | None = None, gallery_size: int | None = None) -> Plan:
    """The run's sizes: a 1M-item gallery and ViT-S/16 on a GPU, 100k and ResNet-18 on a CPU.

    On a GPU the model is ViT-S/16 (384-d embeddings): one of the issue's ingestion models, and a
    1M x 384 gallery is 1.5 GB of float32 in SQLite, written in about 55 s (one core: SQLite and
    SQLAlchemy, measured on the project's 2-core machine); ResNet-50's 2048-d embeddings would be
    8 GB and five times as long. ``quick`` shrinks everything to seconds.
    """
    on_gpu = device.startswith("cuda")
    default_arch = "mobilenetv3_small_050" if quick else ("vit_small_patch16_224" if on_gpu else "resnet18")
    default_size = 5_000 if quick else (1_000_000 if on_gpu else 100_000)
    return Plan(
        device=device,
        quick=quick,
        arch=arch or default_arch,
        input_size=(128, 64) if quick else (256, 128),
        gallery_size=gallery_size or default_size,
        batch=64 if quick or not on_gpu else 256,
        forward_seconds=1.0 if quick else (3.0 if on_gpu else 10.0),
        level_seconds=1.0 if quick else (10.0 if on_gpu else 15.0),
        ids=12 if quick else (400 if on_gpu else 120),
        reference_seconds=0.2 if quick else (0.5 if on_gpu else 2.0),
        reference_min_iters=5 if quick else (200 if on_gpu else 20),
    )


# ------------------------------------------------------------------------------------- timing


def timed_ms(
    fn: Callable[[], Any], device: str | torch.device, *, min_iters: int, seconds: float, warmup: int = 5
) -> dict[str, float]:
    """Median and p95 of ``fn``'s wall time, synchronised with the device (what a caller waits), in ms.

    Runs at least ``min_iters`` calls and at least ``seconds``, after ``warmup`` calls.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - t0))
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 4),
        "p95_ms": round(times[min(len(times) - 1, round(0.95 * (len(times) - 1)))], 4),
        "iters": len(times),
    }


def forward_throughput(
    model_dir: Path, images: list[Path], device: str, batch: int, seconds: float, runtime: str = "torch"
) -> float:
    """Images/s of ``LoadedModel.embed`` on preprocessed batches (the model alone, on ``runtime``)."""
    from training.export import load_model

    model = load_model(model_dir, device=device, runtime=runtime)
    with Image.open(images[0]) as img:
        tensor = model.preprocess(img.convert("RGB"))
    x = tensor[None].expand(batch, *tensor.shape).contiguous()
    for _ in range(3):  # warm-up: oneDNN/cuDNN kernel selection and the allocator take a few batches
        model.embed(x)
    synchronize(device)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 5 * batch:
        model.embed(x)  # returns on the CPU: includes the copy back, as the service's does
        done += batch
    return done / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------- server


@contextlib.contextmanager
def serve(args: list[str], env: dict[str, str], log: Path) -> Iterator[tuple[str, float]]:
    """A quiet ``reid serve`` subprocess; yields (base URL, seconds until it was ready)."""
    start = time.perf_counter()
    # A large gallery is loaded (or rebuilt from the database) at start-up: allow it ten minutes.
    with reid_server(args, env, log, log_level="warning", timeout=600) as url:
        yield url, time.perf_counter() - start


# ------------------------------------------------------------------------------------- gallery


@dataclass(frozen=True)
class GalleryRows:
    """What :func:`insert_random_gallery` wrote: ids (ascending), unit vectors and index attributes.

    The attributes are computed as the service computes them from the rows
    (:func:`service.gallery_index.item_attributes`), so an index built from these arrays is the
    index the service would rebuild from the database.
    """

    ids: np.ndarray
    vectors: np.ndarray
    attributes: Any  # index.Attributes

    def __len__(self) -> int:
        return len(self.ids)


def insert_random_gallery(
    database_url: str,
    gallery_id: int,
    model_id: int,
    dim: int,
    n: int,
    seed: int,
    *,
    log_operations: bool = True,
    chunk: int = INSERT_CHUNK,
) -> GalleryRows:
    """Write ``n`` items with random unit embeddings straight into the database; returns what was written.

    Args:
        database_url: the service's database (schema already at head).
        gallery_id, model_id: the gallery and the model version the embeddings belong to.
        dim: embedding dimension.
        n: items to write.
        seed: seed of every random choice (vectors, identities, cameras, times, content hashes).
        log_operations: also write one ``add`` operation per item, as a service that never took a
            snapshot holds them; a snapshot prunes them, so a gallery served from a snapshot has none.
        chunk: rows per transaction (bounds SQLite's write-ahead log).
    """
    from sqlalchemy.orm import sessionmaker

    from index import Attributes
    from service.db.session import create_db_engine, transaction
    from service.db.tables import utcnow
    from service.gallery_index import attribute_code, epoch
    from service.item_writer import NewItem, insert_items

    rng = np.random.default_rng(seed)
    now = utcnow()
    ids = np.empty(n, dtype=np.int64)
    vectors = np.empty((n, dim), dtype=np.float32)
    identity = rng.integers(0, n // 10 + 1, n)
    camera = rng.integers(0, 8, n)
    seconds_ago = rng.integers(0, 30 * 86400, n)
    captured = [now - dt.timedelta(seconds=int(s)) for s in seconds_ago]
    engine = create_db_engine(database_url)
    sessions = sessionmaker(engine)
    try:
        with tqdm(total=n, desc="gallery rows", unit="item", disable=None, mininterval=5) as bar:
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                block = rng.standard_normal((m, dim), dtype=np.float32)
                block /= np.linalg.norm(block, axis=1, keepdims=True)
                vectors[start : start + m] = block
                # Random 256-bit content hashes: unique, and cheaper than hashing a million strings.
                hashes = rng.bytes(32 * m).hex()
                new_items = [
                    NewItem(
                        content_hash=hashes[64 * i : 64 * (i + 1)],
                        image_format="JPEG",
                        width=64,
                        height=128,
                        identity=str(identity[start + i]),
                        camera=str(camera[start + i]),
                        captured_at=captured[start + i],
                    )
                    for i in range(m)
                ]
                with transaction(sessions) as session:
                    stored, _ = insert_items(
                        session,
                        gallery_id,
                        new_items,
                        {model_id: block},
                        [model_id],
                        log_operations=log_operations,
                    )
                ids[start : start + m] = [item.id for item in stored]
                bar.update(m)
    finally:
        engine.dispose()
    # Attribute codes per distinct value: a million hashes of the same few strings would be waste.
    camera_codes = np.array([attribute_code(str(c)) for c in range(8)], dtype=np.int64)
    values, inverse = np.unique(identity, return_inverse=True)
    identity_codes = np.array([attribute_code(str(v)) for v in values], dtype=np.int64)[inverse]
    attributes = Attributes(
        camera=camera_codes[camera],
        captured_at=np.array([epoch(c) for c in captured], dtype=np.float64),
        identity=identity_codes,
    )
    return GalleryRows(ids=ids, vectors=vectors, attributes=attributes)


def _slice_attributes(attributes: Any, start: int, stop: int) -> Any:
    from index import Attributes

    return Attributes(**{name: getattr(attributes, name)[start:stop] for name in Attributes.FIELDS})


def snapshot_gallery(
    database_url: str,
    snapshot_dir: Path,
    gallery_id: int,
    model_id: int,
    rows: GalleryRows,
    *,
    backend: str,
    chunk: int = INSERT_CHUNK,
) -> Path:
    """Write the index of ``rows`` as the service's own snapshot of the gallery; returns its folder.

    Uses the service's :class:`~service.gallery_index.IndexManager` (the index backend the server
    runs, the snapshot folder and database record it loads at start-up), so the server starts as
    after any restart of a service that holds this gallery: snapshot load, then log replay (empty).
    No server may run on the database meanwhile.

    Raises:
        GalleryStartError: the backend keeps its data outside snapshots (milvus).
    """
    from sqlalchemy import func, select

    from service.db.session import create_db_engine, make_session_factory
    from service.db.tables import Gallery, Operation
    from service.gallery_index import IndexManager

    if backend not in ("faiss", "torch"):
        raise GalleryStartError(
            f"index backend {backend!r} keeps its data outside snapshot folders: use --gallery-start rebuild"
        )
    engine = create_db_engine(database_url)
    sessions = make_session_factory(engine)
    manager = IndexManager(sessions, snapshot_dir, backend=backend)
    try:
        with sessions() as session:
            gallery = session.get(Gallery, gallery_id)
            if gallery is None or gallery.model_id != model_id:
                raise GalleryStartError(f"gallery {gallery_id} with model {model_id} is not in the database")
            spec, dim = gallery.index_spec, gallery.model.dim
            last_seq = session.scalar(
                select(func.max(Operation.seq)).where(Operation.gallery_id == gallery_id)
            )
        gi = manager.create_empty(gallery_id, model_id, dim, spec, last_seq=int(last_seq or 0))
        for start in range(0, len(rows), chunk):
            stop = min(len(rows), start + chunk)
            gi.add(
                rows.ids[start:stop],
                rows.vectors[start:stop],
                _slice_attributes(rows.attributes, start, stop),
            )
        manager.snapshot(gallery_id, model_id, force=True)
        return manager.snapshot_path(gallery_id, model_id)
    finally:
        manager.close()
        engine.dispose()


def drop_snapshot(database_url: str, snapshot_dir: Path, gallery_id: int, model_id: int) -> None:
    """Forget a gallery's index snapshots (records and folder), so that the next start-up rebuilds it.

    Done by the service's own ``IndexManager.drop_index``; no server may run on the database meanwhile.
    """
    from service.db.session import create_db_engine, make_session_factory
    from service.gallery_index import IndexManager

    engine = create_db_engine(database_url)
    manager = IndexManager(make_session_factory(engine), snapshot_dir)
    try:
        manager.register_gallery(gallery_id, model_id)
        manager.drop_index(gallery_id, model_id)
    finally:
        manager.close()
        engine.dispose()


# ------------------------------------------------------------------------------------- reference


def index_placement(backend: str, dim: int) -> tuple[torch.device, torch.dtype]:
    """Device and dtype in which the service's index of this backend searches, on this machine.

    Read from a real empty index of the backend with the service's default options, not guessed:
    the torch index searches float16 on a GPU and float32 on a CPU; FAISS flat float32 on the CPU
    (or on a GPU with a faiss-gpu wheel, float16 when its options say so).
    """
    from index import create_index

    index = create_index(backend=backend, spec="flat", dim=dim)
    try:
        device = torch.device(getattr(index, "device", "cuda" if index.capabilities.gpu else "cpu"))
        exact_dtype = torch.float32 if index.capabilities.exact else torch.float16
        dtype = getattr(index, "dtype", exact_dtype)
    finally:
        close = getattr(index, "close", None)
        if callable(close):
            close()
    return device, dtype


class QueryReference:
    """The floor of one HTTP query: batch-1 forward + exact search, measured in this process.

    Args:
        model_dir: the exported model the service serves.
        device: the service's model device.
        query_jpeg: the query the HTTP clients upload.
        gallery: (n, dim) float32 unit vectors of the served gallery.
        search_device, search_dtype: where and in what precision the service's index searches.
        k: results per query.
        runtime: the service's runtime (``torch``, ``onnx`` or ``auto``).

    The model is loaded as the service loads it (``service.app``): its runtime, half precision and
    CUDA graphs on CUDA, float32 eager on a CPU, no compile. Its input is already on the device, and
    nothing is copied back: what remains is the model and the search themselves.
    """

    def __init__(
        self,
        model_dir: Path,
        device: str,
        query_jpeg: bytes,
        gallery: np.ndarray,
        search_device: torch.device,
        search_dtype: torch.dtype,
        k: int = K,
        runtime: str = "torch",
    ) -> None:
        import io

        from training.export import load_model

        on_cuda = torch.device(device).type == "cuda"
        self.model = load_model(
            model_dir, device=device, half_precision=on_cuda, cuda_graphs=on_cuda, runtime=runtime
        )
        engine = self.model.engine
        assert engine is not None
        self.engine = engine
        with Image.open(io.BytesIO(query_jpeg)) as img:
            tensor = self.model.preprocess(img.convert("RGB"))
        self.x = engine.prepare_input(tensor[None])
        self.search_device = search_device
        self.search_dtype = search_dtype
        self.k = k
        with torch.inference_mode():
            # The query's own embedding: (1, dim) float32, L2-normalised, on the model's device.
            self.q = engine(self.x).to(search_device, dtype=search_dtype)
            self.gallery = torch.from_numpy(gallery).to(search_device, dtype=search_dtype)
        self.device = device

    def forward(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.engine(self.x)

    def search(self) -> Any:
        with torch.inference_mode():
            return torch.topk(self.q @ self.gallery.T, self.k, dim=1)

    def measure(self, *, min_iters: int, seconds: float) -> dict[str, Any]:
        """Median batch-1 forward and search times (ms) and their sum."""
        forward = timed_ms(self.forward, self.device, min_iters=min_iters, seconds=seconds)
        search = timed_ms(self.search, self.search_device, min_iters=min_iters, seconds=seconds)
        return {
            "forward": forward,
            "search": search,
            "reference_ms": round(forward["median_ms"] + search["median_ms"], 4),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "model_device": str(self.model.device),
            "model_dtype": str(self.model.dtype).removeprefix("torch."),
            "model_runtime": self.model.runtime,
            "cuda_graphs": self.engine.graphs is not None,
            "search_device": str(self.search_device),
            "search_dtype": str(self.search_dtype).removeprefix("torch."),
            "gallery_shape": list(self.gallery.shape),
            "k": self.k,
        }


def combine_references(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference from its rounds of measurement (before, between and after the latency levels).

    Each part takes the lowest of its medians: other work on the machine can only slow a round
    down, and a slowed reference would flatter the service's ratio to it.
    """
    if not rounds:
        raise ValueError("the reference needs at least one round of measurement")
    forward_ms = min(r["forward"]["median_ms"] for r in rounds)
    search_ms = min(r["search"]["median_ms"] for r in rounds)
    return {
        "forward_ms": round(forward_ms, 4),
        "search_ms": round(search_ms, 4),
        "reference_ms": round(forward_ms + search_ms, 4),
        "rounds": [
            {
                "forward_ms": r["forward"]["median_ms"],
                "search_ms": r["search"]["median_ms"],
                "iters": [r["forward"]["iters"], r["search"]["iters"]],
            }
            for r in rounds
        ],
    }


def ratios_to_reference(level: dict[str, Any], reference_ms: float) -> dict[str, float | None]:
    """A latency level's p50 and p99 over the reference (None when the level answered nothing)."""

    def ratio(value: float | None) -> float | None:
        return None if value is None else round(value / reference_ms, 2)

    return {"p50": ratio(level["p50_ms"]), "p99": ratio(level["p99_ms"])}


# ------------------------------------------------------------------------------------- latency


@contextlib.contextmanager
def _quiet_http_client() -> Iterator[None]:
    """Keep httpx from logging every request (at INFO) while latency is measured in this process."""
    httpx_logger = logging.getLogger("httpx")
    level = httpx_logger.level
    httpx_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        httpx_logger.setLevel(level)


async def _latency_level(url: str, path: str, image: bytes, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = 0.0  # set after the warm-up, which must not eat the level's time

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = await client.post(path, files={"image": ("q.jpg", image, "image/jpeg")}, data={"k": str(K)})
            dt_s = time.perf_counter() - t0
            if r.status_code == 200:
                latencies.append(dt_s)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for _ in range(3):  # warm-up
            await client.post(path, files={"image": ("q.jpg", image, "image/jpeg")}, data={"k": str(K)})
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed, 2),
        **latency_ms(latencies),
    }


async def _round_trip_ms(url: str, seconds: float) -> dict[str, Any]:
    """Median and p99 of an empty request (``GET /health/live``) by one client: HTTP's own share."""
    times: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for _ in range(3):  # warm-up
            await client.get("/health/live")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 10:
            t0 = time.perf_counter()
            r = await client.get("/health/live")
            r.raise_for_status()
            times.append(time.perf_counter() - t0)
    return {"requests": len(times), **latency_ms(times, percentiles=(50, 99), digits=3)}


# ------------------------------------------------------------------------------------- run


def run(
    quick: bool = False,
    device: str | None = None,
    *,
    arch: str | None = None,
    gallery_size: int | None = None,
    gallery_start: str = "snapshot",
    index_backend: str | None = None,
    max_wait_ms: float | None = None,
    runtime: str | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns its figures (see the module docstring).

    Args:
        quick: tiny model and gallery, one second per level (tests).
        device: ``cpu`` or ``cuda`` (default: cuda when available).
        arch: timm backbone of the served model (default: see :func:`plan`).
        gallery_size: items of the search gallery (default: see :func:`plan`).
        gallery_start: ``snapshot`` or ``rebuild`` (see the module docstring).
        index_backend: the servers' ``REID_INDEX_BACKEND`` (default: theirs, i.e. the environment's
            or the service's default); the figures record the backend the server reports.
        max_wait_ms: the servers' ``REID_MAX_WAIT_MS`` (default: the service's).
        runtime: the servers' ``REID_RUNTIME`` (default: the environment's or the service's), also
            used by the in-process references; the model is exported with ``model.onnx`` so that
            ``auto`` and ``onnx`` can use ONNX Runtime.
    """
    from sqlalchemy import select

    from service.db.session import create_db_engine
    from service.db.tables import ModelRow
    from service.settings import Settings
    from training.data.registry import build_dataset
    from training.data.synthetic import write_synthetic

    if gallery_start not in GALLERY_STARTS:
        raise GalleryStartError(f"gallery_start must be one of {GALLERY_STARTS}, got {gallery_start!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    p = plan(quick, device, arch=arch, gallery_size=gallery_size)
    runtime = runtime or os.environ.get("REID_RUNTIME") or str(Settings.model_fields["runtime"].default)

    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="reid-bench-service-") as tmp_name:
        tmp = Path(tmp_name)
        datasets = tmp / "datasets"
        market = write_synthetic(
            datasets / "market", layout="market1501", ids=p.ids, images_per_id=12, seed=0, progress=False
        )
        gallery_images = [Path(s.path) for s in build_dataset("market1501", market).gallery]
        model_dir = export_model(tmp / "model", p.arch, p.input_size, onnx=True)
        forward_before = forward_throughput(
            model_dir, gallery_images, device, p.batch, p.forward_seconds, runtime
        )
        logger.info("pure forward: %.1f images/s (%s, batch %d, %s)", forward_before, p.arch, p.batch, device)

        database_url = f"sqlite:///{tmp / 'reid.sqlite3'}"
        data_dir = tmp / "data"
        args = serve_args(model_dir, database_url, data_dir, datasets, device)
        env = {
            "REID_INGEST_BATCH_SIZE": str(p.batch),
            "REID_DECODE_THREADS": str(max(2, (os.cpu_count() or 2))),
            "REID_SNAPSHOT_INTERVAL_S": "3600",
            # Latency under load is the figure; the per-client rate limit would answer 429s instead.
            "REID_RATE_LIMIT_PER_S": "0",
            "REID_RUNTIME": runtime,
        }
        if index_backend is not None:
            env["REID_INDEX_BACKEND"] = index_backend
        if max_wait_ms is not None:
            env["REID_MAX_WAIT_MS"] = str(max_wait_ms)
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
        forward_after = forward_throughput(
            model_dir, gallery_images, device, p.batch, p.forward_seconds, runtime
        )
        forward = (forward_before + forward_after) / 2
        logger.info("ingestion: %.1f images/s (%.2fx the forward pass)", ingest_rate, ingest_rate / forward)

        query = gallery_images[0].read_bytes()
        with Image.open(gallery_images[0]) as img:
            query_size = list(img.size)
        engine = create_db_engine(database_url)
        with engine.connect() as conn:
            model_id = conn.scalar(select(ModelRow.id).where(ModelRow.version == model["version"]))
        engine.dispose()
        backend = big["index"]["backend"]  # what the server runs, whoever chose it

        t0 = time.perf_counter()
        rows = insert_random_gallery(
            database_url,
            big["id"],
            model_id,
            model["dim"],
            p.gallery_size,
            seed=1,
            log_operations=gallery_start == "rebuild",
        )
        insert_s = time.perf_counter() - t0
        logger.info("%d gallery rows written in %.1f s", len(rows), insert_s)
        t0 = time.perf_counter()
        if gallery_start == "snapshot":
            snapshot_gallery(database_url, data_dir / "snapshots", big["id"], model_id, rows, backend=backend)
        else:
            # The first server snapshotted the empty gallery at shutdown: without this, the next
            # start-up would replay the operation log onto that snapshot rather than rebuild.
            drop_snapshot(database_url, data_dir / "snapshots", big["id"], model_id)
        prepare_s = time.perf_counter() - t0
        gc.collect()  # the snapshot's index copy: give its (device) memory back before the server starts
        if p.on_gpu:
            torch.cuda.empty_cache()

        search_device, search_dtype = index_placement(backend, model["dim"])
        reference = QueryReference(
            model_dir, device, query, rows.vectors, search_device, search_dtype, runtime=runtime
        )
        rounds = [reference.measure(min_iters=p.reference_min_iters, seconds=p.reference_seconds)]
        latency = []
        with serve(args, env, log) as (url, ready_s), _quiet_http_client():
            with httpx.Client(base_url=url, timeout=60) as client:
                served = client.get(f"/v1/galleries/{big['id']}").json()
            round_trip = asyncio.run(_round_trip_ms(url, min(2.0, p.level_seconds)))
            for clients in CONCURRENCY:
                level = asyncio.run(
                    _latency_level(url, f"/v1/galleries/{big['id']}/search", query, clients, p.level_seconds)
                )
                logger.info(
                    "%2d clients: p50 %s ms, p95 %s ms, p99 %s ms, %.1f req/s",
                    clients,
                    level["p50_ms"],
                    level["p95_ms"],
                    level["p99_ms"],
                    level["requests_per_s"],
                )
                latency.append(level)
                # A round between levels, while the server idles: contention is rarely everywhere.
                rounds.append(reference.measure(min_iters=p.reference_min_iters, seconds=p.reference_seconds))
        rounds.append(reference.measure(min_iters=p.reference_min_iters, seconds=p.reference_seconds))
        ref = combine_references(rounds)
        ref_described = reference.describe()
        del reference
        snapshot_rejected = f"of gallery {big['id']} is unusable" in log.read_text(errors="replace")

    if served["index"]["size"] != p.gallery_size:
        raise RuntimeError(
            f"the server holds {served['index']['size']} items of the {p.gallery_size} written to the gallery"
        )
    for level in latency:
        level["ratio_to_reference"] = ratios_to_reference(level, ref["reference_ms"])
    single = next(level for level in latency if level["clients"] == 1)["ratio_to_reference"]
    same_model = (
        ref_described["model_dtype"],
        ref_described["model_device"],
        ref_described["model_runtime"],
    ) == (model["dtype"], model["device"], model["runtime"])
    return {
        "device": device,
        "quick": quick,
        # Other processes' load on the machine, which every figure here shares (1-minute averages).
        "load_average_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "model": {
            "arch": p.arch,
            "input_size": list(p.input_size),
            "dim": model["dim"],
            "dtype": model["dtype"],
            "runtime": model["runtime"],
            "runtime_setting": runtime,
        },
        "batch_size": p.batch,
        "forward_images_per_s": round(forward, 1),
        "forward_images_per_s_before_after": [round(forward_before, 1), round(forward_after, 1)],
        "ingest": {
            "images": job["done"],
            "images_per_s": round(ingest_rate, 1),
            "ratio_to_forward": round(ingest_rate / forward, 3),
            "database": "sqlite",
        },
        "query": {
            "gallery_items": served["index"]["size"],
            "gallery_dim": model["dim"],
            "index": f"{backend} {served['index']['spec']} (exact)",
            "index_backend": backend,
            "index_device": str(search_device),
            "index_dtype": str(search_dtype).removeprefix("torch."),
            "k": K,
            "query_image": {"format": "JPEG", "size_wh": query_size, "bytes": len(query)},
            "micro_batch_max_wait_ms": float(
                env.get("REID_MAX_WAIT_MS")
                or os.environ.get("REID_MAX_WAIT_MS")
                or Settings.model_fields["max_wait_ms"].default
            ),
            "seconds_per_level": p.level_seconds,
            "gallery_start": gallery_start,
            "snapshot_rejected": snapshot_rejected,
            "startup_s": round(ready_s, 2),
            "direct_insert_s": round(insert_s, 2),
            "snapshot_write_s": round(prepare_s, 2) if gallery_start == "snapshot" else None,
            "levels": latency,
            # The same client's empty request to the same server: what HTTP alone costs a query.
            "empty_request_round_trip": round_trip,
            "reference": {**ref, **ref_described, "same_dtype_and_device_as_service": same_model},
            "reference_ms": ref["reference_ms"],
            "ratio_to_reference": single["p50"],
            "p99_ratio_to_reference": single["p99"],
            "goal_ratio_on_gpu": GOAL_RATIO,
        },
    }


def markdown(figures: dict[str, Any]) -> str:
    """The query-latency figures as a markdown table (what bench/README.md shows)."""
    q = figures["query"]
    ref = q["reference"]
    lines = [
        f"Gallery {q['gallery_items']:,} x {q['gallery_dim']} ({q['index']}, {q['index_device']} "
        f"{q['index_dtype']}), k={q['k']}, started from {q['gallery_start']} in {q['startup_s']} s. "
        f"Reference: batch-1 forward {ref['forward_ms']:.3f} ms ({ref['model_dtype']}, CUDA graphs "
        f"{'on' if ref['cuda_graphs'] else 'off'}) + exact search {ref['search_ms']:.3f} ms = "
        f"{q['reference_ms']:.3f} ms. An empty request (GET /health/live) takes "
        f"{q['empty_request_round_trip']['p50_ms']:.2f} ms (p50) with the same client.",
        "",
        "| clients | p50 ms | p95 ms | p99 ms | requests/s | p50 / reference | p99 / reference |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for level in q["levels"]:
        lines.append(
            f"| {level['clients']} | {level['p50_ms']} | {level['p95_ms']} | {level['p99_ms']} | "
            f"{level['requests_per_s']} | {level['ratio_to_reference']['p50']} | "
            f"{level['ratio_to_reference']['p99']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model and gallery, 1 s per level")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--arch", default=None, help="timm backbone (default: resnet18 on CPU, vit_small_patch16_224 on GPU)"
    )
    parser.add_argument(
        "--gallery-size",
        type=int,
        default=None,
        help="items in the search gallery (default 1M GPU, 100k CPU)",
    )
    parser.add_argument(
        "--gallery-start",
        choices=GALLERY_STARTS,
        default="snapshot",
        help="how the server loads the search gallery: its index snapshot, or a rebuild from the database",
    )
    parser.add_argument("--index-backend", default=None, help="the servers' index backend (faiss, torch)")
    parser.add_argument("--max-wait-ms", type=float, default=None, help="the micro-batcher's wait (ms)")
    parser.add_argument(
        "--runtime", default=None, help="the servers' runtime: auto, torch or onnx (default: the service's)"
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default bench/results/service-{cpu,gpu}.json)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    figures = run(
        args.quick,
        args.device,
        arch=args.arch,
        gallery_size=args.gallery_size,
        gallery_start=args.gallery_start,
        index_backend=args.index_backend,
        max_wait_ms=args.max_wait_ms,
        runtime=args.runtime,
    )
    kind = "gpu" if figures["device"].startswith("cuda") else "cpu"
    out = Path(args.out or f"bench/results/service-{kind}{'-quick' if args.quick else ''}.json")
    write_result(out, "service", figures)
    print(markdown(figures))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
