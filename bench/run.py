"""One runner for every benchmark of the project.

Each benchmark module in bench/ exposes ``run(quick: bool, device: str | None) -> dict`` returning
its figures, each with its reference measured in the same run (fused vs baseline model, ingestion
vs pure forward, evaluation vs the straightforward implementation...). This runner calls the chosen
ones on whatever machine it is on and writes one JSON file with the machine, the date and every
figure. ``--quick`` shrinks every benchmark to seconds so a test can keep the runner from rotting.

    python -m bench.run                       # everything, full size
    python -m bench.run --only fusion,index   # a subset
    python -m bench.run --quick --out /tmp/b.json
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import portable_traceback, write_result

log = logging.getLogger("bench.run")

# Order: cheapest first, so a run cut short still has the foundations.
BENCHMARKS = ("fusion", "evaluation", "index", "training", "service", "embedding", "load", "batching")


def run_all(names: list[str], *, quick: bool, device: str | None) -> dict[str, Any]:
    """Run the named benchmarks one after another; a failure is recorded, not fatal."""
    figures: dict[str, Any] = {}
    for name in names:
        log.info("benchmark %s (quick=%s, device=%s)", name, quick, device or "auto")
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{name}")
            figures[name] = module.run(quick=quick, device=device)
            status = "ok"
        except Exception as exc:  # keep going: one broken benchmark must not hide the others
            figures[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": portable_traceback()}
            status = "failed"
        figures[name + "_seconds"] = round(time.perf_counter() - start, 2)
        log.info("benchmark %s %s in %.1f s", name, status, figures[name + "_seconds"])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for tests")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/run-<cpu|gpu>.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # A time limit (bench/device.sh uses `timeout`) sends SIGTERM: unwind through the benchmarks'
    # `finally` blocks, so servers they started are stopped instead of orphaned.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))

    names = [n for n in (args.only.split(",") if args.only else BENCHMARKS) if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    skip = {n for n in args.skip.split(",") if n}
    names = [n for n in names if n not in skip]

    figures = run_all(names, quick=args.quick, device=args.device)
    if args.out:
        out = Path(args.out)
    else:
        import torch

        kind = "gpu" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu" else "cpu"
        out = Path(__file__).parent / "results" / f"run-{kind}{'-quick' if args.quick else ''}.json"
    write_result(out, "run", figures)
    print(f"wrote {out}")
    failed = [n for n in names if isinstance(figures.get(n), dict) and "error" in figures[n]]
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
