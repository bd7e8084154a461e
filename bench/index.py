"""Vector index benchmark: build/add throughput, search latency, recall@10, memory, save/load.

Every FAISS spec and milvus-lite run side by side in one process on the same synthetic gallery:
re-identification-like embeddings (identities of 8 views around a random centre, unit vectors) and
queries that are fresh noisy views of gallery identities. For each case:

- ``build_s`` / ``add_per_s``: adding the whole gallery (IVF specs train on the first batch, on a
  seeded sample; HNSW builds its graph), then ``add_1k_ms``: adding 1,000 more in batches of 100;
- ``search``: latency of batches of 1, 64 and 1024 queries (median and p95 over repeats) and
  queries per second, k = 10;
- ``recall@10`` against exact search over the same items (1.0 for exact specs), and for the
  approximate specs a ``tradeoff`` sweep of the search knob (IVF ``nprobe`` 8/32/128, HNSW
  ``ef_search`` 32/64/256) with recall and batch-64 latency;
- ``bytes_per_vector``: FAISS index plus its attribute table (``FaissIndex.nbytes``); for
  milvus-lite, its data folder on disk;
- ``save_s`` / ``load_s``: snapshot write (atomic, checksummed) and verified load; for Milvus, flush
  plus manifest and reconnect.

The default run fits a 2-core CPU in about 6 minutes, so it is smaller than the full grid: 100k
vectors at d = 384 for every spec and milvus-lite (flat, ivf-flat), 100k at d = 768 for flat and
ivf-flat, and 1M at d = 384 for flat (batch 1 and 64 only). IVF specs use 512 lists trained on
25,600 vectors here (the library default, ~4 sqrt(n) lists on up to 131k vectors, trains for
minutes on 2 cores); HNSW uses M = 16, efConstruction = 40. ``--full`` runs every spec at 100k and
1M for d = 384 and 768 (hours on 2 cores; minutes on a GPU machine).

Reference (physical limit): exact fp16 search of 1M x 768 on an H100 by matrix product + top-k
takes ~0.70 ms for one query and ~1.24 ms for 64 (about 2.2 of the card's 3 TB/s); a GPU flat
index should approach it. On an H200 with 16 CPU threads, FAISS CPU flat search of 1M x 768 takes
59 ms for 1 query and 1.36 s for 64.

Wall times on a shared machine stretch with its load (FAISS's OpenMP threads spin-wait when the
cores are busy), so every case records the 1-minute load average next to its numbers.

Run: ``python -m bench.index [--quick] [--full] [--device cpu|cuda] [--threads N] [--out PATH]``
(default ``--out bench/results/index-cpu.json``).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import write_result
from index import create_index, load_index
from index.recall import exact_top_k

log = logging.getLogger("bench.index")

SEED = 0
K = 10
PER_IDENTITY = 8
NOISE = 0.6  # per-dimension noise relative to the identity centre (before normalisation)
PROBES = 200  # recall queries
REFERENCE = {
    "h100_exact_fp16_1M_x_768_ms": {"batch_1": 0.70, "batch_64": 1.24},
    "h200_faiss_cpu_16_threads_flat_1M_x_768_ms": {"batch_1": 59.0, "batch_64": 1360.0},
    "note": "physical limit a GPU flat index should approach (DESIGN.md section 8)",
}


@dataclass(frozen=True)
class Case:
    backend: str
    spec: str
    n: int
    dim: int
    options: dict[str, Any] = field(default_factory=dict)
    batches: tuple[int, ...] = (1, 64, 1024)

    @property
    def name(self) -> str:
        return f"{self.backend}/{self.spec} n={self.n:,} d={self.dim}"


def _ivf(n: int) -> dict[str, Any]:
    # Sized for a 2-core CPU (see the module docstring); about 50 training points per list.
    return (
        {"nlist": 512, "train_sample": 25_600, "nprobe": 32}
        if n <= 200_000
        else {"nlist": 2048, "train_sample": 102_400, "nprobe": 64}
    )


def cases(quick: bool, full: bool) -> list[Case]:
    """The grid to run."""
    hnsw = {"hnsw_m": 16, "ef_construction": 40, "ef_search": 64}
    if quick:
        n, d = 20_000, 128
        return [
            Case("faiss", "flat", n, d),
            Case("faiss", "ivf-flat", n, d, {"nlist": 128, "train_sample": 6400, "nprobe": 16}),
            Case("faiss", "hnsw", n, d, hnsw),
            Case("milvus", "flat", n, d),
        ]
    if full:
        grid = []
        for d in (384, 768):
            for n in (100_000, 1_000_000):
                grid += [
                    Case("faiss", "flat", n, d),
                    *(Case("faiss", s, n, d, _ivf(n)) for s in ("ivf-flat", "ivf-sq8", "ivf-pq")),
                    Case("faiss", "hnsw", n, d, hnsw),
                ]
            grid += [
                Case("milvus", "flat", 100_000, d),
                Case("milvus", "ivf-flat", 100_000, d, _milvus_ivf()),
            ]
        return grid
    return [
        Case("faiss", "flat", 100_000, 384),
        Case("faiss", "ivf-flat", 100_000, 384, _ivf(100_000)),
        Case("faiss", "ivf-sq8", 100_000, 384, _ivf(100_000)),
        Case("faiss", "ivf-pq", 100_000, 384, _ivf(100_000)),
        Case("faiss", "hnsw", 100_000, 384, hnsw),
        Case("milvus", "flat", 100_000, 384),
        Case("milvus", "ivf-flat", 100_000, 384, _milvus_ivf()),
        Case("faiss", "flat", 100_000, 768),
        Case("faiss", "ivf-flat", 100_000, 768, _ivf(100_000)),
        Case("faiss", "flat", 1_000_000, 384, batches=(1, 64)),
    ]


def _milvus_ivf() -> dict[str, Any]:
    return {"nlist": 512, "nprobe": 32}


# ------------------------------------------------------------------------------------------ data


def gallery(n: int, dim: int, seed: int = SEED) -> np.ndarray:
    """Unit vectors in identity clusters, made in chunks (1M x 768 float32 is 3 GB already)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // PER_IDENTITY + 1, dim), dtype=np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65_536):
        stop = min(n, start + 65_536)
        block = centres[np.arange(start, stop) // PER_IDENTITY]
        block += NOISE * rng.standard_normal((stop - start, dim), dtype=np.float32)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def queries(x: np.ndarray, nq: int, seed: int = SEED + 1) -> np.ndarray:
    """New noisy views of random gallery items (a query of a known identity)."""
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), nq, replace=False)] + NOISE / np.sqrt(x.shape[1]) * rng.standard_normal(
        (nq, x.shape[1]), dtype=np.float32
    )
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------------------- timing


def _repeat(fn: Callable[[], Any], repeats: int, budget_s: float) -> list[float]:
    """Wall times of up to ``repeats`` calls (at least one), stopping once ``budget_s`` is spent."""
    times: list[float] = []
    spent = 0.0
    while len(times) < repeats and (not times or spent < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return times


def _summary(times: list[float], batch: int) -> dict[str, Any]:
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    median = statistics.median(ordered)
    return {
        "median_ms": round(1e3 * median, 3),
        "p95_ms": round(1e3 * p95, 3),
        "queries_per_s": round(batch / median, 1),
        "repeats": len(times),
    }


def _recall(index: Any, data: _Dataset) -> float:
    got = index.search(data.q[:PROBES], K).ids
    return round(
        float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(got, data.truth, strict=True)])), 4
    )


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@dataclass
class _Dataset:
    x: np.ndarray
    ids: np.ndarray
    q: np.ndarray
    truth: np.ndarray


def _datasets(grid: list[Case]) -> Iterator[tuple[Case, _Dataset]]:
    """Cases grouped by (n, dim), the data made once per group."""
    shapes = sorted({(c.n, c.dim) for c in grid})
    for n, dim in shapes:
        log.info("making %s x %d gallery", f"{n:,}", dim)
        x = gallery(n, dim)
        q = queries(x, max(1024, PROBES))
        needs_truth = any(c.n == n and c.dim == dim and c.spec != "flat" for c in grid)
        truth = exact_top_k(x, q[:PROBES], K)[1] if needs_truth else np.zeros((0, K), np.int64)
        data = _Dataset(x=x, ids=np.arange(n, dtype=np.int64), q=q, truth=truth)
        for case in grid:
            if (case.n, case.dim) == (n, dim):
                yield case, data
        del x, q, data
        gc.collect()


def bench_case(case: Case, data: _Dataset, workdir: Path, device: str | None) -> dict[str, Any]:
    """Measure one backend/spec on one dataset."""
    options = dict(case.options)
    if case.backend == "faiss":
        options["gpu"] = None if device is None else device.startswith("cuda")
    else:
        options.update(
            uri=str(workdir / "milvus.db"), collection=f"bench_{case.spec.replace('-', '_')}_{case.dim}"
        )
    index = create_index(case.backend, spec=case.spec, dim=case.dim, **options)
    out: dict[str, Any] = {
        "backend": case.backend,
        "spec": case.spec,
        "n": case.n,
        "dim": case.dim,
        "options": case.options,
        "gpu": index.capabilities.gpu,
    }
    extra = gallery(1000, case.dim, seed=SEED + 7)
    step = 100_000 if case.backend == "faiss" else 20_000
    start = time.perf_counter()
    for s in range(0, case.n, step):
        index.add(data.ids[s : s + step], data.x[s : s + step])
    out["build_s"] = round(time.perf_counter() - start, 2)
    out["add_per_s"] = round(case.n / out["build_s"], 1)
    start = time.perf_counter()
    for s in range(0, 1000, 100):
        index.add(np.arange(s, s + 100) + case.n, extra[s : s + 100])
    out["add_1k_ms"] = round(1e3 * (time.perf_counter() - start), 1)
    if case.backend == "milvus":
        # Seal the segments, as after any bulk load (milvus-lite scans unsealed data in Python).
        start = time.perf_counter()
        index.flush()
        out["flush_s"] = round(time.perf_counter() - start, 2)
    index.search(data.q[:8], K)  # warm-up (lazy allocations, milvus segment load)
    out["search"] = {}
    for batch in case.batches:
        qb = data.q[:batch]
        repeats = {1: 50, 64: 10}.get(batch, 3)
        times = _repeat(lambda qb=qb, ix=index: ix.search(qb, K), repeats, budget_s=8.0)
        out["search"][f"batch_{batch}"] = _summary(times, batch)
    if case.spec == "flat":
        out["recall@10"] = 1.0 if index.capabilities.exact else None
    else:
        out["recall@10"] = _recall(index, data)
        # Recall against speed: the search-time knob of the spec, the build unchanged.
        knob, values = ("ef_search", (32, 64, 256)) if case.spec == "hnsw" else ("nprobe", (8, 32, 128))
        default = case.options.get(knob)
        sweep = []
        for value in values:
            index.tune(**{knob: value})
            times = _repeat(lambda ix=index: ix.search(data.q[:64], K), 3, budget_s=4.0)
            sweep.append(
                {
                    knob: value,
                    "recall@10": _recall(index, data),
                    "batch_64_ms": _summary(times, 64)["median_ms"],
                }
            )
        if default is not None:
            index.tune(**{knob: default})
        out["tradeoff"] = sweep
    snap = workdir / f"snap-{case.backend}-{case.spec}-{case.n}-{case.dim}"
    start = time.perf_counter()
    index.save(snap, last_seq=1)
    out["save_s"] = round(time.perf_counter() - start, 2)
    if case.backend == "faiss":
        out["bytes_per_vector"] = round(index.nbytes / len(index), 1)
        out["snapshot_bytes_per_vector"] = round(_folder_bytes(snap) / len(index), 1)
    else:
        out["bytes_per_vector"] = round(_folder_bytes(workdir / "milvus.db") / len(index), 1)
        out["bytes_note"] = "milvus-lite data folder on disk"
    del index
    gc.collect()
    start = time.perf_counter()
    loaded = load_index(snap)
    out["load_s"] = round(time.perf_counter() - start, 2)
    if case.backend == "milvus":
        loaded.drop()
    out["load_average_1m"] = round(os.getloadavg()[0], 2)  # a shared machine stretches wall times
    del loaded
    gc.collect()
    return out


def run(quick: bool = False, device: str | None = None, full: bool = False) -> dict[str, Any]:
    """Run the grid (see the module docstring) and return the figures."""
    import faiss

    if device is not None and device.startswith("cuda") and faiss.get_num_gpus() == 0:
        # faiss-cpu on a GPU machine: measure FAISS on the CPU rather than fail every case.
        log.warning("FAISS sees no GPU (no faiss-gpu wheel): the FAISS cases run on the CPU")
        device = "cpu"
    grid = cases(quick, full)
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        for case, data in _datasets(grid):
            log.info("%s ...", case.name)
            case_dir = Path(tmp) / f"{case.backend}-{case.spec}-{case.n}-{case.dim}"
            case_dir.mkdir()
            try:
                result = bench_case(case, data, case_dir, device)
            except Exception as exc:  # one failing case must not lose the others' numbers
                log.exception("%s failed", case.name)
                result = {
                    "backend": case.backend,
                    "spec": case.spec,
                    "n": case.n,
                    "dim": case.dim,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            results.append(result)
            log.info("%s: %s", case.name, {k: v for k, v in result.items() if k != "options"})
    return {
        "k": K,
        "grid": "quick" if quick else "full" if full else "default",
        "data": (
            f"synthetic identities of {PER_IDENTITY} views, noise {NOISE}, queries are new views; seed {SEED}"
        ),
        "faiss_threads": _faiss_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - started, 1),
        "reference": REFERENCE,
        "cases": results,
    }


def _faiss_threads() -> int:
    import faiss

    return int(faiss.omp_get_max_threads())


def markdown(figures: dict[str, Any]) -> str:
    """The results as a markdown table (what bench/README.md shows)."""
    batches = ("batch_1", "batch_64", "batch_1024")
    head = (
        "| backend/spec | n | d | build s | add 1k ms | "
        + " | ".join(f"{b.replace('batch_', 'batch ')} ms (q/s)" for b in batches)
        + " | recall@10 | bytes/vec | save s | load s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in figures["cases"]:
        if "error" in c:
            lines.append(f"| {c['backend']}/{c['spec']} | {c['n']:,} | {c['dim']} | error: {c['error']} |")
            continue
        cells = []
        for b in batches:
            s = c["search"].get(b)
            cells.append(f"{s['median_ms']:.2f} ({s['queries_per_s']:,.0f})" if s else "-")
        recall = "-" if c["recall@10"] is None else f"{c['recall@10']:.3f}"
        lines.append(
            f"| {c['backend']}/{c['spec']} | {c['n']:,} | {c['dim']} | {c['build_s']} | {c['add_1k_ms']} | "
            + " | ".join(cells)
            + f" | {recall} | {c['bytes_per_vector']:,.0f} | {c['save_s']} | {c['load_s']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 20k x 128 smoke run (seconds)")
    parser.add_argument("--full", action="store_true", help="every spec at 100k and 1M, d = 384 and 768")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: FAISS decides)")
    parser.add_argument("--out", default="bench/results/index-cpu.json", help="where to write the JSON")
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads (default: all cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    figures = run(quick=args.quick, device=args.device, full=args.full)
    path = write_result(args.out, "index", figures)
    print(markdown(figures))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
