"""Folding the frozen denoisers into the weights for a backbone phase, and taking them out again.

In a backbone phase D is frozen, yet the fused training forward rebuilds ``W' = f(W, D)``
differentiably on every step: ``out x in^2`` multiply-adds per layer, forward and backward, which at
a small batch costs about as much as the layer itself (ViT-S fc2 at batch 8: 0.9 G against 0.95 G).
:func:`fold` writes W' (and b') into the layer's own weight and bias Parameters, in place, so the
phase trains them as a plain layer and the optimiser keeps its Parameters and state; :func:`unfold`
recovers ``W = f^-1(W', D)`` in float64 when D is about to train again.

The one thing that changes is the parametrisation the optimiser steps: SGD on W' instead of on W
(``W' = W M`` for a Linear, ``M = c3 I - c1 D``). A step on W moves W' by ``-lr g M^T M``, a step
on W' by ``-lr g``; ``M^T M`` differs from the identity by about ``2 c1 ||D||`` (~1e-3 at the
reference strength). The DenoiseRep study's arm B is reported both ways (bench/README.md), and
``denoiserep.fold_backbone: false`` trains the exact original parametrisation.

The three inverses mirror the three fusions of :mod:`.layers`; each solves with the step matrix,
which folding first checks is well conditioned (``||M - I||_F <= 1/2`` bounds its condition number
by 3); a layer whose denoiser is too strong for that stays unfolded (exact, only slower).
"""

from __future__ import annotations

import torch

#: ``||M - I||_F`` above which a layer is not folded: then ``cond(M) <= (1 + q) / (1 - q) = 3`` fails
#: to be guaranteed, and the round trip could lose digits of W.
MAX_STEP_DEVIATION = 0.5


def step_matrix(denoiser_weight: torch.Tensor, c1: float, c3: float) -> torch.Tensor:
    """``M = c3 I - c1 D`` (batched over groups for a conv's (groups, n, n) D)."""
    eye = torch.eye(denoiser_weight.shape[-1], dtype=denoiser_weight.dtype, device=denoiser_weight.device)
    return c3 * eye - c1 * denoiser_weight


def step_deviation(denoiser_weight: torch.Tensor, c1: float, c3: float) -> float:
    """``||M - I||_F`` in float64: an upper bound of ``||M - I||_2``, cheap to compute."""
    d = denoiser_weight.detach().to(torch.float64)
    return float((step_matrix(d, c1, c3) - torch.eye(d.shape[-1], dtype=d.dtype, device=d.device)).norm())


def unfuse_linear_parameters(
    fused_weight: torch.Tensor,
    fused_bias: torch.Tensor | None,
    denoiser_weight: torch.Tensor,
    denoiser_bias: torch.Tensor | None,
    c1: float,
    c3: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Invert :func:`~.layers.fuse_linear_parameters`: ``W = W' M^-1``, ``b = b' + c1 W d``."""
    m = step_matrix(denoiser_weight, c1, c3)
    weight = torch.linalg.solve(m.T, fused_weight.T).T
    if fused_bias is None:
        return weight, None
    assert denoiser_bias is not None
    return weight, fused_bias + c1 * (weight @ denoiser_bias)


def unfuse_conv_input_parameters(
    fused_weight: torch.Tensor,
    fused_bias: torch.Tensor | None,
    denoiser_weight: torch.Tensor,
    denoiser_bias: torch.Tensor | None,
    c1: float,
    c3: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Invert :func:`~.layers.fuse_conv_input_parameters`: per group ``W[o, :, k] = W'[o, :, k] M_g^-1``."""
    assert denoiser_bias is None
    groups, group_in, _ = denoiser_weight.shape
    out, _, kh, kw = fused_weight.shape
    # (groups, in/g, out/g * kh * kw): the columns M_g^T acts on.
    columns = fused_weight.reshape(groups, out // groups, group_in, kh * kw).permute(0, 2, 1, 3)
    columns = columns.reshape(groups, group_in, -1)
    solved = torch.linalg.solve(step_matrix(denoiser_weight, c1, c3).transpose(1, 2), columns)
    weight = solved.reshape(groups, group_in, out // groups, kh * kw).permute(0, 2, 1, 3)
    return weight.reshape(fused_weight.shape), fused_bias


def unfuse_conv_parameters(
    fused_weight: torch.Tensor,
    fused_bias: torch.Tensor | None,
    denoiser_weight: torch.Tensor,
    denoiser_bias: torch.Tensor | None,
    c1: float,
    c3: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Invert :func:`~.layers.fuse_conv_parameters`: per group ``W = M^-1 W'``, ``b = M^-1 (b' + c1 d)``."""
    groups, group_out, _ = denoiser_weight.shape
    m = step_matrix(denoiser_weight, c1, c3)
    weight = torch.linalg.solve(m, fused_weight.reshape(groups, group_out, -1)).reshape(fused_weight.shape)
    if fused_bias is None:
        return weight, None
    assert denoiser_bias is not None
    shifted = (fused_bias + c1 * denoiser_bias).reshape(groups, group_out, 1)
    return weight, torch.linalg.solve(m, shifted).reshape(fused_bias.shape)
