"""The benchmark runner in its quick form, as a user runs it, so that it cannot rot unnoticed.

``python -m bench.run --quick`` on the CPU with the benchmarks that finish in seconds (service and
index start servers or build several indexes: they have their own tests); the JSON it writes must
hold the machine, every benchmark's figures without errors, and each figure's reference ratio.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK = ("embedding", "fusion", "evaluation", "batching")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "run.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--device",
            "cpu",
            "--only",
            ",".join(QUICK),
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_runner_records_the_machine_and_every_benchmark(quick_run: dict) -> None:
    machine = quick_run["machine"]
    assert machine["cpu"] and machine["torch"] and machine["date"]
    figures = quick_run["figures"]
    for name in QUICK:
        assert name in figures and "error" not in figures[name], figures.get(name)
        assert figures[f"{name}_seconds"] > 0


def test_embedding_figures_carry_their_references(quick_run: dict) -> None:
    emb = quick_run["figures"]["embedding"]
    assert emb["device"] == "cpu" and emb["quick"]
    for case in emb["forward"]:
        assert "error" not in case, case
        assert case["images_per_s"]["float32"] > 0 and case["images_per_s"]["bfloat16"] > 0
        assert case["half_vs_float32"]["bfloat16"] > 0
        assert case["min_cosine_vs_float32"]["bfloat16"] > 0.99
        assert case["batch1_eager"]["median_ms"] > 0
        assert case["batch1_cuda_graph"] == "not available on a CPU"
    # One model carries the torch.compile case; a CPU does not compile it (see test_bench_embedding_compile).
    compiled = [case for case in emb["forward"] if "compile" in case]
    assert [case["model"] for case in compiled] == ["vit_s16"]
    assert compiled[0]["compile"] == "not run on a CPU (compile takes minutes)"
    decode = emb["decode"]
    assert "error" not in decode, decode
    assert decode["pillow_preprocess_per_core"] > 0 and decode["libjpeg_turbo_decode_pool"] > 0
    (ingest,) = emb["ingest"]
    assert "error" not in ingest, ingest
    assert ingest["failed_images"] == {"pil": 0}
    assert ingest["ratio_to_forward"]["pil"] == pytest.approx(
        ingest["pipeline_images_per_s"]["pil"] / ingest["forward_images_per_s"], rel=0.01
    )
    search = emb["search"]
    assert "error" not in search, search
    for key in ("queries_1", "queries_64"):
        assert search["index"][key]["median_ms"] > 0 and search["ratio_to_bare"][key] > 0
    assert search["top10_agreement_with_float32"] == 1.0  # float32 storage on a CPU: exact
    assert set(emb["single_query_floor_ms"]) == {case["model"] for case in emb["forward"]}


def test_runtime_figures_compare_torch_and_onnx_runtime_side_by_side(quick_run: dict) -> None:
    (case,) = quick_run["figures"]["embedding"]["runtime"]
    assert "error" not in case, case
    assert set(case["images_per_s"]) == {"torch_float32", "torch_bfloat16", "onnx_cpu"}
    for name, rate in case["images_per_s"].items():
        assert rate > 0 and case["batch1_ms"][name] > 0
        assert case["throughput_vs_torch_float32"][name] == pytest.approx(
            rate / case["images_per_s"]["torch_float32"], rel=0.01
        )
    parity = case["parity_vs_torch_float32"]
    assert parity["onnx_cpu"]["passes"] and parity["onnx_cpu"]["min_cosine"] >= 0.99999
    for figures in parity.values():
        assert figures["passes"] == (figures["min_cosine"] >= 0.99999 and figures["rank1_agreement"] == 1)
    assert set(case["fastest_passing"].values()) <= {"torch_float32", "onnx_cpu"}
    assert case["engines"]["onnx_cpu"]["providers"] == ["CPUExecutionProvider"]


def test_batching_figures_compare_every_wait_side_by_side(quick_run: dict) -> None:
    from bench.batching import CLIENTS, WAITS_MS

    fig = quick_run["figures"]["batching"]
    assert {(lv["max_wait_ms"], lv["clients"]) for lv in fig["levels"]} == {
        (w, c) for w in WAITS_MS for c in CLIENTS
    }
    for lv in fig["levels"]:
        assert lv["requests_per_s"] > 0 and 0 < lv["p50_ms"] <= lv["p99_ms"]
        assert 1 <= lv["mean_batch"] <= lv["clients"]
    assert fig["forward_batch1_ms_median"] >= fig["model"]["fixed_ms"]
    assert set(fig["ratios"]) == {str(c) for c in CLIENTS}
