"""The GPU code path (replica, over-fetch + post-filter, resync, GPU training) on a stand-in device.

This machine has no GPU, so ``faiss_gpu.to_device`` / ``to_host`` are replaced by
``faiss.clone_index``: the "device" index is a CPU copy that, like a real FAISS GPU index, is
searched without id selectors. Everything above the two copy functions runs as on a GPU. The
real-device test at the end runs only where the faiss-gpu wheel sees a GPU.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from index import SearchFilter, create_index, faiss_gpu, load_index
from tests.index.test_index_contract import (
    assert_same_top_k,
    assert_well_formed,
    brute_force,
    clustered,
    faiss_single_thread,  # noqa: F401  (autouse fixture)
    make_attributes,
)

DIM = 16


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Pretend FAISS sees one GPU; record every host<->device copy."""
    copies: list[str] = []

    def to_device(index: faiss.Index, device: int, fp16: bool) -> faiss.Index:
        copies.append(f"to_device:{type(index).__name__}")
        return faiss.clone_index(index)

    def to_host(index: faiss.Index) -> faiss.Index:
        copies.append("to_host")
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss_gpu, "gpu_count", lambda: 1)
    monkeypatch.setattr(faiss_gpu, "to_device", to_device)
    monkeypatch.setattr(faiss_gpu, "to_host", to_host)
    return copies


def test_flat_on_gpu_is_a_replica_with_post_filtering(fake_gpu: list[str]) -> None:
    index = create_index("faiss", spec="flat", dim=DIM, gpu_fp16=False, exact_subset_limit=1)
    caps = index.capabilities
    assert caps.gpu and not caps.filter_pushdown and caps.max_k == faiss_gpu.GPU_MAX_K
    assert index._replica is not None
    x = clustered(600, DIM)
    ids = np.arange(600) * 7 + 3
    attrs = make_attributes(600)
    index.add(ids, x, attributes=attrs)
    q = clustered(20, DIM, seed=6)
    assert_same_top_k(index.search(q, 10), *brute_force(x, ids, q, 10))
    flt = SearchFilter(cameras={0, 5}, time_to=1_700_070_000.0)
    mask = flt.matches(attrs.camera, attrs.captured_at, attrs.identity)
    result = index.search(q, 10, filter=flt)
    assert_well_formed(result, 10, len(q))
    assert_same_top_k(result, *brute_force(x, ids, q, 10, mask))


def test_fp16_gpu_flat_is_not_advertised_as_exact(fake_gpu: list[str]) -> None:
    assert not create_index("faiss", spec="flat", dim=DIM).capabilities.exact
    assert create_index("faiss", spec="flat", dim=DIM, gpu_fp16=False).capabilities.exact


def test_removed_ids_are_dead_on_the_replica_until_resync(fake_gpu: list[str]) -> None:
    index = create_index("faiss", spec="flat", dim=DIM, gpu_fp16=False, gpu_resync_fraction=0.5)
    x = clustered(3000, DIM)
    ids = np.arange(3000)
    index.add(ids, x)
    uploads = len(fake_gpu)
    gone = ids[:1000]
    index.remove(gone)
    replica = index._replica
    assert replica.dead == 1000 and replica.ntotal == 3000 and len(fake_gpu) == uploads  # no re-upload yet
    q = x[:50]  # queries right on removed items: their dead entries rank first on the device
    result = index.search(q, 10)
    assert not np.isin(result.ids, gone).any() and not result.short.any()
    assert_same_top_k(result, *brute_force(x, ids, q, 10, ~np.isin(ids, gone)))
    index.remove(ids[1000:1600])  # 1600 dead > 50% of 3000: re-upload from the CPU master
    assert replica.dead == 0 and replica.ntotal == 1400 and len(fake_gpu) == uploads + 1
    assert_same_top_k(index.search(q, 10), *brute_force(x, ids, q, 10, ids >= 1600))


def test_ivf_trains_on_the_device_and_keeps_a_cpu_master(fake_gpu: list[str], tmp_path: Path) -> None:
    index = create_index("faiss", spec="ivf-flat", dim=DIM, train_min=500, nprobe=4)
    x = clustered(900, DIM)
    ids = np.arange(900) + 11
    index.add(ids[:600], x[:600])
    assert index.is_trained
    assert "to_device:IndexIVFFlat" in fake_gpu and "to_host" in fake_gpu
    assert isinstance(index._cpu, faiss.IndexIVFFlat)
    assert index._cpu.direct_map.type == faiss.DirectMap.Hashtable  # removal works on the master
    index.add(ids[600:], x[600:])
    assert index._cpu.ntotal == index._replica.ntotal == 900
    index.remove(ids[:100])
    result = index.search(x[:200], 5)
    assert not np.isin(result.ids, ids[:100]).any() and not result.short.any()
    np.testing.assert_array_equal(result.ids[100:, 0], ids[100:200])
    index.save(tmp_path)
    loaded = load_index(tmp_path)
    assert loaded.capabilities.gpu and len(loaded) == 800
    np.testing.assert_array_equal(loaded.search(x[:200], 5).ids, result.ids)


def test_gpu_search_falls_back_to_the_cpu_master_when_the_device_cannot_fill_k(fake_gpu: list[str]) -> None:
    # More dead entries near the query than the device may return (k <= 2048): the CPU master,
    # which has no dead entries, answers instead.
    index = create_index("faiss", spec="flat", dim=DIM, gpu_fp16=False, gpu_resync_fraction=1.0)
    x = np.repeat(clustered(1, DIM), 2600, axis=0) + 1e-3 * clustered(2600, DIM, seed=2)
    ids = np.arange(2600)
    index.add(ids, x)
    index.add([5000], clustered(1, DIM, seed=9))
    index.remove(ids[:2599])
    assert index._replica.dead == 2599
    result = index.search(x[:1], 2)
    np.testing.assert_array_equal(np.sort(result.ids[0]), [2599, 5000])


@pytest.mark.skipif(faiss_gpu.gpu_count() == 0, reason="needs the faiss-gpu wheel and a CUDA GPU")
def test_real_gpu_flat_matches_brute_force_to_fp16_precision() -> None:
    index = create_index("faiss", spec="flat", dim=64, gpu=True)
    x = clustered(5000, 64)
    index.add(np.arange(5000), x)
    q = clustered(32, 64, seed=4)
    result = index.search(q, 10)
    true_scores, _ = brute_force(x, np.arange(5000), q, 10)
    np.testing.assert_allclose(result.scores, true_scores, atol=2e-3)
    index.remove(np.arange(100))
    assert not np.isin(index.search(x[:100], 10).ids, np.arange(100)).any()
