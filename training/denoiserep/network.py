"""Whole-model DenoiseRep operations: convert, fuse, the denoising loss, training phases, settings."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from .errors import DenoiseRepError
from .layers import CONV_SIDES, DenoisingConv2d, DenoisingLayer, DenoisingLinear
from .schedule import SCHEDULES, DiffusionSchedule, depth_timesteps, reference_timesteps
from .selection import LayerPredicate, nothing_matched_message, select_layers

logger = logging.getLogger(__name__)

PHASES = ("denoiser", "backbone", "joint")


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` (or any submodule) holds a denoising layer."""
    return any(isinstance(m, DenoisingLayer) for m in model.modules())


def denoising_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The denoising layers of ``model`` with their qualified names, in the order timesteps were assigned."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, DenoisingLayer)]


def _require_layers(model: nn.Module, action: str) -> list[tuple[str, Any]]:
    layers = denoising_layers(model)
    if not layers:
        raise DenoiseRepError(
            f"{action} needs a DenoiseRep model, but {type(model).__name__} was never converted: "
            "call training.denoiserep.convert(model) first"
        )
    return layers


def convert(
    model: nn.Module,
    *,
    layers: str | LayerPredicate = "auto",
    schedule: str = "depth",
    timesteps: int = 1000,
    beta: tuple[float, float] = (1e-4, 2e-3),
    conv_side: str = "input",
) -> nn.Module:
    """Replace the chosen layers of ``model`` in place by denoising layers, and return ``model``.

    The layers keep their weight and bias Parameter objects and gain a denoiser initialised to zero.

    Args:
        model: a timm model (or any nn.Module) that was not converted before.
        layers: "auto", "mlp", "linear", "conv" or a predicate(name, module) -> bool (see the package
            docstring).
        schedule: "depth" (shallowest layer t = n, deepest t = 1) or "reference" (every MLP block gets
            the public code's 0-based pair (2B, 2B-1); only when the layers are the MLP linears).
        timesteps: T, the length of the linear beta schedule.
        beta: (beta_1, beta_T); beta_T is the strength knob (a larger one, a larger fused change).
        conv_side: "input" (the paper's form, exact without d, survives BatchNorm) or "output".

    Returns:
        ``model`` itself, converted.

    Raises:
        DenoiseRepError: an already converted model, an unknown spec or schedule, a spec matching no
            layer, or more timesteps needed than T.
    """
    if is_converted(model):
        raise DenoiseRepError(
            f"{type(model).__name__} is already converted ({len(denoising_layers(model))} denoising layers); "
            "convert a fresh model, or fuse(model) to get a plain one"
        )
    if schedule not in SCHEDULES:
        raise DenoiseRepError(f"unknown schedule={schedule!r}: use one of {', '.join(map(repr, SCHEDULES))}")
    if schedule == "reference" and not (
        layers == "mlp" or (layers == "auto" and select_layers(model, "mlp", warn_skipped=False))
    ):
        raise DenoiseRepError(
            "schedule='reference' reproduces the public code's per-block (fc1, fc2) timesteps and is only "
            f"defined for the MLP linears (layers='mlp'), not layers={layers!r}; use schedule='depth'"
        )
    if conv_side not in CONV_SIDES:
        raise DenoiseRepError(
            f"unknown conv_side={conv_side!r}: use one of {', '.join(map(repr, CONV_SIDES))}"
        )
    try:
        beta_pair = tuple(float(b) for b in beta)
    except (TypeError, ValueError) as error:
        raise DenoiseRepError(f"beta must be a pair of floats (beta_1, beta_T), got {beta!r}") from error
    diffusion = DiffusionSchedule(timesteps, beta_pair)  # type: ignore[arg-type]
    selected = select_layers(model, layers)
    if not selected:
        raise DenoiseRepError(nothing_matched_message(model, layers))
    _refuse_shared(model, {id(s.module) for s in selected})
    if schedule == "depth":
        steps = depth_timesteps(len(selected), diffusion.timesteps)
    else:
        steps = reference_timesteps([s.parent for s in selected], diffusion.timesteps)

    spec_name = (
        layers if isinstance(layers, str) else f"predicate:{getattr(layers, '__qualname__', 'callable')}"
    )
    settings = {
        "layers": spec_name,
        "schedule": schedule,
        "timesteps": diffusion.timesteps,
        "beta": list(diffusion.beta),
        "conv_side": conv_side,
    }
    for chosen, t in zip(selected, steps, strict=True):
        layer: DenoisingLayer
        if isinstance(chosen.module, nn.Linear):
            layer = DenoisingLinear(chosen.module, diffusion.step(t), settings)
        else:
            layer = DenoisingConv2d(chosen.module, diffusion.step(t), settings, side=conv_side)  # type: ignore[arg-type]
        parent = model.get_submodule(chosen.parent)
        # Assigning to an existing child name keeps its slot in _modules, so registration (forward)
        # order, and with it the order of denoising_layers(), is unchanged.
        setattr(parent, chosen.name.rsplit(".", 1)[-1], layer)
    logger.info(
        "DenoiseRep converted %d layers of %s (layers=%s, schedule=%s, T=%d)",
        len(selected),
        type(model).__name__,
        settings["layers"],
        schedule,
        diffusion.timesteps,
    )
    return model


def _refuse_shared(model: nn.Module, selected: set[int]) -> None:
    """Refuse layers registered under two names: replacing one name would leave the other stale."""
    seen: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in selected:
            continue
        if id(module) in seen:
            raise DenoiseRepError(
                f"layer {seen[id(module)]!r} is also registered as {name!r}; DenoiseRep cannot convert a "
                "shared layer: exclude it with a layers predicate"
            )
        seen[id(module)] = name


def fuse(model: nn.Module) -> nn.Module:
    """A new model in which every denoising layer is folded into a plain layer of its original class.

    The fused weights are computed in float64 from (W, b, D, d) and cast to the layer's dtype; no
    random noise and no time embedding enter them, so fusing twice gives bit-identical tensors. The
    result keeps the input's train/eval mode, has no denoiser tensors, and its state_dict loads with
    ``strict=True`` into a freshly created model of the same configuration. ``model`` is left untouched.

    Raises:
        DenoiseRepError: ``model`` was never converted.
    """
    layers = _require_layers(model, "fuse")
    # Pre-seeding deepcopy's memo with the denoiser Parameters keeps them out of the copy: they would
    # be replaced right away, and for a CNN they can be as large as the backbone itself.
    memo: dict[int, Any] = {id(p): None for _, layer in layers for p in layer.denoiser_parameters()}
    fused = copy.deepcopy(model, memo)
    with torch.no_grad():
        for name, layer in layers:
            parent_name, _, child = name.rpartition(".")
            setattr(fused.get_submodule(parent_name), child, layer.plain_layer())
    leftover = [name for name, _ in denoising_layers(fused)]
    if leftover:
        raise DenoiseRepError(f"fuse left denoising layers behind: {leftover}; this is a bug")
    return fused


def denoise_loss(model: nn.Module) -> torch.Tensor:
    """The denoising loss: the sum over layers of the noise-prediction losses recorded since the last call.

    Train-mode forwards record a loss only while the denoisers require grad (phases "denoiser" and
    "joint"); several forwards before one call (gradient accumulation) add up. Reading resets the
    accumulators. Label-free. When nothing was recorded, a zero scalar that needs no grad.

    Raises:
        DenoiseRepError: ``model`` was never converted.
    """
    layers = _require_layers(model, "denoise_loss")
    total: torch.Tensor | None = None
    for _, layer in layers:
        loss = layer.pop_loss()
        if loss is not None:
            total = loss if total is None else total + loss.to(total.device)
    if total is None:
        weight = layers[0][1].weight
        return torch.zeros((), device=weight.device, dtype=weight.dtype)
    return total


def set_phase(model: nn.Module, phase: str) -> None:
    """Choose what trains: "denoiser" (only the denoisers), "backbone" (all but them), or "joint".

    Only ``requires_grad`` flips, on every parameter of ``model``; no Parameter is replaced, so an
    optimiser built once serves every phase (frozen parameters get no gradient and are skipped).
    A phase that trains the denoisers first unfolds any folded layer (see :func:`fold`).
    BatchNorm running statistics still update in train mode; put those layers in eval mode if a
    phase must not touch them.

    Raises:
        DenoiseRepError: an unknown phase, or a model that was never converted.
    """
    if phase not in PHASES:
        raise DenoiseRepError(f"unknown phase={phase!r}: use one of {', '.join(map(repr, PHASES))}")
    denoisers = {id(p) for p in denoiser_parameters(model)}
    train_denoisers = phase in ("denoiser", "joint")
    if train_denoisers:
        unfold(model)
    train_backbone = phase in ("backbone", "joint")
    for p in model.parameters():
        p.requires_grad_(train_denoisers if id(p) in denoisers else train_backbone)
    for _, layer in denoising_layers(model):
        layer._fused_cache = None  # a new phase starts from the current D


def fold(model: nn.Module) -> int:
    """Fold every frozen denoiser into its layer's weights for a backbone phase (see :mod:`.folding`).

    The folded model computes the same function with plain layers, so a backbone step costs what a
    plain step does; ``state_dict``, ``fuse``, ``describe`` and ``weight_changes`` read the layers'
    own (W, b) as if unfolded. Layers whose step matrix is too far from the identity stay unfolded.

    Returns:
        How many layers are folded now.

    Raises:
        DenoiseRepError: ``model`` was never converted, or its denoisers train (phase "backbone" first).
    """
    layers = _require_layers(model, "fold")
    folded = sum(layer.fold() for _, layer in layers)
    if folded < len(layers):
        logger.warning(
            "DenoiseRep folded %d of %d layers: the others' step matrices are too far from the "
            "identity (a strong beta_T or a large D); they train unfolded, exactly but slower",
            folded,
            len(layers),
        )
    return folded


def unfold(model: nn.Module) -> None:
    """Undo :func:`fold`: every layer holds its own (W, b) again, recovered in float64.

    Raises:
        DenoiseRepError: ``model`` was never converted.
    """
    for _, layer in _require_layers(model, "unfold"):
        layer.unfold()


def set_loss_rows(model: nn.Module, rows: int | None) -> None:
    """Estimate each layer's denoising loss on at most ``rows`` feature vectors per forward.

    The vectors are drawn uniformly (with replacement) from the layer's tokens or pixels, so the
    estimate is unbiased; None uses them all. Training-time only: nothing of it is saved or fused.

    Raises:
        DenoiseRepError: ``rows`` is not a positive integer or None, or ``model`` was never converted.
    """
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise DenoiseRepError(f"loss rows must be a positive integer or None, got {rows!r}")
    for _, layer in _require_layers(model, "set_loss_rows"):
        layer.loss_rows = rows


def set_fused_refresh(model: nn.Module, forwards: int) -> None:
    """While a layer's own weights are frozen (a denoiser phase), reuse its fused weights for this many
    train forwards before rebuilding them; 1 rebuilds them every forward (the exact definition).

    The forward then sees upstream denoisers at most ``forwards - 1`` optimiser steps old; each
    layer's own loss always uses its current D. Training-time only: nothing of it is saved or fused.

    Raises:
        DenoiseRepError: ``forwards`` is not a positive integer, or ``model`` was never converted.
    """
    if isinstance(forwards, bool) or not isinstance(forwards, int) or forwards < 1:
        raise DenoiseRepError(f"fused refresh must be a positive integer, got {forwards!r}")
    for _, layer in _require_layers(model, "set_fused_refresh"):
        layer.fused_refresh = forwards
        layer._fused_cache = None


def denoiser_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The denoiser parameters (D, d) of every layer, in layer order (for their own param group)."""
    layers = _require_layers(model, "denoiser_parameters")
    return [p for _, layer in layers for p in layer.denoiser_parameters()]


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that is not a denoiser parameter, in ``model.parameters()`` order."""
    denoisers = {id(p) for p in denoiser_parameters(model)}
    return [p for p in model.parameters() if id(p) not in denoisers]


def describe(model: nn.Module) -> dict[str, Any]:
    """The DenoiseRep settings of a converted model as a JSON-able dict (saved in model.json).

    Returns:
        ``{"layers", "schedule", "timesteps", "beta", "conv_side", "num_layers", "weight_change":
        {"mean", "max"}, "per_layer": [{"name", "kind", "t", "weight_change"}, ...]}`` with ``layers``
        the spec name ("predicate:<qualname>" for a callable) and ``weight_change`` the layer's
        ``||W' - W|| / ||W||``: an all-zero column means DenoiseRep changed nothing.

    Raises:
        DenoiseRepError: ``model`` was never converted, or its layers come from different ``convert``
            calls with different settings.
    """
    layers = _require_layers(model, "describe")
    settings = layers[0][1].settings
    for name, layer in layers:
        if layer.settings != settings:
            raise DenoiseRepError(
                f"{name!r} was converted with {layer.settings}, {layers[0][0]!r} with {settings}: "
                "describe each converted submodule separately"
            )
    changes = weight_changes(model)
    return {
        **copy.deepcopy(settings),
        "num_layers": len(layers),
        "weight_change": summarize_changes(changes),
        "per_layer": [
            {
                "name": name,
                "kind": "linear" if isinstance(layer, nn.Linear) else "conv2d",
                "t": layer.step.t,
                "weight_change": changes[name],
            }
            for name, layer in layers
        ],
    }


def weight_changes(model: nn.Module) -> dict[str, float]:
    """``||W' - W|| / ||W||`` of every denoising layer, by qualified name (float64)."""
    return {name: layer.weight_change() for name, layer in _require_layers(model, "weight_changes")}


def summarize_changes(changes: dict[str, float]) -> dict[str, float]:
    """Mean and max of per-layer weight changes, for logs and ``model.json``."""
    values = list(changes.values())
    return {"mean": sum(values) / max(len(values), 1), "max": max(values, default=0.0)}
