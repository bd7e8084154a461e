"""The recall@k helper: exact against itself, tie-aware, and equal to a hand count."""

from __future__ import annotations

import numpy as np
import pytest

from index import create_index, measure_recall
from index.recall import exact_top_k
from tests.index.test_index_contract import (
    brute_force,
    clustered,
    faiss_single_thread,  # noqa: F401  (autouse fixture)
)

DIM = 16


def test_exact_top_k_matches_numpy() -> None:
    x = clustered(3000, DIM)
    ids = np.arange(3000) * 3
    q = clustered(7, DIM, seed=2)
    scores, found = exact_top_k(x, q, 9, ids)
    true_scores, true_ids = brute_force(x, ids, q, 9)
    np.testing.assert_allclose(scores, true_scores, atol=1e-6)
    np.testing.assert_array_equal(found, true_ids)


def test_flat_has_recall_one_against_vectors_and_against_itself() -> None:
    x = clustered(500, DIM)
    flat = create_index("faiss", spec="flat", dim=DIM)
    flat.add(np.arange(500), x)
    q = clustered(30, DIM, seed=1)
    assert measure_recall(flat, x, q, 10) == 1.0
    assert measure_recall(flat, (np.arange(500), x), q, 10) == 1.0
    assert measure_recall(flat, flat, q, 10) == 1.0


def test_ties_at_the_cut_off_are_not_misses() -> None:
    base = clustered(20, DIM)
    x = np.concatenate([base, base])  # every vector twice: ids i and i + 20 tie exactly
    flat = create_index("faiss", spec="flat", dim=DIM)
    flat.add(np.arange(40), x)
    assert measure_recall(flat, (np.arange(40), x), base[:5], 3) == 1.0


def test_recall_of_an_approximate_index_equals_a_hand_count() -> None:
    x = clustered(2000, DIM, per_identity=2, noise=0.8)
    ivf = create_index("faiss", spec="ivf-flat", dim=DIM, train_min=1000, nprobe=1)
    ivf.add(np.arange(2000), x)
    q = clustered(50, DIM, seed=3)
    recall = measure_recall(ivf, x, q, 10)
    got = ivf.search(q, 10).ids
    truth = brute_force(x, np.arange(2000), q, 10)[1]
    by_hand = np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(got, truth, strict=True)])
    assert recall == pytest.approx(by_hand, abs=0.01)
    assert 0.2 < recall < 0.95  # one list out of dozens: clearly approximate
