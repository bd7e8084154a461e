"""What the contract suite does not reach in the torch backend: the id-ordered storage under random
mutation, chunked and masked search paths, half-precision storage, tensor inputs, snapshots of each
dtype and the device errors. Everything runs on the CPU; CUDA runs the same code in float16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from index import IndexInputError, SearchFilter, SnapshotError, create_index, load_index
from index.base import IndexBackendError
from index.torch_index import TorchIndex

DIM = 16


def unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by numpy, ties broken by the smaller id (the backend's documented order)."""
    scores = q @ x.T
    order = np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "remove"]), st.integers(1, 40), st.integers(0, 10_000)),
        min_size=1,
        max_size=8,
    )
)
@settings(max_examples=30, deadline=None)
def test_random_adds_and_removes_match_a_model(ops: list[tuple[str, int, int]]) -> None:
    index = TorchIndex(DIM, device="cpu")
    model: dict[int, np.ndarray] = {}
    for step, (op, size, seed) in enumerate(ops):
        rng = np.random.default_rng(seed)
        if op == "add":
            # Ids anywhere in 0..299: some below the current maximum (the merge path), none present.
            candidates = np.setdiff1d(rng.permutation(300)[: size * 2], list(model))
            new = candidates[:size]
            if len(new) == 0:
                continue
            vectors = unit(len(new), seed=10_000 * step + seed)  # distinct vectors: no exact ties
            index.add(new, vectors)
            model.update(zip(new.tolist(), vectors, strict=True))
        else:
            gone = rng.choice(300, size, replace=False)
            assert index.remove(gone) == len(set(gone.tolist()) & set(model))
            for i in gone.tolist():
                model.pop(i, None)
        ids = np.array(sorted(model), dtype=np.int64)
        assert len(index) == len(ids)
        np.testing.assert_array_equal(index.ids(), ids)
        if len(ids):
            x = np.stack([model[i] for i in ids.tolist()])
            np.testing.assert_allclose(index.vectors_of(ids), x, atol=1e-6)
            q = unit(5, seed=seed + 1)
            k = min(7, len(ids))
            result = index.search(q, k)
            true_scores, true_ids = brute(ids, x, q, k)
            np.testing.assert_allclose(result.scores, true_scores, atol=1e-5)
            np.testing.assert_array_equal(result.ids, true_ids)


def test_chunked_search_equals_one_block() -> None:
    x, q = unit(3000, seed=1), unit(64, seed=2)
    ids = np.arange(3000, dtype=np.int64) * 2
    whole = TorchIndex(DIM, device="cpu")
    # 65,536 bytes of scores per block: 256 rows for 64 queries, so 12 chunks whose winners merge.
    chunked = TorchIndex(DIM, device="cpu", score_bytes=65_536)
    for index in (whole, chunked):
        index.add(ids, x)
    a, b = whole.search(q, 25), chunked.search(q, 25)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    np.testing.assert_array_equal(a.ids, brute(ids, x, q, 25)[1])


def test_masked_and_gathered_filter_paths_agree() -> None:
    x, q = unit(2000, seed=3), unit(20, seed=4)
    ids = np.arange(2000, dtype=np.int64) + 10
    cams = np.arange(2000) % 5
    gathered = TorchIndex(DIM, device="cpu")  # large exact_subset_limit: allowed rows are gathered
    masked = TorchIndex(DIM, device="cpu", exact_subset_limit=0, score_bytes=65_536)  # mask, chunked
    for index in (gathered, masked):
        index.add(ids, x, attributes={"camera": cams})
    flt = SearchFilter(cameras={1, 3})
    a, b = gathered.search(q, 10, filter=flt), masked.search(q, 10, filter=flt)
    keep = np.isin(cams, [1, 3])
    true_scores, true_ids = brute(ids[keep], x[keep], q, 10)
    for result in (a, b):
        np.testing.assert_array_equal(result.ids, true_ids)
        np.testing.assert_allclose(result.scores, true_scores, atol=1e-5)
    # Fewer allowed items than k: padded, flagged short, on both paths.
    few = SearchFilter(allowed_ids=ids[:3])
    for index in (gathered, masked):
        r = index.search(q[:2], 5, filter=few)
        assert r.short.all() and (r.ids[:, 3:] == -1).all() and np.isneginf(r.scores[:, 3:]).all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage_returns_float32_rescored_neighbours(dtype: str) -> None:
    x, q = unit(1500, seed=5), unit(30, seed=6)
    ids = np.arange(1500, dtype=np.int64)
    index = create_index("torch", spec="flat", dim=DIM, device="cpu", dtype=dtype)
    assert not index.capabilities.exact and index.capabilities.filter_pushdown
    index.add(ids, x)
    result = index.search(q, 10)
    # Scores are the float32 cosines of the *stored* (rounded) vectors, best first.
    stored = index.vectors_of(result.ids.ravel()).reshape(30, 10, DIM)
    expected = np.einsum("qd,qkd->qk", q, stored)
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)
    assert (np.diff(result.scores, axis=1) <= 1e-7).all()
    # Rounding to 8 (bfloat16) or 11 (float16) bits moves cosines by ~1e-2 at most: neighbours
    # tied that closely may swap, the rest must agree with float32 search.
    true_ids = brute(ids, x, q, 10)[1]
    agreement = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(result.ids, true_ids, strict=True)])
    assert agreement >= 0.9


def test_torch_tensors_are_accepted_and_checked() -> None:
    index = TorchIndex(DIM, device="cpu")
    raw = torch.randn(50, DIM, generator=torch.Generator().manual_seed(0)) * 3.0  # not unit length
    index.add(np.arange(50), raw)
    normalised = (raw / raw.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(index.vectors_of(np.arange(50)), normalised, atol=1e-6)
    from_tensor = index.search(raw[:4], 3)
    from_numpy = index.search(normalised[:4], 3)
    np.testing.assert_array_equal(from_tensor.ids, from_numpy.ids)
    bad = {
        "NaN": torch.full((1, DIM), float("nan")),
        "all-zero": torch.zeros(1, DIM),
        r"shape \(n, 16\)": torch.ones(1, DIM + 1),
        "real numbers": torch.ones(1, DIM, dtype=torch.bool),
    }
    for message, tensor in bad.items():
        with pytest.raises(IndexInputError, match=message):
            index.add([1000], tensor)
    assert len(index) == 50


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_snapshots_keep_items_dtype_and_results(tmp_path: Path, dtype: str) -> None:
    index = TorchIndex(DIM, device="cpu", dtype=dtype)
    x = unit(400, seed=7)
    index.add(np.arange(400) * 3, x, attributes={"camera": np.arange(400) % 4})
    index.remove(np.arange(0, 60) * 3)
    q = unit(8, seed=8)
    before = index.search(q, 10, filter=SearchFilter(exclude_cameras={2}))
    index.save(tmp_path / "snap", last_seq=9)
    loaded = load_index(tmp_path / "snap")
    assert isinstance(loaded, TorchIndex) and loaded.dtype == index.dtype and len(loaded) == 340
    after = loaded.search(q, 10, filter=SearchFilter(exclude_cameras={2}))
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_allclose(after.scores, before.scores, atol=1e-6)
    # An override on load: the same snapshot in float32 (e.g. a GPU snapshot opened on a CPU).
    wide = load_index(tmp_path / "snap", dtype="float32")
    assert wide.dtype == torch.float32 and len(wide) == 340


def test_corrupt_snapshot_is_refused(tmp_path: Path) -> None:
    index = TorchIndex(DIM, device="cpu")
    index.add(np.arange(20), unit(20))
    index.save(tmp_path / "snap")
    vectors = next((tmp_path / "snap").glob("index-*.npy"))
    data = bytearray(vectors.read_bytes())
    data[-1] ^= 0xFF
    vectors.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="SHA-256"):
        load_index(tmp_path / "snap")


def test_memory_grows_by_doubling_and_is_returned_after_removals() -> None:
    index = TorchIndex(DIM, device="cpu")
    assert index.capacity == 1024
    index.add(np.arange(5000), unit(5000))
    assert index.capacity >= 5000 and index.stored_vectors.shape == (5000, DIM)
    big = index.capacity
    index.remove(np.arange(4900))
    assert index.capacity < big // 2 and len(index) == 100
    np.testing.assert_array_equal(index.search(unit(1, seed=9), 100).ids.ravel().size, 100)


def test_device_and_spec_errors_say_what_to_do() -> None:
    with pytest.raises(IndexInputError, match="only spec 'flat'"):
        create_index("torch", spec="ivf-flat", dim=DIM, device="cpu")
    with pytest.raises(IndexInputError, match="not one of"):
        TorchIndex(DIM, device="cpu", dtype="float64")
    if not torch.cuda.is_available():
        with pytest.raises(IndexBackendError, match="device='cpu'"):
            TorchIndex(DIM, device="cuda")
    auto = TorchIndex(DIM)  # no device: a GPU where there is one, else the CPU in float32
    assert auto.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert auto.capabilities.gpu == torch.cuda.is_available()
