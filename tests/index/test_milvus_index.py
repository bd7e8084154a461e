"""Milvus-specific behaviour: filter expressions, collections, persistence and reconnection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index import IndexBackendError, IndexInputError, SearchFilter, SnapshotError, create_index, load_index
from tests.index.test_index_contract import (
    assert_same_top_k,
    brute_force,
    clustered,
    faiss_single_thread,  # noqa: F401  (autouse fixture)
    make_attributes,
)

pytest.importorskip("pymilvus", reason="milvus extra not installed (pip install '.[milvus]')")
pytest.importorskip("milvus_lite", reason="milvus extra not installed (pip install '.[milvus]')")

from index import milvus_index as mi

pytestmark = pytest.mark.milvus

DIM = 8


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("milvus") / "unit.db")


def test_filter_expressions() -> None:
    expr = mi._filter_expr(
        SearchFilter(cameras={2, 1}, exclude_cameras={7}, time_from=10, time_to=20.5, exclude_identity=3)
    )
    assert expr == (
        "camera in [1, 2] and camera not in [7] and captured_at >= 10.0 and captured_at <= 20.5 "
        "and identity != 3"
    )
    assert mi._filter_expr(SearchFilter()) == ""
    assert mi._filter_expr(SearchFilter(cameras=frozenset())) == "id < 0"
    assert mi._in_expr("id", np.array([5, 9])) == "id in [5, 9]"


def test_long_allow_lists_are_split_and_merged(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mi, "_IDS_PER_EXPR", 25)
    index = create_index("milvus", spec="flat", dim=DIM, uri=uri, collection="split")
    x = clustered(400, DIM)
    ids = np.arange(400) * 2
    attrs = make_attributes(400)
    index.add(ids, x, attributes=attrs)
    allowed = ids[::3]  # 134 ids: six expressions
    flt = SearchFilter(allowed_ids=allowed, exclude_cameras={4})
    q = clustered(10, DIM, seed=3)
    mask = np.isin(ids, allowed) & (attrs.camera != 4)
    assert_same_top_k(index.search(q, 12, filter=flt), *brute_force(x, ids, q, 12, mask))
    index.drop()


def test_existing_collection_of_another_dimension_is_refused(uri: str) -> None:
    first = create_index("milvus", spec="flat", dim=DIM, uri=uri, collection="dims")
    first.add([1], clustered(1, DIM))
    with pytest.raises(IndexInputError, match="dimension 8, not 16"):
        create_index("milvus", spec="flat", dim=16, uri=uri, collection="dims")
    replaced = create_index("milvus", spec="flat", dim=16, uri=uri, collection="dims", drop_existing=True)
    assert len(replaced) == 0
    replaced.drop()


def test_a_second_client_sees_the_same_collection(uri: str) -> None:
    writer = create_index("milvus", spec="hnsw", dim=DIM, uri=uri, collection="shared")
    x = clustered(50, DIM)
    writer.add(np.arange(50), x, attributes={"camera": np.arange(50) % 2})
    writer.remove([3, 4])
    reader = create_index("milvus", spec="hnsw", dim=DIM, uri=uri, collection="shared")
    assert len(reader) == 48 and 3 not in reader and 5 in reader
    result = reader.search(x[:5], 3, filter=SearchFilter(cameras={1}))
    assert (result.ids[result.ids >= 0] % 2 == 1).all()
    writer.drop()


def test_save_writes_a_manifest_without_secrets_and_load_reconnects(uri: str, tmp_path: Path) -> None:
    index = create_index("milvus", spec="flat", dim=DIM, uri=uri, collection="persist", token="root:Milvus")
    x = clustered(30, DIM)
    index.add(np.arange(30), x)
    manifest = index.save(tmp_path, last_seq=12)
    assert (manifest.backend, manifest.count, manifest.last_seq, manifest.checksum) == ("milvus", 30, 12, "")
    text = (tmp_path / "manifest.json").read_text()
    assert "root:Milvus" not in text and "token" not in text
    assert json.loads(text)["options"]["collection"] == "persist"
    # Operations after the snapshot are already on the server: replay skips present ids.
    index.add([100], clustered(1, DIM, seed=5))
    loaded = load_index(tmp_path, token="root:Milvus")
    assert len(loaded) == 31
    replay = np.array([100, 101])
    new = replay[~loaded.contains(replay)]
    loaded.add(new, clustered(len(new), DIM, seed=6))
    assert len(loaded) == 32
    index.drop()
    with pytest.raises(SnapshotError, match="does not exist"):
        load_index(tmp_path)


def test_tune_and_short_rows_are_retried_thoroughly(uri: str) -> None:
    index = create_index("milvus", spec="ivf-flat", dim=DIM, uri=uri, collection="tune", nlist=16, nprobe=1)
    x = clustered(600, DIM)
    index.add(np.arange(600), x)
    index.flush()
    allowed = np.array([5, 200, 431, 599])  # few items in lists one probe would mostly miss
    result = index.search(x[:6], 4, filter=SearchFilter(allowed_ids=allowed))
    assert all(set(row.tolist()) == set(allowed.tolist()) for row in result.ids)
    assert not result.short.any()
    index.tune(nprobe=16, ef_search=50)
    assert index._search_params(10)["params"] == {"nprobe": 16}
    assert index._search_params(10, widen=True)["params"] == {"nprobe": 65_536}
    with pytest.raises(IndexInputError, match="tune"):
        index.tune(nlist=3)
    index.drop()


def test_unreachable_server_is_a_backend_error() -> None:
    with pytest.raises(IndexBackendError, match=r"cannot connect to Milvus at http://127\.0\.0\.1:1"):
        create_index("milvus", spec="flat", dim=DIM, uri="http://127.0.0.1:1", timeout=2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"spec": "annoy"}, "unknown Milvus spec"),
        ({"consistency_level": "Eventual"}, "consistency_level"),
        ({"nprobe": 0}, "nprobe"),
        ({"spec": "ivf-pq", "pq_m": 3}, "must divide"),
    ],
)
def test_bad_options(uri: str, options: dict, message: str) -> None:
    spec = options.pop("spec", "flat")
    with pytest.raises(IndexInputError, match=message):
        create_index("milvus", spec=spec, dim=DIM, uri=uri, collection="never", **options)
