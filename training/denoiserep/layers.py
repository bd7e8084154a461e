"""Denoising layers: a Linear or Conv2d that carries a denoiser (D, d) and folds it into its weights.

Both classes subclass the layer they replace and *reuse its Parameter objects* for ``weight`` and
``bias``, so an optimiser built before conversion still updates them. The denoiser parameters are
``denoiser_weight`` (D) and ``denoiser_bias`` (d). The fusion itself is three pure functions,
:func:`fuse_linear_parameters`, :func:`fuse_conv_input_parameters` and
:func:`fuse_conv_parameters` (output side), used both by the training forward (in the parameters'
dtype) and by ``fuse`` (in float64, without autograd).

The denoisers are trained by their own, label-free loss only: the training forward builds the fused
weights from a *detached* (D, d), so the task loss (ID, triplet) reaches W and b but never D, as in
the paper's denoiser phase, and the noise-prediction loss is recorded with autograd on (D, d) even
when the backbone runs under ``torch.no_grad`` (a denoiser phase needs no backbone backward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DenoiseRepError
from .folding import (
    MAX_STEP_DEVIATION,
    step_deviation,
    unfuse_conv_input_parameters,
    unfuse_conv_parameters,
    unfuse_linear_parameters,
)
from .schedule import StepCoefficients


def fuse_linear_parameters(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    denoiser_weight: torch.Tensor,
    denoiser_bias: torch.Tensor | None,
    c1: float,
    c3: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold an input-side denoiser into a Linear layer.

    ``W (c3 x - c1 (D x + d)) + b = (c3 W - c1 W D) x + (b - c1 W d)``.

    Returns:
        (W', b'); b' is None exactly when the layer has no bias (then d is fixed at 0).
    """
    fused_weight = c3 * weight - c1 * (weight @ denoiser_weight)
    if bias is None:
        return fused_weight, None
    assert denoiser_bias is not None  # a biased layer always owns d (see DenoisingLinear)
    return fused_weight, bias - c1 * (weight @ denoiser_bias)


def fuse_conv_parameters(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    denoiser_weight: torch.Tensor,
    denoiser_bias: torch.Tensor | None,
    c1: float,
    c3: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold an output-side, group-block-diagonal 1x1 denoiser into a Conv2d.

    With ``y = conv(x; W, b)`` and ``denoise(y) = c3 y - c1 (D y + d)``, output channel ``o`` of group
    ``g`` becomes ``W'[o] = c3 W[o] - c1 sum_j D[g, o, j] W[j]`` over the channels ``j`` of the same
    group, and ``b' = c3 b - c1 (D b + d)``. Mixing only channels of one group keeps the result a
    grouped conv with the original hyper-parameters, so this is exact for every kernel size, stride,
    padding (mode), dilation and group count.

    Args:
        weight: (out, in / groups, kh, kw).
        denoiser_weight: (groups, out / groups, out / groups).

    Returns:
        (W', b'); b' is None exactly when the conv has no bias (then d is fixed at 0).
    """
    groups, group_out, _ = denoiser_weight.shape
    per_group = weight.reshape(groups, group_out, -1)
    fused_weight = (c3 * per_group - c1 * torch.bmm(denoiser_weight, per_group)).reshape(weight.shape)
    if bias is None:
        return fused_weight, None
    assert denoiser_bias is not None  # a biased conv always owns d (see DenoisingConv2d)
    mixed_bias = torch.bmm(denoiser_weight, bias.reshape(groups, group_out, 1)).reshape(bias.shape)
    return fused_weight, c3 * bias - c1 * (mixed_bias + denoiser_bias)


def fuse_conv_input_parameters(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    denoiser_weight: torch.Tensor,
    denoiser_bias: torch.Tensor | None,
    c1: float,
    c3: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold an input-side, group-block-diagonal 1x1 denoiser without bias into a Conv2d (the paper's form).

    ``conv(c3 x - c1 D x; W, b)``: a per-pixel channel map commutes with zero, reflect, replicate and
    circular padding, stride, dilation and groups when it has no bias (a bias would turn the zeros
    of the padding into ``-c1 d``), so the composition is the conv with
    ``W'[o, i] = c3 W[o, i] - c1 sum_j W[o, j] D[g, j, i]`` over the input channels j of o's group,
    and ``b' = b``.

    Args:
        weight: (out, in / groups, kh, kw).
        denoiser_weight: (groups, in / groups, in / groups).
        denoiser_bias: must be None (the input side has no d).
    """
    if denoiser_bias is not None:
        raise DenoiseRepError(
            "an input-side conv denoiser has no bias d: it would not be exact at the border"
        )
    groups, group_in, _ = denoiser_weight.shape
    out, _, kh, kw = weight.shape
    per_group = weight.reshape(groups, out // groups, group_in, kh * kw)
    mixed = torch.einsum("gojk,gji->goik", per_group, denoiser_weight)
    return (c3 * per_group - c1 * mixed).reshape(weight.shape), bias


def _noise_prediction_loss(predicted: torch.Tensor, noise: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """L1 + L2 between the true and the predicted noise: summed over the feature, averaged over rows.

    Summing over the feature dimension keeps the gradient on each entry of D independent of the
    layer's width (a mean over every element would shrink it by 1/width, see DESIGN.md section 4).
    """
    diff = predicted - noise
    return (diff.abs().sum(feature_dim) + diff.square().sum(feature_dim)).mean()


class DenoisingLayer:
    """Behaviour shared by the denoising layers (a mixin; the layer classes are nn.Modules).

    Attributes:
        step: the layer's fixed timestep and its coefficients.
        settings: the conversion settings (shared by all layers of one ``convert`` call).
    """

    step: StepCoefficients
    settings: dict
    source_class: type[nn.Module]
    denoiser_weight: nn.Parameter
    denoiser_bias: nn.Parameter | None
    weight: nn.Parameter
    bias: nn.Parameter | None
    training: bool
    _loss_sum: torch.Tensor | None
    #: The pure fusion of this layer: (W, b, D, d, c1=, c3=) -> (W', b'), and its inverse.
    _fuse: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    _unfuse: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    #: ``D x + d`` on the feature the denoiser reads, for given (D, d) (each layer class defines it).
    _apply_denoiser: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    #: True while ``weight`` and ``bias`` hold the fused (W', b') (see :mod:`.folding`).
    folded: bool

    def _adopt(
        self,
        source: nn.Module,
        step: StepCoefficients,
        settings: dict,
        denoiser_shape: tuple[int, ...],
        bias_shape: tuple[int, ...] | None,
    ) -> None:
        """Take over ``source``'s weight and bias Parameter objects, then add a zero denoiser.

        Reusing the Parameters (not copies) keeps an optimiser built before conversion working.
        """
        self.weight = source.weight
        self.bias = source.bias
        self.step = step
        self.settings = settings
        self.source_class = type(source)
        self._init_denoiser(denoiser_shape, bias_shape)
        #: Rows of the denoising loss per forward (None: all); see network.set_loss_rows.
        self.loss_rows: int | None = None
        #: Train forwards that reuse one fused (W', b') while W is frozen; see network.set_fused_refresh.
        self.fused_refresh = 1
        self._fused_cache: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._fused_uses = 0
        self._fused_of = -1  # the weight's version the cache was built from
        self.folded = False
        self.train(source.training)  # type: ignore[attr-defined]

    def _init_denoiser(self, denoiser_shape: tuple[int, ...], bias_shape: tuple[int, ...] | None) -> None:
        # D = 0, d = 0: a freshly converted layer computes c3 * (its old output) for convs and
        # W (c3 x) + b for Linear, i.e. the baseline up to a scale c3 = 1/sqrt(1 - beta_t) that is at
        # most 1.001 for the reference schedule. Zero init does not stall training: the gradient of
        # the noise-prediction loss with respect to D at D = 0 is -(sign(eps) + 2 eps) x_t^T / n != 0.
        dd = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.denoiser_weight = nn.Parameter(torch.zeros(denoiser_shape, **dd))
        if bias_shape is None:
            # No bias in the layer -> no d: a fused bias could not be stored in the plain layer, and a
            # strict load into the vanilla timm model must find exactly the original parameters.
            self.register_parameter("denoiser_bias", None)  # type: ignore[attr-defined]
        else:
            self.denoiser_bias = nn.Parameter(torch.zeros(bias_shape, **dd))
        self._loss_sum = None

    def denoiser_parameters(self) -> list[nn.Parameter]:
        """D and, where the layer has a bias, d."""
        return [p for p in (self.denoiser_weight, self.denoiser_bias) if p is not None]

    def fused_parameters(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused (W', b').

        With ``dtype`` None (the training forward): differentiable in W and b, with (D, d) detached so
        that the task loss never trains the denoisers. Otherwise computed in ``dtype``, all detached.
        A folded layer holds (W', b') itself.
        """
        if self.folded:
            if dtype is None:
                return self.weight, self.bias
            return self._stored_parameters(dtype)[:2]
        denoiser = tuple(
            None if t is None else t.detach() for t in (self.denoiser_weight, self.denoiser_bias)
        )
        tensors = (self.weight, self.bias, *denoiser)
        if dtype is not None:
            tensors = tuple(None if t is None else t.detach().to(dtype) for t in tensors)
        return self._fuse(*tensors, c1=self.step.c1, c3=self.step.c3)

    def base_parameters(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's own (W, b) in ``dtype``, detached; recovered from (W', b') while folded."""
        weight, bias, *denoiser = self._stored_parameters(dtype)
        if not self.folded:
            return weight, bias
        return self._unfuse(weight, bias, *denoiser, c1=self.step.c1, c3=self.step.c3)

    def _stored_parameters(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, ...]:
        """(weight, bias, D, d) as stored, detached and cast to ``dtype``."""
        stored = (self.weight, self.bias, self.denoiser_weight, self.denoiser_bias)
        return tuple(None if t is None else t.detach().to(dtype) for t in stored)

    def weight_change(self) -> float:
        """``||W' - W|| / ||W||`` in float64: how much the fused step changes this layer's weight."""
        fused, _ = self.fused_parameters(torch.float64)
        weight, _ = self.base_parameters(torch.float64)
        return float((fused - weight).norm() / weight.norm().clamp_min(1e-300))

    def fold(self) -> bool:
        """Store (W', b') in ``weight`` and ``bias`` in place, for a backbone phase (see :mod:`.folding`).

        Returns:
            True when the layer is folded; False (left unchanged, still exact) when its step matrix
            is too far from the identity for a safe round trip.

        Raises:
            DenoiseRepError: the denoiser trains (folding would freeze it in the weights).
        """
        if self.folded:
            return True
        if self.denoiser_weight.requires_grad:
            raise DenoiseRepError(
                "cannot fold a layer whose denoiser trains: set_phase(model, 'backbone') first"
            )
        if step_deviation(self.denoiser_weight, self.step.c1, self.step.c3) > MAX_STEP_DEVIATION:
            return False
        self._store(*self.fused_parameters(torch.float64))
        self._fused_cache = None
        self.folded = True
        return True

    def unfold(self) -> None:
        """Put the layer's own (W, b), recovered in float64, back into ``weight`` and ``bias``."""
        if not self.folded:
            return
        self._store(*self.base_parameters(torch.float64))
        self.folded = False
        self._fused_cache = None

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        # In place: the optimiser (and DDP) hold these very Parameter objects.
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                assert self.bias is not None
                self.bias.copy_(bias)

    def _forward_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') for a forward of the folded layer; refuses a denoiser that would train unseen."""
        if self.denoiser_weight.requires_grad:
            raise DenoiseRepError(
                "this layer is folded (backbone phase) but its denoiser requires grad: call "
                "denoiserep.unfold(model) (set_phase does) before training the denoisers"
            )
        return self.weight, self.bias

    def _train_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') for an unfolded train forward: rebuilt each time, or reused while W is frozen.

        In a denoiser phase the backbone is frozen and only D moves, by one small Adam step per
        forward; rebuilding W' (``out x in^2`` per layer) every forward costs about half the
        forward itself at batch 8. With ``fused_refresh`` = k > 1 the same W' serves k forwards, so
        the features a layer's loss sees come from upstream denoisers at most k - 1 steps old (the
        layer's own loss always uses its current D). Rebuilt at once when W changes or trains.
        """
        if not self._reuses_fused():
            self._fused_cache = None
            return self.fused_parameters()
        version = self.weight._version
        if self._fused_cache is None or self._fused_uses >= self.fused_refresh or version != self._fused_of:
            with torch.no_grad():
                self._fused_cache = self.fused_parameters()
            self._fused_uses, self._fused_of = 0, version
        self._fused_uses += 1
        return self._fused_cache

    def _reuses_fused(self) -> bool:
        return self.fused_refresh > 1 and not self.weight.requires_grad

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        # Checkpoints always hold the layer's own (W, b): a folded layer writes them unfolded, so a
        # checkpoint taken during a backbone phase loads into a fresh converted model unchanged.
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        if self.folded:
            weight, bias = self.base_parameters(torch.float64)
            destination[prefix + "weight"] = weight.to(self.weight.dtype)
            if bias is not None:
                assert self.bias is not None
                destination[prefix + "bias"] = bias.to(self.bias.dtype)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        if self.folded:
            raise DenoiseRepError("cannot load into a folded layer: denoiserep.unfold(model) first")
        self._fused_cache = None
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]

    def predict_noise(self, x: torch.Tensor) -> torch.Tensor:
        """``D x + d`` with the trainable (D, d), on the feature the denoiser reads."""
        return self._apply_denoiser(x, self.denoiser_weight, self.denoiser_bias)

    def _frozen_denoise(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`denoise` with (D, d) detached: the task loss's road through the denoiser."""
        bias = None if self.denoiser_bias is None else self.denoiser_bias.detach()
        noise = self._apply_denoiser(x, self.denoiser_weight.detach(), bias)
        return x - self.step.c1 * noise + (self.step.c3 - 1.0) * x

    def _records_loss(self) -> bool:
        # Only while the denoiser trains (denoiser and joint phases, label-free stage); in a backbone
        # phase the loss would be a constant that costs an extra product per layer for nothing.
        return self.training and self.denoiser_weight.requires_grad

    def _record_noise_loss(self, clean: torch.Tensor, feature_dim: int) -> None:
        """Record the noise-prediction loss on the detached feature ``clean`` (label-free).

        Autograd is switched on here, for (D, d) only: the backbone may run under ``torch.no_grad``.
        """
        with torch.enable_grad():
            rows = self._loss_rows_of(clean.detach(), feature_dim)
            noise = torch.randn_like(rows)
            noised = self.step.sqrt_abar * rows + self.step.sqrt_one_minus_abar * noise
            loss = _noise_prediction_loss(self._predict_rows(noised), noise, -1)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def _predict_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """:meth:`predict_noise` on feature vectors (rows, features), one matrix product per group.

        The loss's rows are vectors whatever the layer: a grouped 1x1 conv on (rows, C, 1, 1) maps
        takes a slow path on the CPU (several times the product itself, forward and backward).
        """
        weight, bias = self.denoiser_weight, self.denoiser_bias
        if weight.dim() == 2:
            return F.linear(rows, weight, bias)
        groups, width = weight.shape[0], weight.shape[-1]
        out = torch.einsum("ngc,gdc->ngd", rows.reshape(-1, groups, width), weight).reshape(rows.shape[0], -1)
        return out if bias is None else out + bias

    def _loss_rows_of(self, clean: torch.Tensor, feature_dim: int) -> torch.Tensor:
        """The feature vectors (rows, features) of ``clean``: at most ``loss_rows``, drawn uniformly
        with replacement, else all.

        The loss is a mean over rows, so the mean over a uniform sample is an unbiased estimate of
        it; a CNN's early layers have ~10^5 pixels per batch, where the full loss costs several
        times the conv itself. The sample is gathered straight from the (N, C, H, W) map of a conv,
        without first copying the whole map into rows.
        """
        limit = getattr(self, "loss_rows", None)
        feature = clean.shape[feature_dim]
        total = clean.numel() // feature
        if limit is None or total <= limit:
            return clean.movedim(feature_dim, -1).reshape(-1, feature)
        picked = torch.randint(total, (limit,), device=clean.device)
        if feature_dim == -1:
            return clean.reshape(-1, feature)[picked]
        # Row r is pixel (r // HW, r % HW) in (N, H, W) order, as a moved-and-flattened map numbers them.
        maps = clean.flatten(2)
        pixels = maps.shape[-1]
        return maps[picked // pixels, :, picked % pixels]

    def pop_loss(self) -> torch.Tensor | None:
        """The summed noise-prediction loss of the train forwards since the last call, then reset."""
        loss, self._loss_sum = self._loss_sum, None
        return loss

    def denoise(self, x: torch.Tensor) -> torch.Tensor:
        """One posterior-mean reverse step ``c3 x - c1 (D x + d)``, in the residual form.

        Written ``x - c1 (D x + d) + (c3 - 1) x``: the correction is a small difference from x, and a
        step matrix ``c3 I - c1 D`` would round its diagonal to {0.996, 1.0} in bf16 and lose it.
        """
        return x - self.step.c1 * self.predict_noise(x) + (self.step.c3 - 1.0) * x

    def plain_layer(self) -> nn.Module:
        """A new layer of the original class holding the fused weights (float64 maths, original dtype)."""
        raise NotImplementedError

    def __getstate__(self) -> dict:
        # The loss accumulator is part of an autograd graph: it cannot be deep-copied or pickled, and a
        # copy of the model (fuse, checkpoint) must not carry a pending loss anyway.
        state = self.__dict__.copy()
        state["_loss_sum"] = None
        state["_fused_cache"] = None  # derived, rebuilt on demand
        return state

    def extra_repr(self) -> str:
        # The layer's own description (Linear / Conv2d, next in the MRO), then its timestep.
        step = f"t={self.step.t}, c1={self.step.c1:.4g}, c3={self.step.c3:.6g}"
        return f"{super().extra_repr()}, {step}"  # type: ignore[misc]


class DenoisingLinear(DenoisingLayer, nn.Linear):
    """A Linear layer with an input-side denoiser ``eps(x) = D x + d``; D is (in, in).

    Eval forward (the explicit, unfused maths): ``W denoise(x) + b``. Train forward: the Linear with
    fused parameters (or, with fewer rows than outputs, on the denoised rows: the same function),
    recording the noise-prediction loss on the detached input while D trains. A folded layer (a
    backbone phase) is a plain Linear on (W', b'). Works on any input whose last dimension is the
    feature (2-D, 3-D tokens...).
    """

    _fuse = staticmethod(fuse_linear_parameters)
    _unfuse = staticmethod(unfuse_linear_parameters)

    def __init__(self, source: nn.Linear, step: StepCoefficients, settings: dict) -> None:
        # Built on the meta device so no throw-away weight is allocated; the real ones are the source's.
        super().__init__(source.in_features, source.out_features, bias=source.bias is not None, device="meta")
        n = self.in_features
        self._adopt(source, step, settings, (n, n), None if source.bias is None else (n,))

    @staticmethod
    def _apply_denoiser(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return F.linear(x, *self._forward_parameters())
        if not self.training:
            return F.linear(self.denoise(x), self.weight, self.bias)
        if self._records_loss():
            self._record_noise_loss(x, -1)
        # Two exact roads to W (c3 x - c1 (D x + d)) + b: denoise the rows (rows x in^2 multiply-adds)
        # or fuse the weights (out x in^2); with fewer rows than outputs the rows are cheaper, unless
        # fused weights are being reused anyway (a denoiser phase, fused_refresh > 1).
        if x.numel() // self.in_features < self.out_features and not self._reuses_fused():
            return F.linear(self._frozen_denoise(x), self.weight, self.bias)
        weight, bias = self._train_parameters()
        return F.linear(x, weight, bias)

    def plain_layer(self) -> nn.Module:
        weight, bias = self.fused_parameters(torch.float64)
        plain = self.source_class(self.in_features, self.out_features, bias=bias is not None, device="meta")
        return _fill(plain, self, weight, bias)


CONV_SIDES = ("input", "output")


class DenoisingConv2d(DenoisingLayer, nn.Conv2d):
    """A Conv2d with a 1x1 denoiser, block-diagonal by group, on its input (default) or its output.

    ``side="input"`` (the paper's form): D is (groups, in/g, in/g), no d, and the layer computes
    ``conv(denoise(x))``; exact for every padding mode, stride, dilation and group count because the
    step has no bias, and it changes the *direction* of each output channel's kernel, which a
    BatchNorm after the conv keeps. ``side="output"``: D is (groups, out/g, out/g) with a d when the
    conv has a bias, ``denoise(conv(x))``; a train-mode BatchNorm right after it cancels c3 and the
    diagonal of D (only cross-channel mixing survives), so it is an explicit option only.

    Train forward: the conv with fused parameters (input side: or on the denoised input where that
    is cheaper, the same function), recording the noise-prediction loss on the detached input (input
    side) or on the clean conv output, recomputed without autograd (output side). A folded layer (a
    backbone phase) is a plain conv on (W', b').
    """

    def __init__(
        self, source: nn.Conv2d, step: StepCoefficients, settings: dict, side: str = "input"
    ) -> None:
        if side not in CONV_SIDES:
            raise DenoiseRepError(
                f"unknown conv side {side!r}: use one of {', '.join(map(repr, CONV_SIDES))}"
            )
        super().__init__(
            source.in_channels,
            source.out_channels,
            source.kernel_size,
            stride=source.stride,
            padding=source.padding,
            dilation=source.dilation,
            groups=source.groups,
            bias=source.bias is not None,
            padding_mode=source.padding_mode,
            device="meta",
        )
        self.side = side
        if side == "input":
            group_in = self.in_channels // self.groups
            self._adopt(source, step, settings, (self.groups, group_in, group_in), None)
        else:
            group_out = self.out_channels // self.groups
            bias_shape = None if source.bias is None else (self.out_channels,)
            self._adopt(source, step, settings, (self.groups, group_out, group_out), bias_shape)

    def _fuse(
        self, *tensors: torch.Tensor | None, c1: float, c3: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        fuse = fuse_conv_input_parameters if self.side == "input" else fuse_conv_parameters
        return fuse(*tensors, c1=c1, c3=c3)  # type: ignore[arg-type]

    def _unfuse(
        self, *tensors: torch.Tensor | None, c1: float, c3: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unfuse = unfuse_conv_input_parameters if self.side == "input" else unfuse_conv_parameters
        return unfuse(*tensors, c1=c1, c3=c3)  # type: ignore[arg-type]

    def _apply_denoiser(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``D x + d`` per pixel, as a grouped 1x1 conv over the channels the denoiser reads."""
        kernel = weight.reshape(-1, weight.shape[-1], 1, 1)
        return F.conv2d(x, kernel, bias, groups=self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded:
            return self._conv_forward(x, *self._forward_parameters())
        if not self.training:
            if self.side == "input":
                return self._conv_forward(self.denoise(x), self.weight, self.bias)
            return self.denoise(self._conv_forward(x, self.weight, self.bias))
        if self._records_loss():
            if self.side == "input":
                self._record_noise_loss(x, 1)
            else:
                # The signal lives on the clean conv output, which the fused forward never forms.
                with torch.no_grad():
                    clean = self._conv_forward(x, self.weight, self.bias)
                self._record_noise_loss(clean, 1)
        if self.side == "input" and not self._reuses_fused() and self._denoising_input_is_cheaper(x):
            return self._conv_forward(self._frozen_denoise(x), self.weight, self.bias)
        weight, bias = self._train_parameters()
        return self._conv_forward(x, weight, bias)

    def _denoising_input_is_cheaper(self, x: torch.Tensor) -> bool:
        """Whether ``conv(denoise(x))`` costs fewer multiply-adds than fusing the weights.

        Denoising the pixels costs ``pixels x in x in/g``, fusing ``out x kh x kw x in/g x in/g``
        (both then run the same conv): the pixels win where ``pixels x g < out x kh x kw``, the deep
        layers of a CNN at a small batch (ResNet-50's 2048-channel layer4 inputs at batch 8).
        """
        pixels = x.numel() // self.in_channels
        kh, kw = self.kernel_size
        return pixels * self.groups < self.out_channels * kh * kw

    def plain_layer(self) -> nn.Module:
        weight, bias = self.fused_parameters(torch.float64)
        plain = self.source_class(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=bias is not None,
            padding_mode=self.padding_mode,
            device="meta",
        )
        return _fill(plain, self, weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, side={self.side}"


def _fill(
    plain: nn.Module, layer: DenoisingLayer, weight: torch.Tensor, bias: torch.Tensor | None
) -> nn.Module:
    """Give a meta-device plain layer the fused weights, cast back to the layer's dtype and device."""
    dd = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    plain.weight = nn.Parameter(weight.to(**dd), requires_grad=layer.weight.requires_grad)
    if bias is not None:
        assert layer.bias is not None
        plain.bias = nn.Parameter(bias.to(**dd), requires_grad=layer.bias.requires_grad)
    if any(t.is_meta for t in plain.parameters()):
        raise DenoiseRepError(f"{type(plain).__name__} kept a parameter that fuse did not fill")
    return plain.train(layer.training)
