"""Distributed training through torchrun: 2 CPU processes (gloo), one checkpoint, rank 0 writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.tiny_data import make_dataset, write_market_layout
from training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_two_cpu_processes(tmp_path):
    data = make_dataset(tmp_path / "tiny", train_ids=8, test_ids=3, per_id=4, size=(32, 16))
    root = write_market_layout(data, tmp_path / "market")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "training",
        "train",
        "--dataset",
        "market1501",
        "--root",
        str(root),
        "--out",
        str(run),
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--set",
        "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
        "--set",
        "data.size=[32, 16]",
        "--set",
        "data.p=2",
        "--set",
        "data.k=2",
        "--set",
        "data.num_workers=0",
        "--set",
        "eval.every=2",
        "--set",
        "eval.trials=1",
    ]
    # Own session: on a timeout the whole group (torchrun and its workers) is killed, none left behind.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s:\n{stdout[-2000:]}\n{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]

    files = sorted(p.name for p in run.iterdir())
    assert files == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl", "summary.json"]
    assert not list(run.glob(".*"))  # no temp files left by either rank
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng_per_rank"]) == 2
    assert ckpt["epoch"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # written once, by rank 0
    # Each rank runs its own P x K batches: the epoch's images are summed over both ranks.
    assert all(r["images"] % (2 * 2 * 2) == 0 and r["images"] > 0 for r in records)
    assert records[-1]["evaluation"]["protocol"] == "market1501"
    assert stdout.count("baseline finished") == 1  # reported once, by rank 0
    assert "rank 1 of 2" in stderr  # the second process did take part
