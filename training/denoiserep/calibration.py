"""Closed-form calibration: every denoiser set to the exact minimiser of its expected L2 denoising loss.

For a converted layer with timestep coefficients a = sqrt(abar_t), s = sqrt(1 - abar_t) reading a
feature x (per pixel for a conv, per token for a transformer) of mean mu, covariance C and second
moment M = E[x x^T], the noised feature is x_t = a x + s eps with eps ~ N(0, I) independent of x, and

    E||eps - (D x_t + d)||^2 = k - 2 s tr(D) + tr(D (a^2 C + s^2 I) D^T) + ||a D mu + d||^2.

Its minimiser is ``D* = s (a^2 C + s^2 I)^-1`` and ``d* = -a D* mu`` when the layer owns a bias d;
without d (bias-free layers, and every input-side conv) the last term reads ||a D mu||^2 and folds into
the second moment: ``D* = s (a^2 M + s^2 I)^-1``. This is the point stochastic gradient descent on the
label-free loss converges to (a test plants a problem and watches SGD approach it), reached in one
pass over unlabelled images: statistics are accumulated in float64 from a subsample of rows.

The L1 half of the training loss has no closed form; the calibration minimises the L2 half, which is
what the posterior-mean step assumes (Gaussian noise, squared error).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DenoiseRepError
from .layers import DenoisingConv2d, DenoisingLayer
from .network import _require_layers

logger = logging.getLogger(__name__)


@dataclass
class FeatureMoments:
    """Streaming float64 first and second moments of a layer's denoised feature, per group.

    Attributes:
        rows: number of feature vectors seen.
        total: (groups, k) sum of the vectors.
        outer: (groups, k, k) sum of their outer products.
    """

    rows: int = 0
    total: torch.Tensor | None = None
    outer: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        """Add ``rows`` of shape (n, groups, k)."""
        rows = rows.detach().to("cpu", torch.float64)
        total = rows.sum(0)
        outer = torch.einsum("ngi,ngj->gij", rows, rows)
        if self.total is None:
            self.total, self.outer = total, outer
        else:
            assert self.outer is not None
            self.total += total
            self.outer += outer
        self.rows += rows.shape[0]

    def mean(self) -> torch.Tensor:
        """(groups, k) mean."""
        self._require()
        assert self.total is not None
        return self.total / self.rows

    def second_moment(self) -> torch.Tensor:
        """(groups, k, k) E[x x^T]."""
        self._require()
        assert self.outer is not None
        return self.outer / self.rows

    def covariance(self) -> torch.Tensor:
        """(groups, k, k) E[x x^T] - mu mu^T."""
        mu = self.mean()
        return self.second_moment() - torch.einsum("gi,gj->gij", mu, mu)

    def _require(self) -> None:
        if self.rows == 0:
            raise DenoiseRepError("no feature was seen: calibrate needs at least one batch of images")


@dataclass
class LayerCalibration:
    """What calibration found for one layer: its moments and the optimum it set."""

    moments: FeatureMoments = field(default_factory=FeatureMoments)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def layer_rows(layer: DenoisingLayer, x: torch.Tensor) -> torch.Tensor:
    """The feature vectors a layer's denoiser reads from its input ``x``, as (n, groups, k).

    Linear: the last dimension of the input. Input-side conv: the input channels of each pixel.
    Output-side conv: the channels of each pixel of the (undenoised) conv output.
    """
    if isinstance(layer, DenoisingConv2d):
        if layer.side == "output":
            x = layer._conv_forward(x, layer.weight, layer.bias)
        groups = layer.groups
        return x.permute(0, 2, 3, 1).reshape(-1, groups, x.shape[1] // groups)
    return x.reshape(-1, 1, x.shape[-1])


def optimal_denoiser(
    moments: FeatureMoments, sqrt_abar: float, sqrt_one_minus_abar: float, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(D*, d*) in float64 from the feature moments (see the module docstring).

    Returns:
        D* of shape (groups, k, k) and d* of shape (groups, k), or None without a bias.
    """
    a, s = sqrt_abar, sqrt_one_minus_abar
    spread = moments.covariance() if with_bias else moments.second_moment()
    eye = torch.eye(spread.shape[-1], dtype=torch.float64)
    system = a * a * spread + s * s * eye
    # D* = s system^-1; system is symmetric positive definite (s^2 I), so solve is stable.
    weight = s * torch.linalg.solve(system, eye.expand_as(system))
    if not with_bias:
        return weight, None
    bias = -a * torch.einsum("gij,gj->gi", weight, moments.mean())
    return weight, bias


def expected_l2_loss(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    moments: FeatureMoments,
    sqrt_abar: float,
    sqrt_one_minus_abar: float,
) -> float:
    """The exact E||eps - (D x_t + d)||^2 per feature vector (summed over groups), from the moments.

    ``weight`` is (groups, k, k), ``bias`` (groups, k) or None. At D = 0, d = 0 it is k x groups.
    """
    a, s = sqrt_abar, sqrt_one_minus_abar
    weight = weight.to(torch.float64)
    k = weight.shape[-1]
    second = moments.second_moment()
    mu = moments.mean()
    # E||D x_t||^2 = tr(D (a^2 M + s^2 I) D^T); the bias adds 2 a d^T D mu + ||d||^2.
    quad = torch.einsum("gij,gjl,gil->", weight, a * a * second, weight) + s * s * weight.square().sum()
    loss = weight.shape[0] * k - 2 * s * torch.diagonal(weight, dim1=-2, dim2=-1).sum() + quad
    if bias is not None:
        bias = bias.to(torch.float64)
        loss = loss + 2 * a * torch.einsum("gi,gij,gj->", bias, weight, mu) + bias.square().sum()
    return float(loss)


def collect_moments(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    max_rows_per_batch: int = 4096,
    generator: torch.Generator | None = None,
) -> dict[str, LayerCalibration]:
    """Stream every denoising layer's feature moments over ``batches`` (images only, no labels).

    The model runs in eval mode under ``no_grad`` with its denoisers as they are (zero after a fresh
    ``convert``: the backbone's own features). From each batch at most ``max_rows_per_batch`` feature
    vectors per layer are kept, drawn uniformly with ``generator``, which bounds the cost of the
    outer products for conv layers with thousands of pixels per image.

    Raises:
        DenoiseRepError: ``model`` was never converted, or ``batches`` was empty.
    """
    layers = _require_layers(model, "calibrate")
    found = {name: LayerCalibration() for name, _ in layers}

    def hook_for(name: str, layer: DenoisingLayer):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            rows = layer_rows(layer, args[0])
            if rows.shape[0] > max_rows_per_batch:
                keep = torch.randperm(rows.shape[0], generator=generator)[:max_rows_per_batch]
                rows = rows[keep.to(rows.device)]
            found[name].moments.add(rows)

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name, layer)) for name, layer in layers]  # type: ignore[attr-defined]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if any(c.moments.rows == 0 for c in found.values()):
        raise DenoiseRepError("calibrate saw no image: pass at least one non-empty batch")
    return found


def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    max_rows_per_batch: int = 4096,
    generator: torch.Generator | None = None,
) -> dict[str, LayerCalibration]:
    """Set every denoiser of a converted ``model`` to its closed-form optimum, label-free, in place.

    The denoisers are zeroed first, so the statistics are those of the backbone's own features;
    each layer's optimum then shrinks the directions of its input that carry little variance, by
    about ``beta_t / (a^2 lambda + s^2)`` (DESIGN.md section 4).

    Returns:
        Per layer name: the moments and the (D*, d*) written into the layer.
    """
    layers = _require_layers(model, "calibrate")
    with torch.no_grad():
        for _, layer in layers:
            for param in layer.denoiser_parameters():
                param.zero_()
    found = collect_moments(model, batches, max_rows_per_batch=max_rows_per_batch, generator=generator)
    with torch.no_grad():
        for name, layer in layers:
            step = layer.step
            weight, bias = optimal_denoiser(
                found[name].moments, step.sqrt_abar, step.sqrt_one_minus_abar, layer.denoiser_bias is not None
            )
            layer.denoiser_weight.copy_(weight.reshape(layer.denoiser_weight.shape))
            if bias is not None:
                assert layer.denoiser_bias is not None
                layer.denoiser_bias.copy_(bias.reshape(layer.denoiser_bias.shape))
            found[name].weight, found[name].bias = weight, bias
    logger.info("DenoiseRep calibrated %d layers in closed form", len(layers))
    return found


def denoiser_tensors(layer: DenoisingLayer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's (D, d) in the (groups, k, k) / (groups, k) shape the moments use, float64."""
    weight = layer.denoiser_weight.detach().to(torch.float64)
    weight = weight.reshape(-1, weight.shape[-2], weight.shape[-1])
    bias = layer.denoiser_bias
    if bias is None:
        return weight, None
    return weight, bias.detach().to(torch.float64).reshape(weight.shape[0], -1)
