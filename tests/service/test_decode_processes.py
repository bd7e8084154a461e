"""The Pillow road in worker processes: the thread road's tensors and errors, crash recovery, no orphans."""

from __future__ import annotations

import dataclasses
import io
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError
from sqlalchemy import select

from service.app import create_app
from service.db.tables import Embedding, Item
from service.imaging.decoding import (
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    probe_image,
)
from service.imaging.pools import ImageDecoder
from service.imaging.preparation import Prepared, prepare_bytes
from service.imaging.processes import DecodeProcessPool, preprocess_spec
from service.settings import Settings
from tests.service.conftest import make_settings, wait_for_job
from training.export import LoadedModel, load_model

REPO = Path(__file__).resolve().parents[2]
START_S = 60.0  # the first pool of the session waits for the fork server to import torch


def encode(fmt: str, mode: str, size: tuple[int, int], seed: int, **options: object) -> bytes:
    """Random pixels in ``mode``, encoded as ``fmt`` (JPEG, PNG, WEBP)."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4, "P": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, "L" if mode == "P" else mode)
    if mode == "P":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def running(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie waiting to be reaped has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """The pids still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.fixture(scope="module")
def models(model_dirs: dict[str, Path]) -> dict[int, LoadedModel]:
    """Two models with different transforms (bilinear 64x32, bicubic 48x24) and a twin of the first."""
    person = load_model(model_dirs["person"], "cpu")
    other = dataclasses.replace(person, input_size=(48, 24), interpolation="bicubic", mean=(0.5,) * 3)
    twin = dataclasses.replace(person)  # same spec as person: its transform is computed once
    return {1: person, 2: other, 3: twin}


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodeProcessPool]:
    pool = DecodeProcessPool(2)
    pool.start()
    assert pool.wait_ready(START_S) and len(pool.pids()) == 2
    assert set(pool.pids()) <= {p.pid for p in multiprocessing.active_children() if p.name == "reid-decode"}
    yield pool
    pool.close()


def both_roads(
    data: bytes, pool: DecodeProcessPool, models: dict[int, LoadedModel], max_pixels: int = 10**6
) -> tuple[Prepared[str], Prepared[str]]:
    preprocessors = {i: m.preprocess for i, m in models.items()}
    kwargs = {"name": "probe.img", "max_pixels": max_pixels, "preprocessors": preprocessors}
    return prepare_bytes("t", data, **kwargs), prepare_bytes("p", data, processes=pool, **kwargs)


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(
        [
            ("JPEG", "RGB", {"quality": 90}),
            ("JPEG", "L", {}),
            ("JPEG", "CMYK", {}),
            ("JPEG", "RGB", {"progressive": True}),
            ("PNG", "RGB", {}),
            ("PNG", "RGBA", {}),
            ("PNG", "L", {}),
            ("PNG", "P", {}),
            ("WEBP", "RGB", {"quality": 80}),
            ("WEBP", "RGBA", {"lossless": True}),
        ]
    ),
    width=st.integers(1, 90),
    height=st.integers(1, 90),
    seed=st.integers(0, 2**16),
)
def test_process_road_gives_the_thread_roads_tensors_bit_for_bit(
    pool: DecodeProcessPool, models: dict[int, LoadedModel], kind: tuple, width: int, height: int, seed: int
) -> None:
    fmt, mode, options = kind
    data = encode(fmt, mode, (width, height), seed, **options)
    thread, proc = both_roads(data, pool, models)
    assert thread.error is None and proc.error is None, (thread.error, proc.error)
    assert thread.data == proc.data == data  # both roads keep the bytes, never the decoded image
    for model_id in models:
        a, b = thread.tensors[model_id], proc.tensors[model_id]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert proc.tensors[1].data_ptr() != proc.tensors[3].data_ptr()  # twins do not share memory
    assert (proc.image_format, proc.width, proc.height) == (fmt, width, height)
    assert (thread.image_format, thread.width, thread.height) == (fmt, width, height)
    assert proc.info == probe_image(data, max_pixels=10**6)
    # A model joining mid-job re-decodes the kept bytes: the very image the thread road decoded.
    assert np.array_equal(np.asarray(proc.pil_image(10**6)), np.asarray(thread.pil_image(10**6)))


@pytest.mark.parametrize(
    ("data", "max_pixels", "error"),
    [
        (b"", 10**6, UnsupportedImageError),
        (b"name: not an image\n" * 20, 10**6, UnsupportedImageError),  # a text file named .jpg
        (encode("JPEG", "RGB", (64, 64), 0)[:300], 10**6, ImageDecodeError),  # truncated
        (encode("PNG", "RGB", (40, 30), 1), 1000, ImageTooLargeError),  # over the pixel limit
    ],
    ids=["empty", "text", "truncated", "pixel-limit"],
)
def test_worker_errors_keep_their_type_and_message(
    pool: DecodeProcessPool, models: dict[int, LoadedModel], data: bytes, max_pixels: int, error: type
) -> None:
    decoded_before = pool.decoded
    thread, proc = both_roads(data, pool, models, max_pixels)
    assert type(thread.cause) is type(proc.cause) is error
    assert proc.error == thread.error and proc.error and "probe.img" in proc.error
    with pytest.raises(error) as raised:
        pool.run(data, name="x.jpg", max_pixels=max_pixels, preprocessors={1: models[1].preprocess})
    assert str(raised.value) == thread.error.replace("probe.img", "x.jpg")
    assert pool.decoded == decoded_before  # refused images are not counted as decoded


def test_other_callables_and_cold_pools_stay_on_the_thread_road(
    pool: DecodeProcessPool, models: dict[int, LoadedModel]
) -> None:
    data = encode("PNG", "RGB", (20, 40), 4)
    assert preprocess_spec(lambda image: models[1].preprocess(image)) is None
    assert preprocess_spec(models[1].preprocess) == models[1].preprocess_config
    decoded_before = pool.decoded
    p = prepare_bytes(
        "x",
        data,
        name="x",
        max_pixels=10**6,
        preprocessors={1: lambda im: models[1].preprocess(im)},
        processes=pool,
    )
    assert 1 in p.tensors and pool.decoded == decoded_before  # decoded in this thread
    cold = DecodeProcessPool(1)  # never started: no worker to take the image
    assert not cold.ready and cold.run(data, name="x", max_pixels=10**6, preprocessors={}) is None
    cold.close()
    with pytest.raises(ValueError, match="forkserver"):
        DecodeProcessPool(1, start_method="fork")
    with pytest.raises(ValueError, match="at least 1"):
        DecodeProcessPool(0)


def test_results_too_large_for_the_shared_buffer_come_through_the_pipe(
    models: dict[int, LoadedModel],
) -> None:
    small = DecodeProcessPool(1, buffer_bytes=4096)  # smaller than one 64x32 float32 input (24 KB)
    small.start()
    try:
        assert small.wait_ready(START_S)
        thread, proc = both_roads(encode("WEBP", "RGB", (50, 70), 9), small, models)
        assert small.decoded == 1
        for model_id in models:
            assert torch.equal(thread.tensors[model_id], proc.tensors[model_id])
        assert proc.tensors[1].data_ptr() != proc.tensors[3].data_ptr()
    finally:
        small.close()


def test_a_killed_worker_is_replaced_and_its_image_retried_in_the_new_one(
    models: dict[int, LoadedModel], caplog: pytest.LogCaptureFixture
) -> None:
    pool = DecodeProcessPool(1)
    pool.start()
    try:
        assert pool.wait_ready(START_S)
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)
        assert not wait_gone([pid])
        data = encode("PNG", "RGB", (30, 60), 5)
        with caplog.at_level(logging.WARNING, logger="service.imaging.processes"):
            thread, retried = both_roads(data, pool, {1: models[1]})
        assert retried.error is None and torch.equal(retried.tensors[1], thread.tensors[1])
        assert any("died" in r.getMessage() for r in caplog.records)
        # Retried in the replacement, never sent back to this (the service's) process.
        assert (pool.fallbacks, pool.restarts, pool.retries, pool.decoded) == (0, 1, 1, 1)
        (new_pid,) = pool.pids()
        assert new_pid != pid

        # A worker killed while images stream through it: every image still comes out right,
        # the one in flight from a retry, those waiting from the replacement.
        images = [encode("PNG", "RGB", (300, 300), 100 + i) for i in range(24)]
        with ThreadPoolExecutor(2) as threads:
            decoded = pool.decoded
            futures = [threads.submit(both_roads, d, pool, {1: models[1]}) for d in images]
            while pool.decoded < decoded + 2 and not futures[-1].done():
                time.sleep(0.001)
            os.kill(new_pid, signal.SIGKILL)
            results = [f.result() for f in futures]
        results.append(both_roads(images[0], pool, {1: models[1]}))  # notices the death if none did
        for thread, proc in results:
            assert proc.error is None and torch.equal(thread.tensors[1], proc.tensors[1])
        assert pool.restarts == 2 and pool.retries == 2 and pool.fallbacks == pool.crashed == 0
        assert pool.decoded == 1 + 25
        assert pool.wait_ready(START_S) and pool.pids() and new_pid not in pool.pids()
    finally:
        pids = pool.pids()
        pool.close()
    assert not wait_gone(pids, timeout=0.5)  # close() returns once they have exited


def test_closing_while_workers_start_leaves_none_behind(caplog: pytest.LogCaptureFixture) -> None:
    def workers() -> set[int]:
        return {p.pid for p in multiprocessing.active_children() if p.name == "reid-decode"}

    others = workers()  # other tests' pools
    pool = DecodeProcessPool(2)
    with caplog.at_level(logging.WARNING, logger="service.imaging.processes"):
        pool.start()  # returns at once; the workers start in the background
        pool.close()
    after_close = workers() - others
    # Once a second pool is up, any worker the first one was still starting would be up too.
    probe = DecodeProcessPool(1)
    probe.start()
    assert probe.wait_ready(START_S)
    leftover = workers() - others - set(probe.pids())
    probe.close()
    assert not after_close and not leftover
    assert not pool.ready and not pool.wait_ready(0)
    assert not caplog.records  # a shutdown is not an error
    data = encode("PNG", "RGB", (8, 8), 8)
    assert pool.run_specs(data, name="x", max_pixels=100, specs={}) is None  # closed: the caller decodes


def test_workers_exit_when_the_service_process_is_killed() -> None:
    script = (
        "import os, signal, sys\n"
        "from service.imaging.processes import DecodeProcessPool\n"
        "if __name__ == '__main__':\n"
        "    pool = DecodeProcessPool(2)\n"
        "    pool.start()\n"
        "    assert pool.wait_ready(60)\n"
        "    print(' '.join(map(str, pool.pids())), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    assert not wait_gone(pids), "decode workers outlived their service"


def test_settings_and_decoder() -> None:
    assert Settings(decode_processes=0).decode_processes == 0
    with pytest.raises(ValidationError):
        Settings(decode_processes=-1)
    os.environ["REID_DECODE_PROCESSES"] = "3"
    try:
        assert Settings().decode_processes == 3
    finally:
        del os.environ["REID_DECODE_PROCESSES"]
    assert Settings().decode_processes >= 0
    decoder = ImageDecoder(1, max_pixels=100, processes=0)
    assert decoder.processes is None
    decoder.close()
    with pytest.raises(ValueError, match=">= 0"):
        ImageDecoder(1, max_pixels=100, processes=-1)
    # The header facts of a decoded image are the probe's (mode before the RGB conversion).
    data = encode("JPEG", "L", (16, 8), 6, progressive=True)
    assert decode_image(data, max_pixels=10**6).info == probe_image(data, max_pixels=10**6)


def _embeddings(client: TestClient) -> dict[str, bytes]:
    state = client.app.state.service
    with state.sessions() as session:
        rows = session.execute(select(Item.content_hash, Embedding.vector).join(Embedding))
        return {content_hash: vector for content_hash, vector in rows}


def test_the_service_embeds_the_same_with_processes_and_leaves_none_behind(
    tmp_path: Path, model_dirs: dict[str, Path], market_root: Path, datasets_root: Path
) -> None:
    png = encode("PNG", "RGBA", (40, 80), 7)
    results = {}
    for processes in (0, 2):
        settings = make_settings(
            tmp_path / str(processes),
            f"sqlite:///{tmp_path / f'{processes}.sqlite3'}",
            model_dirs,
            datasets_root,
            decode_processes=processes,
        )
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            pool = client.app.state.service.decoder.processes
            assert (pool is None) == (processes == 0)
            if pool is not None:
                assert pool.wait_ready(START_S)
                pids = pool.pids()
            gid = client.post("/v1/galleries", json={"name": "g", "model": "person"}).json()["id"]
            r = client.post(
                f"/v1/galleries/{gid}/ingest-jobs",
                json={"source": {"layout": "market1501", "root": str(market_root), "split": "gallery"}},
            )
            job = wait_for_job(client, r.headers["location"])
            assert job["status"] == "succeeded" and job["failed"] == 0 and job["done"] > 0, job
            r = client.post(f"/v1/galleries/{gid}/items", files=[("image", ("x.png", png, "image/png"))])
            assert r.status_code == 201, r.text
            assert r.json()["items"][0]["width"] == 40 and r.json()["items"][0]["height"] == 80
            r = client.post(
                f"/v1/galleries/{gid}/items", files=[("image", ("y.jpg", b"GIF89a", "image/jpeg"))]
            )
            assert r.status_code == 415, r.text
            results[processes] = _embeddings(client)
            if pool is not None:
                assert pool.decoded >= job["done"] + 1 and pool.fallbacks == 0
        if pool is not None:
            assert pids and not wait_gone(pids, timeout=0.5), "decode workers outlived the service"
    assert results[0].keys() == results[2].keys() and len(results[0]) == job["done"] + 1
    for content_hash, vector in results[0].items():
        a = np.frombuffer(vector, dtype=np.float32)
        b = np.frombuffer(results[2][content_hash], dtype=np.float32)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
