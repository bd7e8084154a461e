"""Evaluation time and peak memory: our chunked evaluator vs the per-query numpy algorithm of most toolkits.

Sizes are those of Market-1501 (3,368 queries x 15,913 gallery images, 750 test identities plus
distractors, 6 cameras) and MSMT17 (11,659 x 82,161, 3,060 identities, 15 cameras), with random
768-d float32 features clustered by identity (so mAP is neither 0 nor 1) and cosine distance.

- ``ours``: :func:`evaluation.metrics.evaluate_features` (chunked distance + sort, vectorised metrics).
- ``per-query numpy``: what torchreid's ``eval_market1501`` and most toolkits do: the full distance
  matrix, ``np.argsort`` of all of it, a full ``matches`` matrix, then a Python loop over queries.
  At MSMT17 size it would need ~16 bytes per (query, gallery) pair (about 14 GiB), so it runs on a
  subset of the queries and its time and memory are extrapolated linearly, and labelled as such.

Each measurement runs in its own subprocess; peak memory is the growth of the process's maximum
resident set (``ru_maxrss``) during the evaluation, after the features were made. Wall and CPU time
are both recorded, with the 1-minute load average, since a shared machine stretches wall time.

Run: ``python -m bench.evaluation [--quick] [--device cpu|cuda] [--out bench/results/evaluation-cpu.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.machine import write_result

DIM = 768
SEED = 0
NOISE = 3.0  # per-dimension noise over unit-variance identity centres: mAP well below 1


@dataclass(frozen=True)
class Case:
    name: str
    num_query: int
    num_gallery: int
    num_ids: int
    num_cams: int
    distractors: int
    baseline_queries: int  # queries the per-query baseline evaluates (all, or a subset to extrapolate)


CASES = {
    "market1501": Case("market1501", 3368, 15913, 750, 6, 2798, 3368),
    "msmt17": Case("msmt17", 11659, 82161, 3060, 15, 0, 1500),
}


def make_split(case: Case, seed: int = SEED) -> dict[str, np.ndarray]:
    """Random features with the identity/camera structure of the real split (float32, built in chunks
    so that making them does not raise the process's peak memory above the features themselves)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((case.num_ids + 1, DIM), dtype=np.float32)
    # Queries: identities in turn, each from a camera of its own; gallery: the test identities'
    # other images, plus distractors (identity 0) for Market-1501.
    q_pids = 1 + np.arange(case.num_query) % case.num_ids
    q_cams = rng.integers(0, case.num_cams, case.num_query)
    num_real = case.num_gallery - case.distractors
    g_pids = np.concatenate([1 + rng.integers(0, case.num_ids, num_real), np.zeros(case.distractors, int)])
    g_cams = rng.integers(0, case.num_cams, case.num_gallery)

    def features(pids: np.ndarray) -> np.ndarray:
        out = np.empty((pids.size, DIM), dtype=np.float32)
        for start in range(0, pids.size, 4096):
            ids = pids[start : start + 4096]
            noise = rng.standard_normal((ids.size, DIM), dtype=np.float32)
            out[start : start + ids.size] = np.where(ids[:, None] > 0, centers[ids], 0.0) + NOISE * noise
        return out

    return {
        "q_feats": features(q_pids), "g_feats": features(g_pids),
        "q_pids": q_pids, "g_pids": g_pids, "q_cams": q_cams, "g_cams": g_cams,
    }


def per_query_numpy(q_feats, g_feats, q_pids, g_pids, q_cams, g_cams, max_rank: int = 50) -> dict:
    """The straightforward algorithm (torchreid's ``eval_market1501`` style), for comparison only."""
    qn = q_feats / np.linalg.norm(q_feats, axis=1, keepdims=True)
    gn = g_feats / np.linalg.norm(g_feats, axis=1, keepdims=True)
    distmat = 1.0 - qn @ gn.T
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(q_feats.shape[0]):
        order = indices[i]
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i]))
        raw = matches[i][keep]
        if not raw.any():
            continue
        cmc = raw.cumsum()
        last = np.flatnonzero(raw)[-1]
        all_inp.append(cmc[last] / (last + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        precision = raw.cumsum() / np.arange(1.0, raw.size + 1)
        all_ap.append((precision * raw).sum() / raw.sum())
    cmc = np.asarray(all_cmc, dtype=np.float64).mean(axis=0)
    return {"mAP": float(np.mean(all_ap)), "rank1": float(cmc[0]), "mINP": float(np.mean(all_inp))}


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _child(case_name: str, impl: str, device: str | None) -> dict[str, Any]:
    """One measurement, run in a fresh process so that peak memory belongs to it alone."""
    import torch

    from evaluation.distance import resolve_device
    from evaluation.metrics import evaluate_features

    case = CASES[case_name]
    data = make_split(case)
    n = case.baseline_queries if impl == "per-query numpy" else case.num_query
    args = (data["q_feats"][:n], data["g_feats"], data["q_pids"][:n], data["g_pids"],
            data["q_cams"][:n], data["g_cams"])
    before = _max_rss_mb()
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    load = os.getloadavg()[0]
    cpu_start = time.process_time()
    start = time.perf_counter()
    if impl == "ours":
        r = evaluate_features(*args, metric="cosine", device=device)
        if cuda:
            torch.cuda.synchronize()
        summary = {"mAP": r["mAP"], "rank1": r["cmc"]["1"], "mINP": r["mINP"]}
    else:
        summary = per_query_numpy(*args)
    seconds = time.perf_counter() - start
    out = {
        "case": case_name, "implementation": impl, "queries_evaluated": n, "num_gallery": case.num_gallery,
        "seconds": seconds, "cpu_seconds": time.process_time() - cpu_start, "load_average_1min": load,
        "peak_rss_growth_mb": _max_rss_mb() - before,
        "features_mb": (data["q_feats"].nbytes + data["g_feats"].nbytes) / 2**20, **summary,
    }
    if cuda and impl == "ours":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _measure(case_name: str, impl: str, device: str | None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.evaluation", "--child", case_name, impl]
    if device:
        cmd += ["--device", device]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{case_name}/{impl} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    case = CASES[case_name]
    if result["queries_evaluated"] < case.num_query:
        scale = case.num_query / result["queries_evaluated"]
        result["extrapolated"] = True
        result["note"] = (
            f"measured on {result['queries_evaluated']} of {case.num_query} queries; time and memory "
            f"extrapolated linearly (x{scale:.2f})"
        )
        result["seconds_full_extrapolated"] = result["seconds"] * scale
        result["cpu_seconds_full_extrapolated"] = result["cpu_seconds"] * scale
        result["peak_rss_growth_mb_full_extrapolated"] = result["peak_rss_growth_mb"] * scale
    else:
        result["extrapolated"] = False
    return result


def run(quick: bool = False, device: str | None = None) -> dict[str, Any]:
    """Measure every case (``quick``: Market-1501 size only). Returns the figures written to JSON."""
    names = ["market1501"] if quick else ["market1501", "msmt17"]
    rows = []
    for name in names:
        for impl in ("ours", "per-query numpy"):
            rows.append(_measure(name, impl, device))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"dim": DIM, "metric": "cosine", "device": device or "default", "quick": quick, "results": rows}


def markdown_table(figures: dict[str, Any]) -> str:
    lines = [
        "| size | implementation | queries x gallery | wall time (s) | CPU time (s) | peak RSS growth (MB) "
        "| mAP | rank-1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in figures["results"]:
        seconds = f"{r['seconds']:.1f}"
        cpu = f"{r['cpu_seconds']:.1f}"
        memory = f"{r['peak_rss_growth_mb']:.0f}"
        if r["extrapolated"]:
            seconds += f" (~{r['seconds_full_extrapolated']:.0f} for all, extrapolated)"
            cpu += f" (~{r['cpu_seconds_full_extrapolated']:.0f} for all, extrapolated)"
            memory += f" (~{r['peak_rss_growth_mb_full_extrapolated']:.0f} for all, extrapolated)"
        if "gpu_peak_mb" in r:
            memory += f" + GPU {r['gpu_peak_mb']:.0f}"
        lines.append(
            f"| {r['case']} | {r['implementation']} | {r['queries_evaluated']:,} x {r['num_gallery']:,} | "
            f"{seconds} | {cpu} | {memory} | {r['mAP']:.4f} | {r['rank1']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Market-1501 size only")
    parser.add_argument("--device", default=None, help="device of our evaluator (default: cuda if available)")
    parser.add_argument("--out", default="bench/results/evaluation-cpu.json")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.device)))
        return
    figures = run(quick=args.quick, device=args.device)
    write_result(args.out, "evaluation", figures)
    print(markdown_table(figures))


if __name__ == "__main__":
    main()
