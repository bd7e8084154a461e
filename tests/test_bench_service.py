"""The service benchmark (``bench/service.py``): its gallery, its reference, and a quick run end to end.

The quick run starts two real ``reid serve`` processes, as the benchmark does at full size; the
other tests check the pieces the figures rest on without a server: the search gallery the server
loads from a snapshot is the one a rebuild from the database gives, and the reference forward and
search really embed and search the query.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.service import (
    QueryReference,
    combine_references,
    drop_snapshot,
    index_placement,
    insert_random_gallery,
    ratios_to_reference,
    snapshot_gallery,
    timed_ms,
)

REPO = Path(__file__).resolve().parents[1]
DIM = 16


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database with one model and one empty gallery (copied by each test)."""
    from service.db import migrate
    from service.db.session import create_db_engine, make_session_factory
    from service.db.tables import Gallery, ModelRow

    path = tmp_path_factory.mktemp("template") / "reid.sqlite3"
    engine = create_db_engine(f"sqlite:///{path}")
    migrate.upgrade(engine)
    with make_session_factory(engine)() as session, session.begin():
        model = ModelRow(name="person", version="0123456789ab", kind="person", dim=DIM, path="m", meta={})
        session.add(model)
        session.flush()
        session.add(Gallery(name="big", model_id=model.id, index_spec="flat"))
    engine.dispose()
    return path


def _database(template: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reid.sqlite3"
    shutil.copy(template, path)
    return f"sqlite:///{path}"


def _manager(database_url: str, snapshot_dir: Path, backend: str):  # -> (IndexManager, Engine)
    from service.db.session import create_db_engine, make_session_factory
    from service.gallery_index import IndexManager

    engine = create_db_engine(database_url)
    return IndexManager(make_session_factory(engine), snapshot_dir, backend=backend), engine


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 700), chunk=st.integers(1, 300), log_operations=st.booleans())
def test_inserted_gallery_matches_its_database_rows(
    template_db: Path, tmp_path: Path, n: int, chunk: int, log_operations: bool
) -> None:
    from sqlalchemy import func, select

    from service.db.session import create_db_engine, make_session_factory
    from service.db.tables import Embedding, Item, Operation
    from service.gallery_index import item_attributes, vectors_from_bytes

    folder = tmp_path / f"db-{n}-{chunk}-{int(log_operations)}-{time.monotonic_ns()}"
    url = _database(template_db, folder)
    rows = insert_random_gallery(url, 1, 1, DIM, n, seed=3, log_operations=log_operations, chunk=chunk)

    assert len(rows) == n and rows.vectors.shape == (n, DIM)
    assert (np.diff(rows.ids) > 0).all()
    np.testing.assert_allclose(np.linalg.norm(rows.vectors, axis=1), 1.0, rtol=1e-5)
    engine = create_db_engine(url)
    with make_session_factory(engine)() as session:
        result = session.execute(
            select(Item, Embedding.vector).join(Embedding, Embedding.item_id == Item.id).order_by(Item.id)
        ).all()
        operations = session.scalar(select(func.count()).select_from(Operation))
    engine.dispose()
    items = [r[0] for r in result]
    np.testing.assert_array_equal([i.id for i in items], rows.ids)
    np.testing.assert_array_equal(vectors_from_bytes([r[1] for r in result], DIM), rows.vectors)
    # The attributes are what the service derives from the stored rows, exactly.
    stored = item_attributes(items)
    for name in ("camera", "identity", "captured_at"):
        np.testing.assert_array_equal(getattr(rows.attributes, name), getattr(stored, name))
    assert operations == (n if log_operations else 0)
    assert len({i.content_hash for i in items}) == n


def _search_all(index, queries: np.ndarray, camera: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from index import SearchFilter

    plain = index.search(queries, 10)
    filtered = index.search(queries, 10, filter=SearchFilter(cameras=[camera]))
    return plain.ids, filtered.ids, plain.scores


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_snapshot_gallery_is_what_a_rebuild_from_the_database_gives(
    template_db: Path, tmp_path: Path, backend: str
) -> None:
    url = _database(template_db, tmp_path / "db")
    rows = insert_random_gallery(url, 1, 1, DIM, 2_500, seed=5, log_operations=False, chunk=1_000)
    snapshots = tmp_path / "snapshots"
    folder = snapshot_gallery(url, snapshots, 1, 1, rows, backend=backend, chunk=700)
    assert folder.is_dir()

    loaded, engine = _manager(url, snapshots, backend)
    rebuilt, engine2 = _manager(url, tmp_path / "no-snapshots", backend)
    try:
        from_snapshot = loaded.open(1, 1, DIM, "flat")
        from_database = rebuilt.open(1, 1, DIM, "flat")
        assert from_snapshot.snapshot_seq >= 0, "the server would not load this snapshot"
        assert from_database.snapshot_seq == -1
        assert len(from_snapshot) == len(from_database) == len(rows)
        queries = np.random.default_rng(0).standard_normal((8, DIM)).astype(np.float32)
        camera = int(rows.attributes.camera[0])
        for got, want in zip(
            _search_all(from_snapshot.index, queries, camera),
            _search_all(from_database.index, queries, camera),
            strict=True,
        ):
            np.testing.assert_allclose(got, want, rtol=1e-6)
    finally:
        loaded.close()
        rebuilt.close()
        engine.dispose()
        engine2.dispose()

    # The rebuild start: the snapshot is forgotten, so a start-up rebuilds from the database.
    drop_snapshot(url, snapshots, 1, 1)
    again, engine3 = _manager(url, snapshots, backend)
    try:
        gi = again.open(1, 1, DIM, "flat")
        assert gi.snapshot_seq == -1 and len(gi) == len(rows)
    finally:
        again.close()
        engine3.dispose()


def test_reference_embeds_and_searches_the_query(tmp_path: Path) -> None:
    import io

    import torch
    from PIL import Image

    from bench.server import export_model
    from training.export import load_model

    model_dir = export_model(tmp_path / "model", "mobilenetv3_small_050", (64, 32))
    model = load_model(model_dir, device="cpu")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    query = buf.getvalue()
    with Image.open(io.BytesIO(query)) as img:
        own = model.embed_images([img.convert("RGB")])[0]
    gallery = np.random.default_rng(2).standard_normal((500, model.dim)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    gallery[123] = own  # the query's own embedding: the search must rank it first

    device, dtype = index_placement("faiss", model.dim)
    assert (device.type, dtype) == ("cpu", torch.float32)  # FAISS flat on a CPU
    assert index_placement("torch", model.dim) == (torch.device("cpu"), torch.float32)
    reference = QueryReference(model_dir, "cpu", query, gallery, device, dtype)
    scores, rows = reference.search()
    assert int(rows[0, 0]) == 123 and float(scores[0, 0]) == pytest.approx(1.0, abs=1e-5)
    assert rows.shape == (1, 10)
    figures = reference.measure(min_iters=3, seconds=0.0)
    assert figures["forward"]["iters"] >= 3 and figures["forward"]["median_ms"] > 0
    assert figures["search"]["median_ms"] > 0
    assert figures["reference_ms"] == pytest.approx(
        figures["forward"]["median_ms"] + figures["search"]["median_ms"], abs=1e-3
    )
    described = reference.describe()
    assert described["model_dtype"] == "float32" and described["cuda_graphs"] is False
    assert described["gallery_shape"] == [500, model.dim]


def test_timed_ms_times_what_it_runs() -> None:
    result = timed_ms(lambda: time.sleep(0.002), "cpu", min_iters=7, seconds=0.0, warmup=1)
    assert result["iters"] == 7
    assert 2.0 <= result["median_ms"] <= result["p95_ms"]


def test_reference_takes_the_lowest_medians_and_ratios_follow_it() -> None:
    def round_(forward: float, search: float) -> dict:
        return {"forward": {"median_ms": forward, "iters": 9}, "search": {"median_ms": search, "iters": 8}}

    ref = combine_references([round_(2.0, 0.5), round_(1.5, 0.75), round_(3.0, 0.6)])
    assert (ref["forward_ms"], ref["search_ms"], ref["reference_ms"]) == (1.5, 0.5, 2.0)
    assert [r["forward_ms"] for r in ref["rounds"]] == [2.0, 1.5, 3.0]
    with pytest.raises(ValueError, match="at least one round"):
        combine_references([])
    assert ratios_to_reference({"p50_ms": 5.0, "p99_ms": 9.0}, 2.0) == {"p50": 2.5, "p99": 4.5}
    assert ratios_to_reference({"p50_ms": None, "p99_ms": None}, 2.0) == {"p50": None, "p99": None}


@pytest.mark.timeout(240)
def test_quick_run_reports_query_latency_against_its_reference(tmp_path: Path) -> None:
    out = tmp_path / "service.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("REID_INDEX_BACKEND", None)
    env.pop("REID_RUNTIME", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.service", "--quick", "--device", "cpu", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "service" and payload["machine"]["cpu"]
    figures = payload["figures"]
    assert figures["ingest"]["images"] > 0 and figures["ingest"]["ratio_to_forward"] > 0

    query = figures["query"]
    assert query["gallery_items"] == 5_000 and query["gallery_dim"] == figures["model"]["dim"]
    assert query["gallery_start"] == "snapshot" and query["snapshot_rejected"] is False
    assert query["index_backend"] == "faiss" and query["index_dtype"] == "float32"
    ref = query["reference"]
    assert ref["forward_ms"] > 0 and ref["search_ms"] > 0
    assert query["reference_ms"] == pytest.approx(ref["forward_ms"] + ref["search_ms"], abs=1e-3)
    assert ref["same_dtype_and_device_as_service"] is True
    # The service's default runtime (auto) runs a CNN with a model.onnx through ONNX Runtime on a CPU,
    # and the reference runs the same runtime.
    assert figures["model"]["runtime_setting"] == "auto"
    assert figures["model"]["runtime"] == ref["model_runtime"] == "onnx"
    assert ref["gallery_shape"] == [query["gallery_items"], query["gallery_dim"]]
    # Rounds before, between the levels and after: the reference is their lowest medians.
    assert len(ref["rounds"]) == len(query["levels"]) + 2
    assert ref["forward_ms"] == min(r["forward_ms"] for r in ref["rounds"])
    for level in query["levels"]:
        assert level["requests"] > 0 and level["errors"] == 0, level
        assert level["ratio_to_reference"]["p50"] == pytest.approx(
            level["p50_ms"] / query["reference_ms"], abs=0.006
        )
    single = next(level for level in query["levels"] if level["clients"] == 1)
    assert query["ratio_to_reference"] == single["ratio_to_reference"]["p50"] > 0
    assert query["p99_ratio_to_reference"] == single["ratio_to_reference"]["p99"] > 0
    assert query["empty_request_round_trip"]["p50_ms"] > 0
    # The markdown table is printed with the ratio column.
    assert "| 1 |" in proc.stdout and "p50 / reference" in proc.stdout
