"""The checks the backends share through :mod:`index.backend_base`, on the in-process backends.

The contract suite covers what every call does; this covers the shared argument checks and the
snapshot steps: a snapshot opened by the wrong backend, ``dim`` and ``last_seq`` values that look
like integers but are not, membership tests of things that cannot be ids, and the attribute
look-ups of :class:`~index.backend_base.TableBackedIndex`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from index import Attributes, IndexInputError, SnapshotError, create_index
from index.backend_base import IndexBackend, TableBackedIndex, npz_writer, read_npz
from index.faiss_index import FaissIndex
from index.torch_index import TorchIndex

DIM = 8
BACKENDS: dict[str, dict[str, Any]] = {"faiss": {}, "torch": {"device": "cpu"}}
LOADERS = {"faiss": FaissIndex, "torch": TorchIndex}


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def filled(backend: str, n: int = 6) -> Any:
    index = create_index(backend, spec="flat", dim=DIM, **BACKENDS[backend])
    index.add(np.arange(n) * 2 + 1, unit(n), attributes={"camera": np.arange(n) % 3})
    return index


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_backends_share_the_base_classes(backend: str) -> None:
    index = filled(backend)
    assert isinstance(index, TableBackedIndex) and isinstance(index, IndexBackend)
    assert index.backend == backend and index.label == {"faiss": "FAISS", "torch": "torch"}[backend]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("other", list(BACKENDS))
def test_a_snapshot_opens_only_with_its_own_backend(backend: str, other: str, tmp_path: Path) -> None:
    index = filled(backend)
    index.save(tmp_path / "snap", last_seq=3)
    if other == backend:
        assert len(LOADERS[other].load(tmp_path / "snap")) == len(index)
        return
    with pytest.raises(SnapshotError, match=f"is a '{backend}' snapshot, not a {LOADERS[other].label} one"):
        LOADERS[other].load(tmp_path / "snap")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dim", [True, 0, -4, 2.0, "8"])
def test_dim_must_be_a_positive_integer(backend: str, dim: Any) -> None:
    with pytest.raises(IndexInputError, match="dim must be a positive integer"):
        create_index(backend, spec="flat", dim=dim, **BACKENDS[backend])


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("last_seq", [True, -1, 1.0, "2"])
def test_last_seq_must_be_a_non_negative_integer(backend: str, last_seq: Any, tmp_path: Path) -> None:
    index = filled(backend)
    with pytest.raises(IndexInputError, match="last_seq must be a non-negative integer"):
        index.save(tmp_path / "snap", last_seq=last_seq)
    assert not (tmp_path / "snap").exists()
    index.save(tmp_path / "snap", last_seq=np.int64(5))  # numpy integers are integers


@settings(max_examples=40, deadline=None)
@given(
    backend=st.sampled_from(list(BACKENDS)),
    probe=st.one_of(st.integers(-5, 20), st.booleans(), st.floats(0, 20), st.text(max_size=3), st.none()),
)
def test_membership_is_false_for_anything_but_a_present_id(backend: str, probe: Any) -> None:
    index = filled(backend)  # ids 1, 3, 5, 7, 9, 11
    expected = type(probe) is int and probe in {1, 3, 5, 7, 9, 11}
    assert (probe in index) is expected
    if type(probe) is int and probe >= 0:
        assert index.contains([probe]).tolist() == [expected]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_attributes_of_present_ids_and_keyerror_for_absent(backend: str) -> None:
    index = filled(backend)
    attrs = index.attributes_of([5, 1])
    assert isinstance(attrs, Attributes)
    assert attrs.camera.tolist() == [2, 0]
    with pytest.raises(KeyError):
        index.attributes_of([2])
    with pytest.raises(IndexInputError):
        index.attributes_of([-1])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_remove_then_reset(backend: str) -> None:
    index = filled(backend)
    assert index.remove([]) == 0
    assert index.remove([2, 4]) == 0  # absent ids: nothing to drop
    assert index.remove([1, 2, 3]) == 2 and len(index) == 4
    assert index.contains([1, 3, 5]).tolist() == [False, False, True]
    assert index.search(unit(6)[:1], 1).ids[0, 0] != 1
    index.reset()
    assert len(index) == 0 and 5 not in index


def test_npz_round_trip(tmp_path: Path) -> None:
    arrays = {"ids": np.arange(4, dtype=np.int64), "camera": np.array([1, -1, 2, 0])}
    npz_writer(arrays)(tmp_path / "a.npz")
    back = read_npz(tmp_path / "a.npz")
    assert set(back) == set(arrays)
    for name, value in arrays.items():
        np.testing.assert_array_equal(back[name], value)
