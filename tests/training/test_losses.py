"""Losses against hand-computed values and a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.losses import CrossEntropyLabelSmooth, ReIDLoss, TripletLoss, pairwise_euclidean


def test_label_smoothed_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    z = math.exp(2) + math.exp(1) + 1
    log_p = [2 - math.log(z), 1 - math.log(z), -math.log(z)]
    eps = 0.1
    q = [1 - eps + eps / 3, eps / 3, eps / 3]
    expected = -sum(qi * lp for qi, lp in zip(q, log_p, strict=True))
    got = CrossEntropyLabelSmooth(eps)(logits, torch.tensor([0]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    plain = CrossEntropyLabelSmooth(0.0)(logits, torch.tensor([0]))
    assert plain.item() == pytest.approx(-log_p[0], rel=1e-6)


def _features_1d(values):
    return torch.tensor([[v, 0.0] for v in values])


def test_batch_hard_triplet_with_margin_by_hand():
    # Identity 0 at x=0 and x=1, identity 1 at x=3 and x=5.
    feats = _features_1d([0.0, 1.0, 3.0, 5.0])
    labels = torch.tensor([0, 0, 1, 1])
    # (hardest positive, hardest negative): (1, 3), (1, 2), (2, 2), (2, 4)
    expected = (0 + 0 + 0.3 + 0) / 4
    assert TripletLoss(margin=0.3)(feats, labels).item() == pytest.approx(expected, abs=1e-5)


def test_soft_margin_triplet_by_hand():
    feats = _features_1d([0.0, 1.0, 3.0, 5.0])
    labels = torch.tensor([0, 0, 1, 1])
    expected = sum(math.log1p(math.exp(d)) for d in (1 - 3, 1 - 2, 2 - 2, 2 - 4)) / 4
    assert TripletLoss(margin=None)(feats, labels).item() == pytest.approx(expected, abs=1e-5)


def test_triplet_without_negatives_is_zero_and_differentiable():
    feats = torch.randn(4, 8, requires_grad=True)
    loss = TripletLoss()(feats, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert feats.grad is not None and torch.count_nonzero(feats.grad) == 0


def _brute_force_triplet(feats: torch.Tensor, labels: torch.Tensor, margin: float | None) -> float:
    n = feats.shape[0]
    terms = []
    for a in range(n):
        pos = [torch.dist(feats[a], feats[p]).item() for p in range(n) if labels[p] == labels[a]]
        neg = [torch.dist(feats[a], feats[q]).item() for q in range(n) if labels[q] != labels[a]]
        if not neg:
            continue
        gap = max(pos) - min(neg)
        terms.append(math.log1p(math.exp(gap)) if margin is None else max(0.0, gap + margin))
    return sum(terms) / len(terms) if terms else 0.0


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(2, 12),
    num_ids=st.integers(1, 4),
    margin=st.sampled_from([None, 0.0, 0.3, 1.0]),
    seed=st.integers(0, 10_000),
)
def test_triplet_matches_brute_force(n, num_ids, margin, seed):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    labels = torch.randint(num_ids, (n,), generator=gen)
    got = TripletLoss(margin=margin)(feats, labels).item()
    assert got == pytest.approx(_brute_force_triplet(feats, labels, margin), abs=1e-5)


def test_pairwise_euclidean_is_finite_and_differentiable_at_zero():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], requires_grad=True)
    dist = pairwise_euclidean(x)
    torch.testing.assert_close(dist, torch.full((2, 2), 1e-6), atol=1e-5, rtol=0)
    dist.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_reid_loss_is_the_weighted_sum():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, generator=gen)
    feats = torch.randn(6, 4, generator=gen)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    out = ReIDLoss(id_weight=0.5, triplet_weight=2.0, label_smoothing=0.1, triplet_margin=0.3)(
        logits, feats, labels
    )
    ce = CrossEntropyLabelSmooth(0.1)(logits, labels)
    tri = TripletLoss(0.3)(feats, labels)
    assert out.total.item() == pytest.approx(0.5 * ce.item() + 2.0 * tri.item(), rel=1e-6)
    assert out.accuracy.item() == pytest.approx((logits.argmax(1) == labels).float().mean().item())


def test_reid_loss_rejects_bad_settings():
    with pytest.raises(ValueError, match="not both 0"):
        ReIDLoss(id_weight=0, triplet_weight=0)
    with pytest.raises(ValueError, match="needs logits"):
        ReIDLoss()(None, torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="epsilon"):
        CrossEntropyLabelSmooth(1.5)
