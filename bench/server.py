"""A real ``reid serve`` process for the service benchmarks (``bench.service``, ``bench.load``).

Both benchmarks measure the service as an operator runs it: a random-init exported model (the
latency does not depend on what the weights learned), a ``reid serve`` subprocess on 127.0.0.1 and
a free port, and ingestion jobs driven over HTTP until they end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

#: Seconds a stopped server gets to shut down cleanly (SIGTERM) before it is killed (SIGKILL).
STOP_GRACE_S = 120.0
#: Seconds between two readiness probes while the server starts.
_POLL_S = 0.1
#: Job states after which a job no longer changes.
FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")


def export_model(out: Path, arch: str, size: tuple[int, int], seed: int = 0, *, onnx: bool = False) -> Path:
    """A random-init exported person model of timm backbone ``arch`` and input (height, width) ``size``
    (with ``model.onnx`` when ``onnx``)."""
    import torch

    from training.export import export_model as export
    from training.model import ReIDModel

    torch.manual_seed(seed)
    model = ReIDModel(arch, img_size=size).eval()
    return export(
        model,
        out,
        kind="person",
        name=arch,
        preprocess={"size": size, "interpolation": "bilinear"},
        onnx=onnx,
    )


def serve_args(
    model_dir: Path, database_url: str, data_dir: Path, dataset_root: Path, device: str
) -> list[str]:
    """``reid serve`` arguments for one person model, its database, data folder and dataset root."""
    return [
        "--model",
        f"person={model_dir}",
        "--database-url",
        database_url,
        "--data-dir",
        str(data_dir),
        "--dataset-root",
        str(dataset_root),
        "--device",
        device,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def reid_server(
    args: list[str], env: dict[str, str], log: Path, *, log_level: str = "info", timeout: float = 300
) -> Iterator[str]:
    """A ``reid serve`` subprocess on 127.0.0.1 and a free port; yields its base URL once ready.

    Args:
        args: ``reid serve`` arguments besides host, port and log level (see :func:`serve_args`).
        env: environment variables added to this process's (``REID_*`` settings).
        log: file that receives the server's stdout and stderr (appended to).
        log_level: the server's log level.
        timeout: seconds the server may take to answer ``/health/ready``.

    Stopped with SIGTERM (a clean shutdown), then SIGKILL if it does not exit within
    :data:`STOP_GRACE_S`.
    """
    port = _free_port()
    cmd = [sys.executable, "-m", "reid_cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += [*args, "--log-level", log_level]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"reid serve exited with {proc.returncode}: see {log}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/health/ready").status_code == 200:
                        break
                if time.monotonic() - start > timeout:
                    raise TimeoutError(f"reid serve not ready after {timeout} s: see {log}")
                time.sleep(_POLL_S)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_job(client: httpx.Client, location: str, timeout: float = 3600) -> dict[str, Any]:
    """Poll the job at ``location`` until it ends; returns its final JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(location).json()
        if job["status"] in FINAL_JOB_STATES:
            return job
        time.sleep(_POLL_S)
    raise TimeoutError(f"job {location} did not finish within {timeout} s")
