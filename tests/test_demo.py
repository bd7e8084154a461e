"""The README's main job, `reid demo`, end to end at --quick size (synthetic data, tiny models)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_demo(workdir: Path, port: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reid_cli", "demo", "--quick", "--no-serve", "--workdir", str(workdir),
         "--port", str(port), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_its_work(tmp_path: Path) -> None:
    first = _run_demo(tmp_path, _free_port())
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    # The report has a row per model with real numbers, and the latency comparison.
    for row in ("person-baseline", "person (DR)", "vehicle-baseline", "vehicle (DR)"):
        assert row in out
    assert "fused DenoiseRep / baseline latency" in out
    assert "search check (person)" in out
    for name in ("person-baseline", "person", "vehicle-baseline", "vehicle"):
        assert (tmp_path / "models" / name / "model.json").exists()
    assert "demo-persons" in out and "demo-vehicles" in out

    # A second run reuses data, runs and models: no training, same galleries, no duplicate items.
    second = _run_demo(tmp_path, _free_port())
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "training " not in second.stdout
    assert "writing a synthetic" not in second.stdout

    def gallery_counts(text: str) -> str:
        return text.rsplit("Galleries:", 1)[1].strip()

    assert gallery_counts(first.stdout) == gallery_counts(second.stdout)


def test_demo_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _run_demo(tmp_path, port)
    assert result.returncode != 0
    assert "already in use" in result.stderr + result.stdout
