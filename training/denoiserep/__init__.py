"""DenoiseRep (NeurIPS 2024) for any timm backbone: denoising layers, exact fusion, training phases.

Each converted layer is one reverse-diffusion step on its features, with a fixed timestep t of a
linear beta schedule and a learned noise predictor ``eps(x) = D x + d``. The posterior-mean step
``denoise(x) = c3 x - c1 eps(x)`` (c1 = beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)), c3 = 1/sqrt(alpha_t))
is affine, so it folds into the layer's weights and the fused model costs nothing extra at inference.
The maths is in ``DESIGN.md`` section 4. Typical use::

    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    convert(model)                                   # layers="auto": MLP linears / non-depthwise convs
    backbone_opt = torch.optim.AdamW(backbone_parameters(model), lr=3.5e-5)
    denoiser_opt = torch.optim.Adam(denoiser_parameters(model), lr=1e-3)   # no weight decay on D
    set_phase(model, "denoiser")                     # label-free: only D trains, no label read
    with torch.no_grad():
        model(images)                                # the backbone needs no autograd here
    denoise_loss(model).backward(); denoiser_opt.step()
    set_phase(model, "backbone")                     # the task loss through the fused weights
    fold(model)                                      # optional: plain-layer cost for the phase
    task_loss(model(images), labels).backward(); backbone_opt.step()
    unfold(model)                                    # set_phase("denoiser") would do it too
    calibrate(model, unlabelled_batches)             # or: D, d at their closed-form optimum, one pass
    plain = fuse(model)                              # a new plain timm model; `model` is untouched

Design decisions (each one fixes a pitfall of the public reference code):

- **Linear layers** get an *input-side* denoiser, D of shape (in, in) and d of shape (in):
  ``W' = c3 W - c1 W D`` and ``b' = b - c1 W d``. Any input whose last dimension is the feature works
  (2-D, 3-D token tensors, ...). A Linear **without bias** gets no d (d is fixed at 0): ``-c1 W d``
  would need a bias the plain layer does not have, and the fused state_dict must load with
  ``strict=True`` into the vanilla timm model.
- **Conv2d layers** get, by default (``conv_side="input"``), the paper's *input-side* 1x1 denoiser,
  block-diagonal by group and without d: D of shape (groups, in/groups, in/groups),
  ``W'[o, i] = c3 W[o, i] - c1 sum_j W[o, j] D[g, j, i]``, ``b' = b``. A bias-free per-pixel map
  commutes with zero/reflect/replicate/circular padding, stride, dilation and groups, so this is
  exact; and because it changes the direction of each output channel's kernel, a train-mode
  BatchNorm after the conv keeps the change. ``conv_side="output"`` puts a 1x1 denoiser on the
  conv's output instead (D of shape (groups, out/groups, out/groups), a d when the conv has a bias,
  ``W'[o] = c3 W[o] - c1 sum_j D[g, o, j] W[j]``, ``b' = c3 b - c1 (D b + d)``); a BatchNorm right after
  it cancels c3 and the diagonal of D, so it is only an explicit option.
- **No time embedding.** t is fixed per layer, so an embedding e_t in ``D (x + e_t) + d`` would be a
  constant that d absorbs; it is left out, and nothing else enters the fused bias.
- **No random noise in the fused weights**: the step uses the posterior mean. ``fuse`` is a pure
  function of (W, b, D, d) computed in float64 then cast to the layer's dtype, so two calls give
  bit-identical tensors, and it works on a deep copy: it never modifies the trained model, never
  runs inside the training loop, never rebinds the optimiser's parameters.
- **Forward passes.** Eval mode runs the explicit, unfused computation (denoise then layer), with the
  step in the residual form ``x - c1 (D x + d) + (c3 - 1) x`` (a step matrix ``c3 I - c1 D`` would round
  its diagonal away in bf16), so the fused model can be checked against it. Train mode applies the
  fused weight and bias, built from (W, b) with a *detached* (D, d): the task loss trains the
  backbone and never the denoisers. While the denoisers require grad, it records the label-free
  noise-prediction loss ``|eps - (D x_t + d)|`` (L1 + L2, summed over the feature, averaged over rows,
  so its gradient does not shrink with width) with ``x_t = sqrt(abar_t) x.detach() + sqrt(1 - abar_t) eps``,
  under autograd even inside ``torch.no_grad`` (a denoiser phase runs the backbone without it). The
  noise comes from torch's global RNG, which the training loop seeds.
- **Calibration** (:mod:`.calibration`): D, d set to the exact minimiser of the expected L2 loss from
  streamed feature moments, ``D* = s (a^2 C + s^2 I)^-1``, ``d* = -a D* mu``.
- **Initialisation** D = 0, d = 0: a fresh conversion equals the baseline up to the factor c3
  (at most 1.001 for the reference schedule); the loss gradient with respect to D is not zero there.
- **Layer specs.** ``"auto"`` (default): ``"mlp"`` when the model has MLP blocks, else the convs that
  are not depthwise (a depthwise conv's denoiser is one scale per channel, which a norm cancels).
  ``"mlp"``: every nn.Linear that is a direct child of a transformer MLP block (a
  class of ``timm.layers.mlp`` such as Mlp, GluMlp, SwiGLU, or any class named ``*Mlp*`` that is not a
  head). ``"linear"``: every nn.Linear outside the classifier head (``model.get_classifier()`` and the
  top-level ``head``/``head_dist``/``fc``/``classifier``/``last_linear`` modules). ``"conv"``: every
  nn.Conv2d outside the classifier head. Or a predicate(name, module) -> bool. Layers whose forward is
  not the plain linear/conv of their weights (timm's Conv2dSame, StdConv2d; the ``out_proj`` of
  nn.MultiheadAttention, whose weight the parent reads directly) are left alone with a warning.
- **Timesteps.** Converted layers are taken in module registration order, which is the forward
  order for timm models. ``schedule="depth"`` gives the n layers t = n, n-1, ..., 1 (the shallowest
  the largest t: the paper's intent). ``schedule="reference"`` reproduces the public code's recursion
  slip, which gives every transformer block the same pair, 0-based (2B, 2B - 1): the block's fc1 gets
  the 1-based t = 2B + 1 and its fc2 t = 2B, B being the number of MLP blocks converted. It is
  defined only for ``layers="mlp"``
  with two converted Linear layers per block, and refused otherwise. Every t must be <= T.
- **Phases.** ``set_phase`` flips ``requires_grad`` only; Parameter objects are never replaced.
- **Training cost** (:mod:`.folding`, issue 13). A backbone phase can ``fold`` the frozen denoisers
  into the weights (in place, float64 maths) and train plain layers, then ``unfold`` recovers W;
  checkpoints always hold the unfolded (W, b). Unfolded train forwards take whichever of the two
  exact roads is cheaper for the batch: fused weights, or the denoised rows / pixels.
"""

from __future__ import annotations

from .calibration import calibrate
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
    fold,
    fuse,
    is_converted,
    set_fused_refresh,
    set_loss_rows,
    set_phase,
    summarize_changes,
    unfold,
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
    "calibrate",
    "convert",
    "denoise_loss",
    "denoiser_parameters",
    "denoising_layers",
    "describe",
    "fold",
    "fuse",
    "fuse_conv_input_parameters",
    "fuse_conv_parameters",
    "fuse_linear_parameters",
    "is_converted",
    "set_fused_refresh",
    "set_loss_rows",
    "set_phase",
    "summarize_changes",
    "unfold",
    "weight_changes",
]
