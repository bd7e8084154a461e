"""FAISS-specific behaviour: training, HNSW tombstones, selectors, options, the item table, locking."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index import (
    IndexBackendError,
    IndexInputError,
    IndexNotTrainedError,
    SearchFilter,
    create_index,
    load_index,
    measure_recall,
)
from index import faiss_index as fi
from index.base import Attributes, ReadWriteLock
from index.faiss_attributes import AttributeTable
from index.faiss_index import FaissIndex
from index.faiss_specs import default_pq_m, nlist_for, pq_nbits_for
from tests.index.test_index_contract import (
    assert_same_top_k,
    brute_force,
    clustered,
    faiss_single_thread,  # noqa: F401  (autouse fixture)
    make_attributes,
)

DIM = 16


def test_import_index_does_not_import_backends() -> None:
    code = "import sys, index; print('pymilvus' in sys.modules, 'index.milvus_index' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------------------------- training


def test_trained_spec_is_exact_until_it_trains() -> None:
    index = create_index("faiss", spec="ivf-flat", dim=DIM, train_min=500, nprobe=1)
    x = clustered(800, DIM)
    ids = np.arange(800) + 10
    index.add(ids[:499], x[:499])
    assert not index.is_trained and index.nlist is None
    q = clustered(20, DIM, seed=3)
    # Untrained: the flat fallback answers exactly even with nprobe=1.
    assert_same_top_k(index.search(q, 10), *brute_force(x[:499], ids[:499], q, 10))
    index.add(ids[499:], x[499:])
    assert index.is_trained
    assert index.nlist == nlist_for(800) == 20
    result = index.search(x[::50], 1)
    np.testing.assert_array_equal(result.ids[:, 0], ids[::50])
    assert len(index) == 800


def test_untrained_snapshot_trains_after_load(tmp_path: Path) -> None:
    index = create_index("faiss", spec="ivf-sq8", dim=DIM, train_min=300)
    x = clustered(400, DIM)
    index.add(np.arange(200), x[:200])
    index.save(tmp_path)
    loaded = load_index(tmp_path)
    assert not loaded.is_trained and len(loaded) == 200
    loaded.add(np.arange(200, 400), x[200:])
    assert loaded.is_trained and len(loaded) == 400


def test_explicit_train_below_train_min() -> None:
    index = create_index("faiss", spec="ivf-pq", dim=DIM, pq_m=4)
    index.add(np.arange(20), clustered(20, DIM))
    with pytest.raises(IndexNotTrainedError, match="at least 39"):
        index.train()
    index.add(np.arange(20, 300), clustered(300, DIM)[20:])
    assert not index.is_trained  # default train_min (9984) not reached
    index.train()
    assert index.is_trained and index.nlist == nlist_for(300)
    # 2-bit codes on 300 vectors are coarse: the top hit is a view of the same identity.
    np.testing.assert_array_equal(index.search(clustered(300, DIM)[:5], 1).ids[:, 0] // 6, 0)
    create_index("faiss", spec="flat", dim=DIM).train()  # nothing to train: no error


def test_reset_untrains() -> None:
    index = create_index("faiss", spec="ivf-flat", dim=DIM, train_min=100)
    index.add(np.arange(150), clustered(150, DIM))
    assert index.is_trained
    index.reset()
    assert not index.is_trained and len(index) == 0


def test_sizing_rules() -> None:
    assert nlist_for(100) == 2  # capped: >= 39 training points per list
    assert nlist_for(1_000_000) == 4000  # ~4 sqrt(n)
    assert nlist_for(10_000, requested=64) == 64
    assert default_pq_m(384) == 48 and default_pq_m(768) == 96 and default_pq_m(36) == 4
    assert pq_nbits_for(131_072, 8) == 8 and pq_nbits_for(1200, 8) == 4


def test_growth_past_the_training_size_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    index = create_index("faiss", spec="ivf-flat", dim=DIM, train_min=40)
    x = clustered(400, DIM)
    index.add(np.arange(40), x[:40])
    with caplog.at_level(logging.WARNING, logger="index.faiss_index"):
        for start in range(40, 400, 40):
            index.add(np.arange(start, start + 40), x[start : start + 40])
    assert sum("rebuild it from the database" in r.message for r in caplog.records) == 1


def test_ivf_pq_rerank_gives_exact_scores() -> None:
    x = clustered(1500, 32)
    ids = np.arange(1500)
    q = clustered(30, 32, seed=8)
    exact = {}
    for rerank in (True, False):
        index = create_index("faiss", spec="ivf-pq", dim=32, train_min=1000, pq_m=4, nprobe=8, rerank=rerank)
        index.add(ids, x)
        result = index.search(q, 10)
        true_scores = np.einsum("qd,qkd->qk", q / np.linalg.norm(q, axis=1, keepdims=True), x[result.ids])
        exact[rerank] = np.abs(result.scores - true_scores).max()
    assert exact[True] < 1e-5 < exact[False]


# ----------------------------------------------------------------------------------------- HNSW


def test_hnsw_removal_uses_tombstones_then_rebuilds(caplog: pytest.LogCaptureFixture) -> None:
    index = create_index("faiss", spec="hnsw", dim=DIM, rebuild_fraction=0.3, hnsw_m=8)
    x = clustered(500, DIM)
    ids = np.arange(500) + 1
    index.add(ids, x)
    assert index.remove(ids[:100]) == 100  # 20%: kept as tombstones
    assert len(index._tombstones) == 100 and index._cpu.ntotal == 500
    result = index.search(x[:100], 10)
    assert not np.isin(result.ids, ids[:100]).any() and not result.short.any()
    with caplog.at_level(logging.INFO, logger="index.faiss_index"):
        index.remove(ids[100:160])  # 32% > 30%: the graph is rebuilt without them
    assert "rebuilding HNSW" in caplog.text
    assert len(index._tombstones) == 0 and index._cpu.ntotal == 340
    result = index.search(x[160:200], 1)
    np.testing.assert_array_equal(result.ids[:, 0], ids[160:200])


def test_hnsw_readding_a_tombstoned_id_uses_the_new_vector() -> None:
    index = create_index("faiss", spec="hnsw", dim=DIM)
    x = clustered(50, DIM)
    index.add(np.arange(50), x)
    index.remove([7])
    index.add([7], x[20:21])  # new vector for id 7: same as item 20
    result = index.search(x[7:8], 50)
    assert (result.ids[0] == 7).sum() == 1
    top = index.search(x[20:21], 2).ids[0]
    assert set(top.tolist()) == {7, 20}


def test_hnsw_tombstones_survive_save_load(tmp_path: Path) -> None:
    index = create_index("faiss", spec="hnsw", dim=DIM)
    x = clustered(200, DIM)
    index.add(np.arange(200), x)
    index.remove(np.arange(0, 200, 10))
    index.save(tmp_path)
    loaded = load_index(tmp_path)
    np.testing.assert_array_equal(loaded._tombstones, np.arange(0, 200, 10))
    assert not np.isin(loaded.search(x, 5).ids, np.arange(0, 200, 10)).any()


# ------------------------------------------------------------------------------ filters/selectors


def test_selector_subset_and_bitmap_paths_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    x = clustered(1000, DIM)
    ids = np.arange(1000) * 5
    attrs = make_attributes(1000)
    q = clustered(15, DIM, seed=2)
    flt = SearchFilter(allowed_ids=ids[::3], exclude_cameras={2})
    mask = np.isin(ids, ids[::3]) & (attrs.camera != 2)
    truth = brute_force(x, ids, q, 12, mask)
    for subset_limit, bitmap_min in ((10_000, 65_536), (1, 65_536), (1, 10)):
        monkeypatch.setattr(fi, "_BITMAP_MIN_IDS", bitmap_min)
        index = create_index("faiss", spec="flat", dim=DIM, exact_subset_limit=subset_limit)
        index.add(ids, x, attributes=attrs)
        assert_same_top_k(index.search(q, 12, filter=flt), *truth)


def test_selective_filter_on_approximate_index_is_complete() -> None:
    # 5 allowed items scattered over many IVF lists with nprobe=1: the exhaustive fallback finds all.
    index = create_index("faiss", spec="ivf-flat", dim=DIM, train_min=400, nprobe=1, exact_subset_limit=1)
    x = clustered(800, DIM)
    index.add(np.arange(800), x)
    allowed = np.array([3, 150, 377, 612, 799])
    result = index.search(x[:4], 10, filter=SearchFilter(allowed_ids=allowed))
    assert result.short.all()
    assert all(set(row[row >= 0].tolist()) == set(allowed.tolist()) for row in result.ids)


# ------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("spec", "options", "message"),
    [
        ("flat", {"nprobes": 3}, "unknown FAISS option"),
        ("ivf-flat", {"nprobe": 0}, "nprobe must be >= 1"),
        ("ivf-pq", {"pq_m": 5}, "must divide"),
        ("hnsw", {"rebuild_fraction": 0.0}, "rebuild_fraction"),
        ("hnsw", {"gpu": True}, "CPU only"),
        ("ivf-hnsw", {}, "unknown FAISS spec"),
    ],
)
def test_bad_options_are_clear_errors(spec: str, options: dict, message: str) -> None:
    with pytest.raises(IndexInputError, match=message):
        create_index("faiss", spec=spec, dim=DIM, **options)


def test_bad_factory_arguments() -> None:
    with pytest.raises(IndexInputError, match="dim"):
        create_index("faiss", spec="flat")
    with pytest.raises(IndexInputError, match="dim must be a positive integer"):
        create_index("faiss", spec="flat", dim=0)
    with pytest.raises(IndexInputError, match="unknown index backend"):
        create_index("annoy", spec="flat", dim=4)


def test_gpu_required_without_a_gpu_is_a_backend_error() -> None:
    with pytest.raises(IndexBackendError, match="no GPU"):
        create_index("faiss", spec="flat", dim=DIM, gpu=True)


# --------------------------------------------------------------------------- property-based tests


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.sampled_from(["flat", "hnsw", "ivf-flat"]),
    ops=st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(0, 60), min_size=1, max_size=12, unique=True)),
        min_size=1,
        max_size=12,
    ),
)
def test_random_operation_sequences_match_a_model(spec: str, ops: list[tuple[bool, list[int]]]) -> None:
    """Any sequence of adds/removes leaves the index equal to a dict model, searches included."""
    rng = np.random.default_rng(len(ops))
    pool = clustered(61, DIM, seed=5)
    index = create_index(
        "faiss", spec=spec, dim=DIM, train_min=20, rebuild_fraction=0.5, exact_subset_limit=4
    )
    model: dict[int, np.ndarray] = {}
    for is_add, id_list in ops:
        ids = np.array(id_list)
        if is_add:
            new = ids[~np.isin(ids, list(model))]
            if len(new) < len(ids):
                with pytest.raises(IndexInputError):
                    index.add(ids, pool[ids])
            if len(new):
                index.add(new, pool[new])
                model.update({int(i): pool[i] for i in new})
        else:
            expected = int(np.isin(ids, list(model)).sum())
            assert index.remove(ids) == expected
            for i in ids:
                model.pop(int(i), None)
        assert len(index) == len(model)
    np.testing.assert_array_equal(index.ids(), np.array(sorted(model), dtype=np.int64))
    if model:
        q = pool[rng.choice(61, 5)]
        result = index.search(q, 5)
        model_ids = np.array(sorted(model))
        assert np.isin(result.ids[result.ids >= 0], model_ids).all()
        if spec == "flat":
            assert_same_top_k(result, *brute_force(np.stack([model[i] for i in model_ids]), model_ids, q, 5))
        else:
            assert ((result.ids >= 0).sum(axis=1) == min(5, len(model))).all()


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.booleans(), st.lists(st.integers(0, 3000), min_size=1, max_size=400, unique=True)),
        min_size=1,
        max_size=15,
    )
)
def test_attribute_table_matches_a_dict(ops: list[tuple[bool, list[int]]]) -> None:
    table = AttributeTable(2, store_vectors=True)
    model: dict[int, int] = {}
    for is_add, id_list in ops:
        ids = np.array(id_list, dtype=np.int64)
        if is_add:
            ids = ids[~np.isin(ids, list(model))]
            attrs = Attributes.build(len(ids), camera=ids % 7)
            table.append(ids, attrs, np.stack([ids, ids], axis=1).astype(np.float32).reshape(-1, 2))
            model.update({int(i): int(i) % 7 for i in ids})
        else:
            removed = table.remove(ids)
            assert sorted(removed.tolist()) == sorted(set(id_list) & set(model))
            for i in id_list:
                model.pop(i, None)
        assert len(table) == len(model)
    keys = np.array(sorted(model), dtype=np.int64)
    np.testing.assert_array_equal(table.ids(), keys)
    probe = np.arange(0, 3001, 7)
    np.testing.assert_array_equal(table.contains(probe), np.isin(probe, keys))
    if len(keys):
        np.testing.assert_array_equal(table.attributes_of(keys).camera, keys % 7)
        np.testing.assert_array_equal(table.vectors_of(keys)[:, 0], keys)
        allowed = table.allowed_ids(SearchFilter(cameras={3}))
        np.testing.assert_array_equal(allowed, keys[keys % 7 == 3])


# -------------------------------------------------------------------------------------- locking


def test_read_write_lock_excludes_writers_and_lets_readers_share() -> None:
    lock = ReadWriteLock()
    events: list[str] = []
    both_reading = threading.Barrier(2, timeout=5)

    def reader(name: str) -> None:
        with lock.read():
            both_reading.wait()  # would time out if readers excluded each other
            events.append(f"{name}-in")
            time.sleep(0.05)
            events.append(f"{name}-out")

    def writer() -> None:
        with lock.write():
            events.append("w-in")
            time.sleep(0.02)
            events.append("w-out")

    readers = [threading.Thread(target=reader, args=(n,)) for n in ("r1", "r2")]
    for t in readers:
        t.start()
    time.sleep(0.01)
    w = threading.Thread(target=writer)
    w.start()
    for t in [*readers, w]:
        t.join(timeout=5)
    # The writer ran alone, after both readers left.
    w_in = events.index("w-in")
    assert events[w_in + 1] == "w-out"
    assert {"r1-out", "r2-out"} <= set(events[:w_in])


def test_faiss_index_repr_and_nbytes() -> None:
    index = create_index("faiss", spec="ivf-flat", dim=DIM, train_min=1000)
    index.add(np.arange(10), clustered(10, DIM))
    assert "untrained" in repr(index)
    assert isinstance(index, FaissIndex)
    assert index.nbytes > 10 * DIM * 4


def test_tune_changes_search_knobs_without_rebuilding() -> None:
    x = clustered(2000, DIM, per_identity=2, noise=0.8)
    index = create_index("faiss", spec="ivf-flat", dim=DIM, train_min=1000, nprobe=1)
    index.add(np.arange(2000), x)
    q = clustered(50, DIM, seed=3)
    low = measure_recall(index, x, q, 10)
    index.tune(nprobe=index.nlist)  # every list: exact for ivf-flat
    assert measure_recall(index, x, q, 10) == 1.0 > low
    with pytest.raises(IndexInputError, match="tune"):
        index.tune(nlist=4)
    with pytest.raises(IndexInputError, match="nprobe"):
        index.tune(nprobe=0)
