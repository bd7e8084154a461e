"""The one contract every index honours, run against every backend and spec.

Small clustered data (identities with several views each, like re-identification embeddings)
keeps each case fast; trained FAISS specs get a low ``train_min`` so that they train during the
test, and a low ``exact_subset_limit`` so filters go through FAISS id selectors, not only through
the exact-subset path.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np
import pytest

from index import (
    Attributes,
    IndexInputError,
    SearchFilter,
    SearchResult,
    VectorIndex,
    create_index,
    load_index,
    measure_recall,
)

DIM = 32
N = 1200

FAISS_OPTIONS: dict[str, dict[str, Any]] = {
    "flat": {},
    "ivf-flat": {"train_min": 600, "nprobe": 10},
    "ivf-sq8": {"train_min": 600, "nprobe": 10},
    "ivf-pq": {"train_min": 600, "nprobe": 10, "pq_m": 8},
    "hnsw": {"hnsw_m": 16, "ef_construction": 64, "ef_search": 32},
}
MILVUS_OPTIONS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"hnsw_m": 16, "ef_construction": 64, "ef_search": 32},
    # milvus-lite builds 128 lists whatever nlist says (it does not read pymilvus 3 index params).
    "ivf-flat": {"nlist": 16, "nprobe": 40},
}
# The torch backend runs on the CPU here (float32: exact); the same code serves CUDA in float16.
TORCH_OPTIONS: dict[str, dict[str, Any]] = {"flat": {"device": "cpu"}}
CASES = (
    [pytest.param(("faiss", spec), id=f"faiss-{spec}") for spec in FAISS_OPTIONS]
    + [
        pytest.param(("milvus", spec), id=f"milvus-{spec}", marks=pytest.mark.milvus)
        for spec in MILVUS_OPTIONS
    ]
    + [pytest.param(("torch", spec), id=f"torch-{spec}") for spec in TORCH_OPTIONS]
)


# ----------------------------------------------------------------------------------------- data


def clustered(
    n: int, dim: int = DIM, *, per_identity: int = 6, noise: float = 0.35, seed: int = 0
) -> np.ndarray:
    """Unit vectors in tight clusters (identities), like re-identification embeddings."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n // per_identity + 1, dim))
    x = centers[np.arange(n) // per_identity] + noise * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_attributes(n: int, *, seed: int = 1) -> Attributes:
    rng = np.random.default_rng(seed)
    captured = rng.uniform(1_700_000_000, 1_700_100_000, n)
    captured[rng.random(n) < 0.1] = np.nan  # some capture times unknown
    identity = np.arange(n) // 6
    identity[rng.random(n) < 0.1] = -1
    return Attributes(camera=rng.integers(0, 6, n), captured_at=captured, identity=identity)


def brute_force(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by numpy over the items where ``mask`` holds."""
    if mask is not None:
        vectors, ids = vectors[mask], ids[mask]
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_s = np.take_along_axis(scores, order, 1)
    top_i = ids[order]
    if top_s.shape[1] < k:
        pad = k - top_s.shape[1]
        top_s = np.concatenate([top_s, np.full((len(q), pad), -np.inf)], 1)
        top_i = np.concatenate([top_i, np.full((len(q), pad), -1)], 1)
    return top_s, top_i


def assert_same_top_k(
    result: SearchResult, true_scores: np.ndarray, true_ids: np.ndarray, atol: float = 1e-5
) -> None:
    """Exact results: same scores, and same ids except where true scores tie."""
    scores, ids = result
    found = ids >= 0
    assert np.array_equal(found, true_ids >= 0)
    np.testing.assert_allclose(scores[found], true_scores[found], atol=atol)
    for row in range(len(ids)):
        for col in range(ids.shape[1]):
            if ids[row, col] == true_ids[row, col] or true_ids[row, col] < 0:
                continue
            # A different id is fine only inside a group of tied scores.
            tied = np.abs(true_scores[row] - true_scores[row, col]) <= atol
            assert ids[row, col] in set(true_ids[row][tied].tolist()), (row, col)


def assert_well_formed(result: SearchResult, k: int, nq: int) -> None:
    scores, ids = result
    assert scores.shape == ids.shape == (nq, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert result.short.shape == (nq,) and result.short.dtype == bool
    for row in range(nq):
        valid = ids[row] >= 0
        n_valid = int(valid.sum())
        assert valid[:n_valid].all(), "padding only at the end"
        assert len(set(ids[row][valid].tolist())) == n_valid, "no id twice in one result"
        assert np.all(np.diff(scores[row][valid]) <= 1e-6), "scores sorted best first"
        assert np.all(scores[row][~valid] == -np.inf)
        assert result.short[row] == (n_valid < k)


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def faiss_single_thread() -> Iterator[None]:
    """Run FAISS single-threaded: tiny test indexes gain nothing from OpenMP, and on a busy 2-core
    runner its spinning worker threads make k-means 10-100x slower."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


@pytest.fixture(scope="module")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    pytest.importorskip("pymilvus", reason="milvus extra not installed (pip install '.[milvus]')")
    pytest.importorskip("milvus_lite", reason="milvus extra not installed (pip install '.[milvus]')")
    return str(tmp_path_factory.mktemp("milvus") / "contract.db")


_collections = itertools.count()


@pytest.fixture(params=CASES)
def make_index(request: pytest.FixtureRequest) -> Iterator[Callable[..., VectorIndex]]:
    """Factory of fresh, empty indexes of one backend/spec (Milvus: a new collection each)."""
    backend, spec = request.param
    created: list[Any] = []

    def factory(dim: int = DIM, **extra: Any) -> VectorIndex:
        if backend == "faiss":
            options = {"exact_subset_limit": 64, **FAISS_OPTIONS[spec], **extra}
        elif backend == "torch":
            options = {"exact_subset_limit": 64, **TORCH_OPTIONS[spec], **extra}
        else:
            uri = request.getfixturevalue("milvus_uri")
            options = {"uri": uri, "collection": f"c{next(_collections)}", **MILVUS_OPTIONS[spec], **extra}
        index = create_index(backend, spec=spec, dim=dim, **options)
        created.append(index)
        return index

    factory.backend, factory.spec = backend, spec  # type: ignore[attr-defined]
    yield factory
    for index in created:
        if hasattr(index, "drop"):
            index.drop()


def filled(
    make_index: Callable[..., VectorIndex], n: int = N
) -> tuple[VectorIndex, np.ndarray, np.ndarray, Attributes]:
    """An index holding ``n`` clustered items, added in two batches (trained specs train on the 2nd)."""
    index = make_index()
    x = clustered(n)
    ids = np.arange(n, dtype=np.int64) * 3 + 7  # sparse, non-contiguous, like database keys
    attrs = make_attributes(n)
    half = n // 2 - 10
    for sl in (slice(0, half), slice(half, n)):
        index.add(
            ids[sl],
            x[sl],
            attributes=Attributes(
                camera=attrs.camera[sl], captured_at=attrs.captured_at[sl], identity=attrs.identity[sl]
            ),
        )
    flush = getattr(index, "flush", None)
    if flush is not None:
        flush()  # Milvus: seal the segments so searches use the index, not a scan of fresh rows
    return index, x, ids, attrs


def queries_near(x: np.ndarray, nq: int = 40, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), nq, replace=False)] + 0.2 * rng.standard_normal((nq, x.shape[1])).astype(
        np.float32
    )
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------- tests


def test_satisfies_protocol_and_reports_capabilities(make_index: Callable[..., VectorIndex]) -> None:
    index = make_index()
    assert isinstance(index, VectorIndex)
    assert index.dim == DIM and index.spec == make_index.spec  # type: ignore[attr-defined]
    caps = index.capabilities
    assert caps.deletes and caps.max_k >= 1024
    assert caps.exact == (make_index.spec == "flat")  # type: ignore[attr-defined]
    assert caps.persistent == (make_index.backend == "milvus")  # type: ignore[attr-defined]
    assert len(index) == 0
    result = index.search(clustered(3), 5)
    assert_well_formed(result, 5, 3)
    assert result.short.all() and (result.ids == -1).all()


def test_add_search_and_contains(make_index: Callable[..., VectorIndex]) -> None:
    index, x, ids, _ = filled(make_index)
    assert len(index) == N
    assert ids[0] in index and ids[-1] in index and 8 not in index and -1 not in index
    np.testing.assert_array_equal(index.contains([ids[5], 1, ids[9]]), [True, False, True])
    # Every item finds itself first (clustered data has no exact duplicates).
    probe = np.arange(0, N, 37)
    result = index.search(x[probe], 5)
    assert_well_formed(result, 5, len(probe))
    np.testing.assert_array_equal(result.ids[:, 0], ids[probe])
    np.testing.assert_allclose(result.scores[:, 0], 1.0, atol=2e-2)
    assert not result.short.any()


def test_exact_specs_match_brute_force(make_index: Callable[..., VectorIndex]) -> None:
    index, x, ids, _ = filled(make_index)
    q = queries_near(x)
    result = index.search(q, 10)
    assert_well_formed(result, 10, len(q))
    if index.capabilities.exact:
        assert_same_top_k(result, *brute_force(x, ids, q, 10))
    else:
        recall = measure_recall(index, (ids, x), q, 10)
        assert recall >= 0.85, f"recall@10 {recall:.3f} on clustered data"


def test_k_larger_than_the_index_pads(make_index: Callable[..., VectorIndex]) -> None:
    index = make_index()
    x = clustered(7)
    index.add(np.arange(7) + 100, x)
    result = index.search(x[:2], 10)
    assert_well_formed(result, 10, 2)
    assert result.short.all()
    assert ((result.ids >= 0).sum(axis=1) == 7).all()
    assert set(result.ids[0][:7].tolist()) == set(range(100, 107))


def test_removed_ids_never_return(make_index: Callable[..., VectorIndex]) -> None:
    index, x, ids, _ = filled(make_index)
    gone = ids[::4]
    assert index.remove(np.concatenate([gone, [1, 2, 4]])) == len(gone)  # unknown ids ignored
    assert index.remove(gone[:10]) == 0  # already removed
    assert len(index) == N - len(gone)
    assert not index.contains(gone).any()
    q = np.concatenate([x[::4][:60], queries_near(x, 20)])
    result = index.search(q, 20)
    assert_well_formed(result, 20, len(q))
    assert not np.isin(result.ids, gone).any()
    keep = ~np.isin(ids, gone)
    if index.capabilities.exact:
        assert_same_top_k(result, *brute_force(x, ids, q, 20, keep))
    # Filters cannot resurrect them either.
    filtered = index.search(q, 20, filter=SearchFilter(allowed_ids=ids[:200]))
    assert not np.isin(filtered.ids, gone).any()
    assert not filtered.short.any()


def test_remove_everything_then_add_again(make_index: Callable[..., VectorIndex]) -> None:
    index, x, ids, _ = filled(make_index, n=300)
    assert index.remove(ids) == 300
    assert len(index) == 0
    assert (index.search(x[:3], 4).ids == -1).all()
    index.add(ids[:5], x[:5])  # a removed id may come back with a new vector
    result = index.search(x[:5], 1)
    np.testing.assert_array_equal(result.ids[:, 0], ids[:5])


def test_reset(make_index: Callable[..., VectorIndex]) -> None:
    index, x, ids, _ = filled(make_index, n=300)
    index.reset()
    assert len(index) == 0 and ids[0] not in index
    index.add(ids[:3], x[:3])
    assert len(index) == 3


FILTERS = {
    "cameras": SearchFilter(cameras=frozenset({1, 2})),
    "exclude-cameras": SearchFilter(exclude_cameras=frozenset({0, 3, 5})),
    "window": SearchFilter(time_from=1_700_020_000.0, time_to=1_700_060_000.0),
    "from": SearchFilter(time_from=1_700_090_000.0),
    "exclude-identity": SearchFilter(exclude_identity=4),
    "combined": SearchFilter(cameras=frozenset({2, 4}), time_to=1_700_080_000.0, exclude_identity=10),
    "combined-2": SearchFilter(exclude_cameras=frozenset({1}), time_from=1_700_000_000.0),
}


def test_filters_match_numpy(make_index: Callable[..., VectorIndex]) -> None:
    index, x, ids, attrs = filled(make_index)
    q = queries_near(x, 25)
    k = 15
    for name, flt in FILTERS.items():
        mask = flt.matches(attrs.camera, attrs.captured_at, attrs.identity)
        assert 64 < mask.sum() < N, name  # above exact_subset_limit: the selector path for FAISS
        result = index.search(q, k, filter=flt)
        assert_well_formed(result, k, len(q))
        returned = result.ids[result.ids >= 0]
        assert np.isin(returned, ids[mask]).all(), f"{name}: every result passes the filter"
        assert not result.short.any(), name
        if index.capabilities.exact:
            assert_same_top_k(result, *brute_force(x, ids, q, k, mask))
        else:
            true_ids = brute_force(x, ids, q, k, mask)[1]
            recall = np.mean(
                [len(np.intersect1d(a, b)) / k for a, b in zip(result.ids, true_ids, strict=True)]
            )
            assert recall >= 0.85, f"{name}: filtered recall@{k} {recall:.3f}"


def test_filter_semantics_of_unknown_values(make_index: Callable[..., VectorIndex]) -> None:
    index = make_index()
    x = clustered(4)
    index.add(
        [1, 2, 3, 4],
        x,
        attributes={
            "camera": [0, -1, 1, 0],
            "captured_at": [10.0, np.nan, 20.0, 30.0],
            "identity": [-1, 5, 5, 6],
        },
    )

    def found(flt: SearchFilter) -> set[int]:
        ids = index.search(x[:1], 4, filter=flt).ids[0]
        return set(ids[ids >= 0].tolist())

    assert found(SearchFilter(time_from=0.0)) == {1, 3, 4}  # unknown time never in a window
    assert found(SearchFilter(cameras={0})) == {1, 4}
    assert found(SearchFilter(cameras={-1})) == {2}
    assert found(SearchFilter(exclude_identity=5)) == {1, 4}  # unknown identity is kept
    assert found(SearchFilter(exclude_cameras={0}, exclude_identity=6)) == {2, 3}
    assert found(SearchFilter(cameras=frozenset())) == set()


def test_allowed_ids_and_short_flag(make_index: Callable[..., VectorIndex]) -> None:
    index, x, ids, attrs = filled(make_index)
    q = queries_near(x, 10)
    allowed = np.concatenate([ids[100:103], [5, 6, 10_000_000]])  # 3 present, 3 unknown
    result = index.search(q, 5, filter=SearchFilter(allowed_ids=allowed))
    assert_well_formed(result, 5, len(q))
    assert result.short.all()
    assert all(set(row[row >= 0].tolist()) == set(ids[100:103].tolist()) for row in result.ids)
    # A large allow list (selector path for FAISS, several expressions for Milvus).
    big = ids[::2]
    result = index.search(q, 10, filter=SearchFilter(allowed_ids=big, exclude_cameras={0}))
    mask = np.isin(ids, big) & (attrs.camera != 0)
    assert np.isin(result.ids[result.ids >= 0], ids[mask]).all()
    assert not result.short.any()
    if index.capabilities.exact:
        assert_same_top_k(result, *brute_force(x, ids, q, 10, mask))
    # Nothing passes: all short, all padding.
    result = index.search(q, 3, filter=SearchFilter(allowed_ids=np.array([1, 2])))
    assert result.short.all() and (result.ids == -1).all()


def test_save_load_round_trip(make_index: Callable[..., VectorIndex], tmp_path: Any) -> None:
    index, x, ids, attrs = filled(make_index)
    gone = ids[:50]
    index.remove(gone)
    q = queries_near(x, 20)
    flt = SearchFilter(cameras={1, 3}, exclude_identity=2)
    before, before_f = index.search(q, 10), index.search(q, 10, filter=flt)
    index.save(tmp_path / "snap", last_seq=41)
    # `load` builds a new index: called on an instance it would leave that one as it was.
    with pytest.raises(AttributeError, match=r"write `idx = \w+\.load\(path\)`"):
        index.load(tmp_path / "snap")
    loaded = load_index(tmp_path / "snap")
    assert type(loaded) is type(index) and loaded.spec == index.spec and loaded.dim == DIM
    assert len(type(index).load(tmp_path / "snap")) == N - 50
    assert len(loaded) == N - 50
    assert not loaded.contains(gone).any() and loaded.contains(ids[50:]).all()
    after, after_f = loaded.search(q, 10), loaded.search(q, 10, filter=flt)
    if make_index.backend in ("faiss", "torch") or index.capabilities.exact:  # type: ignore[attr-defined]
        # The FAISS and torch snapshots are the same index, bit for bit.
        np.testing.assert_array_equal(after.ids, before.ids)
        np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)
        np.testing.assert_array_equal(after_f.ids, before_f.ids)
    else:
        # A server may rebuild its approximate index when the collection is reloaded: same items,
        # same quality, not necessarily the same neighbours.
        keep = ~np.isin(ids, gone)
        mask = keep & flt.matches(attrs.camera, attrs.captured_at, attrs.identity)
        for result, true_ids in (
            (after, brute_force(x, ids, q, 10, keep)[1]),
            (after_f, brute_force(x, ids, q, 10, mask)[1]),
        ):
            recall = np.mean(
                [len(np.intersect1d(a, b)) / 10 for a, b in zip(result.ids, true_ids, strict=True)]
            )
            assert recall >= 0.85
        assert np.isin(after_f.ids[after_f.ids >= 0], ids[mask]).all()
    # The loaded index keeps working.
    loaded.add(gone[:5], x[:5])
    assert loaded.remove(ids[60:70]) == 10
    assert len(loaded) == N - 50 + 5 - 10


BAD_CALLS: dict[str, Callable[[VectorIndex, np.ndarray], Any]] = {
    "wrong dimension": lambda ix, x: ix.add([1, 2], x[:2, :-1]),
    "NaN vector": lambda ix, x: ix.add([1, 2], np.where(np.eye(2, DIM, dtype=bool), np.nan, x[:2])),
    "infinite vector": lambda ix, x: ix.add([1, 2], np.full((2, DIM), np.inf, np.float32)),
    "zero vector": lambda ix, x: ix.add([1, 2], np.zeros((2, DIM), np.float32)),
    "duplicate ids": lambda ix, x: ix.add([3, 3], x[:2]),
    "ids/vectors mismatch": lambda ix, x: ix.add([1, 2, 3], x[:2]),
    "float ids": lambda ix, x: ix.add([1.5, 2.0], x[:2]),
    "negative id": lambda ix, x: ix.add([-4, 2], x[:2]),
    "attribute length": lambda ix, x: ix.add([1, 2], x[:2], attributes={"camera": [1]}),
    "unknown attribute": lambda ix, x: ix.add([1, 2], x[:2], attributes={"colour": [1, 2]}),
    "query dimension": lambda ix, x: ix.search(x[:1, :-2], 3),
    "NaN query": lambda ix, x: ix.search(np.full((1, DIM), np.nan), 3),
    "k = 0": lambda ix, x: ix.search(x[:1], 0),
    "k < 0": lambda ix, x: ix.search(x[:1], -2),
    "k not an int": lambda ix, x: ix.search(x[:1], 2.5),
    "k above max": lambda ix, x: ix.search(x[:1], ix.capabilities.max_k + 1),
    "2-D ids to remove": lambda ix, x: ix.remove([[1, 2]]),
    "filter not a SearchFilter": lambda ix, x: ix.search(x[:1], 2, filter={"cameras": [1]}),
}


def test_bad_input_is_a_clear_error(make_index: Callable[..., VectorIndex]) -> None:
    index = make_index()
    x = clustered(4)
    for name, bad in BAD_CALLS.items():
        with pytest.raises(IndexInputError) as info:
            bad(index, x)
        assert len(str(info.value)) > 20, name
        assert len(index) == 0, f"{name}: nothing half-added"
    with pytest.raises(IndexInputError, match="maximum"):
        index.search(x[:1], index.capabilities.max_k + 1)
    with pytest.raises(IndexInputError, match="NaN"):
        index.add([1], np.full((1, DIM), np.nan))
    with pytest.raises(IndexInputError, match=r"shape \(n, 32\)"):
        index.add([1], x[:1, :8])


def test_adding_a_present_id_is_rejected_whole(make_index: Callable[..., VectorIndex]) -> None:
    index = make_index()
    x = clustered(6)
    index.add([1, 2, 3], x[:3])
    with pytest.raises(IndexInputError, match="already in the index"):
        index.add([4, 2], x[3:5])
    assert len(index) == 3 and 4 not in index
    assert index.search(x[:1], 1, filter=None).ids[0, 0] == 1


def test_k_limit_is_the_documented_one(make_index: Callable[..., VectorIndex]) -> None:
    index = make_index()
    expected = 16384 if make_index.backend == "milvus" else 2048  # type: ignore[attr-defined]
    assert index.capabilities.max_k == expected
    index.add([1], clustered(1))
    assert index.search(clustered(1), expected).ids.shape == (1, expected)


def test_concurrent_searches_during_mutations(make_index: Callable[..., VectorIndex]) -> None:
    index = make_index()
    x = clustered(900, seed=3)
    ids = np.arange(900, dtype=np.int64) + 1
    added: set[int] = set()
    removed_done: set[int] = set()
    errors: list[BaseException] = []
    violations: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    q_all = queries_near(x, 64, seed=9)

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            with lock:
                removed_before = set(removed_done)
            q = q_all[rng.choice(64, 4, replace=False)]
            try:
                result = index.search(q, 8)
                assert_well_formed(result, 8, len(q))
            except BaseException as exc:  # collected and re-raised in the main thread
                errors.append(exc)
                return
            with lock:
                ever = set(added)
            for value in result.ids[result.ids >= 0].tolist():
                if value not in ever:
                    violations.append(f"{value} returned but never added")
                if value in removed_before:
                    violations.append(f"{value} returned after its removal completed")

    threads = [threading.Thread(target=searcher, args=(s,)) for s in range(3)]
    index.add(ids[:100], x[:100])
    added.update(ids[:100].tolist())
    for t in threads:
        t.start()
    try:
        for start in range(100, 900, 100):
            batch = ids[start : start + 100]
            with lock:
                added.update(batch.tolist())  # recorded before add starts: may appear from now on
            index.add(batch, x[start : start + 100])
            gone = ids[start - 100 : start - 70]
            index.remove(gone)
            with lock:
                removed_done.update(gone.tolist())
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    if errors:
        raise errors[0]
    assert not violations, violations[:5]
    assert len(index) == 900 - 8 * 30
