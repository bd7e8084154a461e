"""DenoiseRep (NeurIPS 2024) for any timm backbone: denoising layers, exact fusion, training phases.

Each converted layer is one reverse-diffusion step on its features, with a fixed timestep t of a
linear beta schedule and a learned noise predictor ``eps(x) = D x + d``. The posterior-mean step
``denoise(x) = c3 x - c1 eps(x)`` (c1 = beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)), c3 = 1/sqrt(alpha_t))
is affine, so it folds into the layer's weights and the fused model costs nothing extra at inference.
The maths is in ``DESIGN.md`` section 4. Typical use::

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    convert(model, layers="mlp")                     # in place; an optimiser may be built before or after
    optimizer = torch.optim.AdamW([
        {"params": backbone_parameters(model), "lr": 3.5e-5},
        {"params": denoiser_parameters(model), "lr": 3.5e-4},
    ])
    set_phase(model, "denoiser")                     # then "backbone", "joint"...: requires_grad only
    loss = task_loss(model(images), labels) + 0.1 * denoise_loss(model)
    plain = fuse(model)                              # a new plain timm model; `model` is untouched

Design decisions (each one fixes a pitfall of the public reference code):

- **Linear layers** get an *input-side* denoiser, D of shape (in, in) and d of shape (in):
  ``W' = c3 W - c1 W D`` and ``b' = b - c1 W d``. Any input whose last dimension is the feature works
  (2-D, 3-D token tensors, ...). A Linear **without bias** gets no d (d is fixed at 0): ``-c1 W d``
  would need a bias the plain layer does not have, and the fused state_dict must load with
  ``strict=True`` into the vanilla timm model.
- **Conv2d layers** get an *output-side* 1x1 denoiser, block-diagonal by group: D of shape
  (groups, out/groups, out/groups) (diagonal for a depthwise conv) and d of shape (out):
  ``W'[o] = c3 W[o] - c1 sum_j D[g, o, j] W[j]`` over the output channels j of o's group, and
  ``b' = c3 b - c1 (D b + d)``. Denoising the *input* of a padded k x k conv is not a k x k conv at
  the image border; a 1x1 map after the conv always composes into it, so this is exact for every
  kernel, stride, padding (and padding mode), dilation and group count. A bias-free conv (the usual
  conv before a BatchNorm) gets no d, for the same reason as a bias-free Linear; the BatchNorm that
  follows has a bias anyway. The noise-prediction loss of a conv layer is computed on its (detached)
  output feature map.
- **No time embedding.** t is fixed per layer, so an embedding e_t in ``D (x + e_t) + d`` would be a
  constant that d absorbs; it is left out, and nothing else enters the fused bias.
- **No random noise in the fused weights**: the step uses the posterior mean. ``fuse`` is a pure
  function of (W, b, D, d) computed in float64 then cast to the layer's dtype, so two calls give
  bit-identical tensors, and it works on a deep copy: it never modifies the trained model, never
  runs inside the training loop, never rebinds the optimiser's parameters.
- **Forward passes.** Eval mode runs the explicit, unfused computation (denoise then layer for
  Linear; layer then denoise for conv; the step is one GEMM ``(c3 I - c1 D) y - c1 d``, or 1x1 conv),
  so the fused model can be checked against it and evaluation before fusion does use the denoisers.
  Train mode applies the fused weight and bias, computed differentiably from (W, b, D, d), so
  gradients reach whichever of them requires grad, and records
  the noise-prediction loss ``L1 + L2 (mean) between eps and D x_t + d`` with
  ``x_t = sqrt(abar_t) x.detach() + sqrt(1 - abar_t) eps`` when the denoiser requires grad. The noise
  comes from torch's global RNG, which the training loop seeds.
- **Initialisation** D = 0, d = 0: a fresh conversion equals the baseline up to the factor c3
  (at most 1.001 for the reference schedule); the loss gradient with respect to D is not zero there.
- **Layer specs.** ``"mlp"``: every nn.Linear that is a direct child of a transformer MLP block (a
  class of ``timm.layers.mlp`` such as Mlp, GluMlp, SwiGLU, or any class named ``*Mlp*`` that is not a
  head). ``"linear"``: every nn.Linear outside the classifier head (``model.get_classifier()`` and the
  top-level ``head``/``head_dist``/``fc``/``classifier``/``last_linear`` modules). ``"conv"``: every
  nn.Conv2d outside the classifier head. Or a predicate(name, module) -> bool. Layers whose forward is
  not the plain linear/conv of their weights (timm's Conv2dSame, StdConv2d; the ``out_proj`` of
  nn.MultiheadAttention, whose weight the parent reads directly) are left alone with a warning.
- **Timesteps.** Converted layers are taken in module registration order, which is the forward
  order for timm models. ``schedule="depth"`` gives the n layers t = n, n-1, ..., 1 (the shallowest
  the largest t: the paper's intent). ``schedule="reference"`` reproduces the public code's recursion
  slip, which gives every transformer block the same pair: the block's fc1 gets t = 2B and its fc2
  t = 2B - 1, B being the number of MLP blocks converted. It is defined only for ``layers="mlp"``
  with two converted Linear layers per block, and refused otherwise. Every t must be <= T.
- **Phases.** ``set_phase`` flips ``requires_grad`` only; Parameter objects are never replaced.
"""

from __future__ import annotations

from .errors import DenoiseRepError
from .layers import (
    DenoisingConv2d,
    DenoisingLayer,
    DenoisingLinear,
    fuse_conv_input_parameters,
    fuse_conv_parameters,
    fuse_linear_parameters,
)
from .network import (
    PHASES,
    backbone_parameters,
    convert,
    denoise_loss,
    denoiser_parameters,
    denoising_layers,
    describe,
    fuse,
    is_converted,
    set_phase,
    summarize_changes,
    weight_changes,
)
from .schedule import DiffusionSchedule, StepCoefficients
from .selection import LAYER_SPECS

__all__ = [
    "LAYER_SPECS",
    "PHASES",
    "DenoiseRepError",
    "DenoisingConv2d",
    "DenoisingLayer",
    "DenoisingLinear",
    "DiffusionSchedule",
    "StepCoefficients",
    "backbone_parameters",
    "convert",
    "denoise_loss",
    "denoiser_parameters",
    "denoising_layers",
    "describe",
    "fuse",
    "fuse_conv_input_parameters",
    "fuse_conv_parameters",
    "fuse_linear_parameters",
    "is_converted",
    "set_phase",
    "summarize_changes",
    "weight_changes",
]
