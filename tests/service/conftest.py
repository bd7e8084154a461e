"""Fixtures of the service tests: tiny exported models, a tiny synthetic Market-1501, databases, apps.

Every database test runs on SQLite and, when ``REID_TEST_POSTGRES_URL`` names a PostgreSQL server
(``.ci/run`` starts one), on a fresh PostgreSQL database created for the test and dropped after it.
"""

from __future__ import annotations

import contextlib
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from service.app import create_app
from service.settings import ModelSpec, Settings

POSTGRES_ENV = "REID_TEST_POSTGRES_URL"
ARCH = "mobilenetv3_small_050"
INPUT_SIZE = (64, 32)


def _export(out: Path, *, kind: str, seed: int) -> Path:
    from training.export import export_model
    from training.model import ReIDModel

    torch.manual_seed(seed)
    model = ReIDModel(ARCH, img_size=INPUT_SIZE).eval()
    # Random running statistics make the random-init features less alike across images.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return export_model(
        model,
        out,
        kind=kind,
        name=out.name,
        preprocess={
            "size": INPUT_SIZE,
            "interpolation": "bilinear",
            "mean": (0.485, 0.456, 0.406),
            "std": (0.229, 0.224, 0.225),
        },
    )


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exported random-init models: ``person``, ``person_v2`` (other weights), ``vehicle``."""
    root = tmp_path_factory.mktemp("models")
    return {
        "person": _export(root / "person", kind="person", seed=0),
        "person_v2": _export(root / "person_v2", kind="person", seed=1),
        "vehicle": _export(root / "vehicle", kind="vehicle", seed=2),
    }


@pytest.fixture(scope="session")
def datasets_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The allowed dataset root, holding a small synthetic Market-1501 in ``market/``."""
    from training.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("datasets")
    write_synthetic(root / "market", layout="market1501", ids=8, images_per_id=6, seed=0, progress=False)
    return root


@pytest.fixture(scope="session")
def market_root(datasets_root: Path) -> Path:
    return datasets_root / "market"


def _postgres_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


@contextlib.contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """Create an empty database on the test server; drop it afterwards."""
    name = f"reid_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


DATABASES = [
    "sqlite",
    pytest.param(
        "postgresql",
        marks=[
            pytest.mark.postgres,
            pytest.mark.skipif(_postgres_url() is None, reason=f"{POSTGRES_ENV} not set (.ci/run sets it)"),
        ],
    ),
]


@pytest.fixture(params=DATABASES)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'reid.sqlite3'}"
        return
    server = _postgres_url()
    assert server is not None
    with fresh_postgres_database(server) as url:
        yield url


def make_settings(
    tmp_path: Path,
    database_url: str,
    model_dirs: dict[str, Path],
    datasets_root: Path | None = None,
    **overrides: Any,
) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "models": [ModelSpec("person", model_dirs["person"]), ModelSpec("vehicle", model_dirs["vehicle"])],
        "dataset_roots": [datasets_root] if datasets_root else [],
        "device": "cpu",
        "decode_threads": 2,
        # Tests of the worker processes start their own (test_decode_processes.py); on a 4+-core
        # machine the default would start a pool in every app of the suite.
        "decode_processes": 0,
        "ingest_batch_size": 16,
        "snapshot_interval_s": 3600,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path, database_url: str, model_dirs: dict[str, Path], datasets_root: Path) -> Settings:
    return make_settings(tmp_path, database_url, model_dirs, datasets_root)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The real app with its lifespan run (models loaded, indexes opened, workers started)."""
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def jpeg_bytes(seed: int, size: tuple[int, int] = (32, 64)) -> bytes:
    """A random RGB JPEG (width, height) that no other seed produces."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def wait_for_job(client: TestClient, location: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll a job (or evaluation) until it reaches a terminal status."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(location).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"{location} did not finish within {timeout} s: {body}")
