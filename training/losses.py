"""Re-identification losses: label-smoothed cross-entropy and batch-hard triplet.

The weighted sum of the two is the "bag of tricks" task loss (Luo et al., 2019): the ID loss on the
BNNeck output, the triplet loss on the pooled feature before it. DenoiseRep's label-free denoising
loss is added by the training loop with its own weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CrossEntropyLabelSmooth",
    "ReIDLoss",
    "ReIDLossOutput",
    "TripletLoss",
    "pairwise_euclidean",
]


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against targets ``(1 - epsilon) * one_hot + epsilon / num_classes``.

    Args:
        epsilon: label-smoothing factor (0.1 in the bag-of-tricks recipe; 0 gives plain CE).
    """

    def __init__(self, epsilon: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label smoothing epsilon must lie in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Computed in float32: under AMP the logits may be half precision.
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.epsilon)


def pairwise_euclidean(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix of the rows of ``x``: (N, N), clamped so the gradient stays finite."""
    if x.dtype in (torch.float16, torch.bfloat16):  # AMP features: distances need float32 range
        x = x.float()
    sq = x.pow(2).sum(dim=1, keepdim=True)
    dist2 = sq + sq.t() - 2.0 * (x @ x.t())
    return dist2.clamp_min(1e-12).sqrt()


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al., 2017) with a hard margin or the soft margin.

    For every anchor, the hardest positive (farthest same-identity sample) and hardest negative
    (closest other-identity sample) in the batch form the triplet. Anchors without a negative in the
    batch are ignored; a batch without any valid anchor gives a zero loss that keeps the graph.

    Args:
        margin: the hinge margin ``max(0, d_ap - d_an + margin)``; ``None`` selects the soft margin
            ``log(1 + exp(d_ap - d_an))``.
        normalize_feature: L2-normalise the features before measuring distances.
    """

    def __init__(self, margin: float | None = 0.3, normalize_feature: bool = False) -> None:
        super().__init__()
        if margin is not None and margin < 0:
            raise ValueError(f"triplet margin must be >= 0 or None (soft margin), got {margin}")
        self.margin = margin
        self.normalize_feature = normalize_feature

    def hardest(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hardest-positive distance, hardest-negative distance) per anchor with a negative."""
        if self.normalize_feature:
            features = F.normalize(features, dim=1)
        dist = pairwise_euclidean(features)
        same = targets.unsqueeze(0) == targets.unsqueeze(1)
        valid = (~same).any(dim=1)
        d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)
        d_an = dist.masked_fill(same, float("inf")).amin(dim=1)
        return d_ap[valid], d_an[valid]

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        d_ap, d_an = self.hardest(features, targets)
        if d_ap.numel() == 0:
            return features.sum() * 0.0
        if self.margin is None:
            return F.softplus(d_ap - d_an).mean()
        return F.relu(d_ap - d_an + self.margin).mean()


@dataclass
class ReIDLossOutput:
    """The total task loss and its parts (detached parts for logging)."""

    total: torch.Tensor
    id_loss: torch.Tensor
    triplet_loss: torch.Tensor
    accuracy: torch.Tensor


class ReIDLoss(nn.Module):
    """``id_weight * CE_ls(logits) + triplet_weight * triplet(pre-BN feature)``.

    Args:
        id_weight: weight of the label-smoothed cross-entropy (0 disables it).
        triplet_weight: weight of the batch-hard triplet loss (0 disables it).
        label_smoothing: epsilon of the cross-entropy.
        triplet_margin: hinge margin, or ``None`` for the soft margin.
        normalize_feature: L2-normalise features for the triplet loss.
    """

    def __init__(
        self,
        *,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        label_smoothing: float = 0.1,
        triplet_margin: float | None = 0.3,
        normalize_feature: bool = False,
    ) -> None:
        super().__init__()
        if id_weight < 0 or triplet_weight < 0 or id_weight + triplet_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got id={id_weight}, triplet={triplet_weight}"
            )
        self.id_weight = id_weight
        self.triplet_weight = triplet_weight
        self.id_loss = CrossEntropyLabelSmooth(label_smoothing)
        self.triplet = TripletLoss(triplet_margin, normalize_feature)

    def forward(
        self, logits: torch.Tensor | None, feat: torch.Tensor, targets: torch.Tensor
    ) -> ReIDLossOutput:
        zero = feat.sum() * 0.0
        if self.id_weight > 0 and logits is None:
            raise ValueError("the ID loss needs logits: build the model with num_classes > 0")
        id_loss = self.id_loss(logits, targets) if self.id_weight > 0 else zero
        if logits is not None:
            accuracy = (logits.detach().argmax(dim=1) == targets).float().mean()
        else:
            accuracy = zero.detach()
        tri = self.triplet(feat, targets) if self.triplet_weight > 0 else zero
        total = self.id_weight * id_loss + self.triplet_weight * tri
        return ReIDLossOutput(total, id_loss.detach(), tri.detach(), accuracy)
