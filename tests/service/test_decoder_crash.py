"""An image that crashes the decoder: retried once in another worker process, then failed alone.

It must never be decoded in the service process, where the same crash would take the service down.
The crash is injected with a worker decode function (the pool's ``decode``) that kills its process
on images carrying a marker, as a segfault in Pillow or libpng would.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import service.imaging.preparation as preparation
from service.app import create_app
from service.imaging.decoding import DecoderCrashedError, ImageError, ImageInfo
from service.imaging.preparation import Prepared, prepare_bytes
from service.imaging.processes import DecodeProcessPool, _decode_and_preprocess
from tests.service.conftest import jpeg_bytes, make_settings, wait_for_job
from training.data.transforms import Preprocess
from training.export import LoadedModel, load_model

START_S = 60.0  # the first pool of the session waits for the fork server to import torch
#: Bytes after a JPEG's end: the decoders ignore them, the crashing decode function looks for them.
EXIT_MARK = b"test: exit the decoder"
SEGV_MARK = b"test: segfault the decoder"


def crash_on_marked(
    data: bytes, name: str, max_pixels: int, specs: Sequence[Preprocess]
) -> tuple[ImageInfo, list[np.ndarray]]:
    """The worker's decode step, except that marked images kill the worker process."""
    if data.endswith(EXIT_MARK):
        os._exit(70)
    if data.endswith(SEGV_MARK):
        os.kill(os.getpid(), signal.SIGSEGV)
    return _decode_and_preprocess(data, name, max_pixels, specs)


@pytest.fixture(scope="module")
def person(model_dirs: dict[str, Path]) -> LoadedModel:
    return load_model(model_dirs["person"], "cpu")


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bytes of every image decoded in this (the service's) process."""
    seen: list[bytes] = []
    real = preparation.decode_image

    def recording(data: bytes, **kwargs: Any) -> Any:
        seen.append(data)
        return real(data, **kwargs)

    monkeypatch.setattr(preparation, "decode_image", recording)
    return seen


def crashing_pool(processes: int) -> DecodeProcessPool:
    pool = DecodeProcessPool(processes, decode=crash_on_marked)
    pool.start()
    assert pool.wait_ready(START_S) and len(pool.pids()) == processes
    return pool


@pytest.mark.parametrize(("processes", "mark"), [(1, EXIT_MARK), (2, SEGV_MARK)], ids=["exit-1", "segv-2"])
def test_a_crashing_image_is_retried_once_then_fails_and_is_never_decoded_here(
    person: LoadedModel, in_process: list[bytes], processes: int, mark: bytes
) -> None:
    pool = crashing_pool(processes)
    try:
        pids = pool.pids()
        good = [jpeg_bytes(1), jpeg_bytes(2)]
        bad = jpeg_bytes(3) + mark
        preprocessors = {1: person.preprocess}

        def prepare(name: str, data: bytes) -> Prepared[str]:
            return prepare_bytes(
                name, data, name=name, max_pixels=10**6, preprocessors=preprocessors, processes=pool
            )

        batch = [prepare("a.jpg", good[0]), prepare("bad.jpg", bad), prepare("b.jpg", good[1])]
        a, failed, b = batch
        assert a.error is None and b.error is None
        assert isinstance(failed.cause, DecoderCrashedError) and isinstance(failed.cause, ImageError)
        assert failed.error is not None and failed.error.startswith("bad.jpg could not be decoded")
        assert "twice" in failed.error and "Re-encode" in failed.error
        assert in_process == []  # every image stayed in the workers, each waited for a replacement
        assert (pool.retries, pool.crashed, pool.restarts) == (1, 1, 2)
        # The images after the crash were decoded by the replacements, the same as in a thread.
        for p, data in ((a, good[0]), (b, good[1])):
            thread = prepare_bytes("t", data, name="t", max_pixels=10**6, preprocessors=preprocessors)
            assert torch.equal(p.tensors[1], thread.tensors[1])
        assert pool.wait_ready(START_S) and len(pool.pids()) == processes
        assert not set(pool.pids()) & set(pids)  # both deaths were replaced
    finally:
        pool.close()


def test_a_worker_that_dies_once_has_its_image_retried_in_a_fresh_worker(
    person: LoadedModel, in_process: list[bytes]
) -> None:
    pool = crashing_pool(1)
    try:
        (pid,) = pool.pids()
        os.kill(pid, signal.SIGKILL)  # dies, as under the OOM killer, before the image arrives
        data = jpeg_bytes(4)
        p = prepare_bytes(
            "x", data, name="x.jpg", max_pixels=10**6, preprocessors={1: person.preprocess}, processes=pool
        )
        assert p.error is None and in_process == []
        assert (pool.retries, pool.crashed, pool.restarts, pool.decoded) == (1, 0, 1, 1)
        assert pool.pids() and pool.pids() != [pid]
    finally:
        pool.close()


@pytest.fixture
def client(tmp_path: Path, model_dirs: dict[str, Path], datasets_root: Path) -> Iterator[TestClient]:
    """The real app, its decode processes replaced by one whose decoder crashes on marked images."""
    settings = make_settings(
        tmp_path, f"sqlite:///{tmp_path / 'reid.sqlite3'}", model_dirs, datasets_root, decode_processes=1
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        decoder = client.app.state.service.decoder
        decoder.processes.close()
        decoder.processes = crashing_pool(1)  # closed with the app's decoder
        yield client


def test_an_upload_that_crashes_the_decoder_gets_422_and_the_service_lives_on(
    client: TestClient, in_process: list[bytes]
) -> None:
    gid = client.post("/v1/galleries", json={"name": "g", "model": "person"}).json()["id"]
    files = [
        ("image", ("ok.jpg", jpeg_bytes(5), "image/jpeg")),
        ("image", ("crash.jpg", jpeg_bytes(6) + EXIT_MARK, "image/jpeg")),
    ]
    r = client.post(f"/v1/galleries/{gid}/items", files=files)
    assert r.status_code == 422, r.text
    assert r.json()["type"] == "/problems/undecodable-image"
    assert r.json()["detail"].startswith("crash.jpg could not be decoded: the decoder process stopped")
    assert client.get(f"/v1/galleries/{gid}").json()["count"] == 0
    r = client.post(f"/v1/galleries/{gid}/search", files=files[1:])
    assert r.status_code == 422 and "crash.jpg" in r.json()["detail"], r.text
    r = client.post(f"/v1/galleries/{gid}/items", files=files[:1])
    assert r.status_code == 201, r.text
    assert in_process == []  # the second crash.jpg waited for the replacement of the first one's worker
    assert client.app.state.service.decoder.processes.crashed == 2


def test_an_ingested_image_that_crashes_the_decoder_is_one_failed_item(
    client: TestClient, datasets_root: Path, in_process: list[bytes]
) -> None:
    root = datasets_root / "crashing"
    shutil.rmtree(root, ignore_errors=True)
    folder = root / "gallery" / "p1"
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"c1_{i}.jpg").write_bytes(jpeg_bytes(10 + i))
    (folder / "c2_crash.jpg").write_bytes(jpeg_bytes(13) + SEGV_MARK)
    gid = client.post("/v1/galleries", json={"name": "g", "model": "person"}).json()["id"]
    r = client.post(
        f"/v1/galleries/{gid}/ingest-jobs",
        json={"source": {"layout": "folder", "root": str(root), "split": "gallery"}},
    )
    assert r.status_code == 202, r.text
    job = wait_for_job(client, r.headers["location"])
    assert (job["status"], job["total"], job["done"], job["failed"]) == ("succeeded", 4, 3, 1), job
    assert client.get(f"/v1/galleries/{gid}").json()["count"] == 3
    (error,) = client.get(job["errors_url"]).json()["items"]
    assert error["source"].endswith("c2_crash.jpg")
    assert error["error"].startswith("c2_crash.jpg could not be decoded: the decoder process stopped")
    assert in_process == []
