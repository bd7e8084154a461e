"""PK sampler: batch shape, no repeated identity, determinism, replacement, distributed sharding."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.data.pk_sampler import PKBatchSampler


def _pids(counts: list[int]) -> list[int]:
    return [pid for pid, n in enumerate(counts) for _ in range(n)]


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=2, max_size=25),
    p=st.integers(1, 4),
    k=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_every_batch_is_p_identities_times_k_images(counts, p, k, seed):
    pids = _pids(counts)
    if len(counts) < p:
        with pytest.raises(ValueError, match="fewer than P"):
            PKBatchSampler(pids, p, k, seed=seed)
        return
    sampler = PKBatchSampler(pids, p, k, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len(batch) == p * k
        per_id = Counter(pids[i] for i in batch)
        assert len(per_id) == p  # p distinct identities, none repeated beyond its K slots
        assert set(per_id.values()) == {k}
    # An identity with at least K images never repeats an image within its chunk.
    for batch in batches:
        for pid in {pids[i] for i in batch}:
            chosen = [i for i in batch if pids[i] == pid]
            if counts[pid] >= k:
                assert len(set(chosen)) == k


def test_identities_with_fewer_than_k_images_are_drawn_with_replacement():
    pids = _pids([1, 2, 6, 6])
    sampler = PKBatchSampler(pids, p=2, k=4, seed=0)
    seen = Counter()
    for epoch in range(10):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for pid in {pids[i] for i in batch}:
                seen[pid] += 1
                assert sum(pids[i] == pid for i in batch) == 4
    assert seen[0] > 0 and seen[1] > 0  # small identities are not dropped


def test_deterministic_under_seed_and_epoch():
    pids = _pids([5, 7, 3, 9, 4, 6])
    a, b = PKBatchSampler(pids, 3, 2, seed=7), PKBatchSampler(pids, 3, 2, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    c = PKBatchSampler(pids, 3, 2, seed=7)
    assert list(c) != list(a)  # epoch 0 differs from epoch 1
    assert list(PKBatchSampler(pids, 3, 2, seed=8)) != list(c)


def test_every_image_of_large_identities_is_used_once_per_epoch():
    pids = _pids([8, 8, 8, 8])
    batches = list(PKBatchSampler(pids, p=2, k=4, seed=3))
    used = sorted(i for b in batches for i in b)
    assert used == list(range(len(pids)))


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_shards_are_disjoint_equal_and_cover_the_global_epoch(world):
    pids = _pids([6] * 11 + [3, 2])
    full = list(PKBatchSampler(pids, 2, 3, seed=5))
    shards = [list(PKBatchSampler(pids, 2, 3, seed=5, num_replicas=world, rank=r)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    assert len(shards[0]) == len(full) // world
    interleaved = [shards[i % world][i // world] for i in range(world * len(shards[0]))]
    assert interleaved == full[: len(interleaved)]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="p >= 1"):
        PKBatchSampler([0, 1], 0, 4)
    with pytest.raises(ValueError, match="rank"):
        PKBatchSampler([0, 1], 1, 1, num_replicas=2, rank=2)
