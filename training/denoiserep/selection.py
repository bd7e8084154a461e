"""Which layers of a model a layer spec ("mlp", "linear", "conv" or a predicate) converts.

Layers are returned in module registration order. For timm models (and most PyTorch models) that is
the forward order, which is what the depth timestep schedule needs; a model that registers modules in
another order than it calls them should pass its own predicate and accept that order, or be fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import DenoiseRepError

logger = logging.getLogger(__name__)

LayerPredicate = Callable[[str, nn.Module], bool]
LAYER_SPECS = ("auto", "mlp", "linear", "conv")

# Top-level names timm and torchvision give a classifier (timm: head, head_dist, fc, classifier,
# last_linear). Everything under them counts as the classifier head.
_CLASSIFIER_NAMES = ("head", "head_dist", "fc", "classifier", "last_linear")


@dataclass(frozen=True)
class SelectedLayer:
    """One layer to convert: its qualified name, the module, and the name of the module holding it."""

    name: str
    module: nn.Module
    parent: str


def is_mlp_block(module: nn.Module) -> bool:
    """A transformer MLP block: any class of ``timm.layers.mlp`` or a class named like ``*Mlp*``.

    Classifier heads whose names contain "Mlp" (timm's ``NormMlpClassifierHead``) are not MLP blocks.
    """
    cls = type(module)
    if "Head" in cls.__name__:
        return False
    return cls.__module__ == "timm.layers.mlp" or "Mlp" in cls.__name__ or "MLP" in cls.__name__


def is_convertible(module: nn.Module) -> bool:
    """Whether the layer computes exactly ``F.linear`` / ``nn.Conv2d`` from its weight and bias.

    Subclasses that change the forward (timm's ``Conv2dSame`` pads dynamically, ``StdConv2d``
    standardises its weight) or whose weight is read directly by the parent (the ``out_proj`` of
    ``nn.MultiheadAttention``) would ignore the denoiser, so only the exact classes are converted
    (plus timm's ``Linear``, which only adds a TorchScript cast).
    """
    cls = type(module)
    if cls in (nn.Linear, nn.Conv2d):
        return True
    return cls.__name__ == "Linear" and cls.__module__ == "timm.layers.linear"


def _classifier_ids(model: nn.Module) -> set[int]:
    """Ids of the modules of the classifier that ``model.get_classifier()`` reports (timm models)."""
    ids: set[int] = set()
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        try:
            classifier = get_classifier()
        except (TypeError, AttributeError, NotImplementedError):
            classifier = None
        if isinstance(classifier, nn.Module):
            ids.update(id(m) for m in classifier.modules())
    return ids


def select_layers(
    model: nn.Module,
    layers: str | LayerPredicate,
    *,
    warn_skipped: bool = True,
    keep: Callable[[nn.Module], bool] | None = None,
) -> list[SelectedLayer]:
    """The layers that ``layers`` picks in ``model``, in registration (forward) order.

    Args:
        model: any nn.Module; timm models get their classifier head excluded by the string specs.
        layers: "auto" ("mlp" for a model with transformer MLP blocks, else every Conv2d outside the
            head that is not depthwise), "mlp" (every Linear directly inside an MLP block), "linear"
            (every Linear outside the classifier head), "conv" (every Conv2d outside the classifier
            head), or a predicate on (qualified name, module).
        warn_skipped: log a warning naming the layers a string spec matched but cannot convert.
        keep: a further filter on the modules a string spec picks.

    Raises:
        DenoiseRepError: unknown spec, or a predicate picking a layer that cannot be converted.
    """
    if not callable(layers) and layers not in LAYER_SPECS:
        raise DenoiseRepError(
            f"unknown layers={layers!r}: use one of {', '.join(map(repr, LAYER_SPECS))} "
            "or a callable predicate(name, module) -> bool"
        )
    if layers == "auto":
        if select_layers(model, "mlp", warn_skipped=False):
            return select_layers(model, "mlp", warn_skipped=warn_skipped)
        # A depthwise conv's denoiser is one scale per channel, which the norm after it cancels.
        return select_layers(
            model, "conv", warn_skipped=warn_skipped, keep=lambda m: m.in_channels // m.groups > 1
        )
    classifier = _classifier_ids(model)
    modules = dict(model.named_modules())
    selected: list[SelectedLayer] = []
    skipped: list[str] = []
    for name, module in modules.items():
        if not name:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if callable(layers):
            if not layers(name, module):
                continue
            if not is_convertible(module):
                raise DenoiseRepError(
                    f"the layer predicate picked {name!r} ({type(module).__name__}), which cannot be "
                    "converted: only nn.Linear and nn.Conv2d layers whose forward is the plain linear/conv "
                    "of their weights are supported"
                )
        else:
            if layers == "mlp":
                wanted = isinstance(module, nn.Linear) and is_mlp_block(modules[parent])
            elif layers == "linear":
                wanted = isinstance(module, nn.Linear)
            else:
                wanted = isinstance(module, nn.Conv2d)
            if not wanted or id(module) in classifier or name.split(".", 1)[0] in _CLASSIFIER_NAMES:
                continue
            if keep is not None and not keep(module):
                continue
            if isinstance(modules[parent], nn.MultiheadAttention) or not is_convertible(module):
                skipped.append(f"{name} ({type(module).__name__})")
                continue
        selected.append(SelectedLayer(name, module, parent))
    if skipped and warn_skipped:
        logger.warning(
            "DenoiseRep leaves %d layer(s) unconverted because their forward is not the plain "
            "linear/conv of their weights: %s",
            len(skipped),
            ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""),
        )
    return selected


def nothing_matched_message(model: nn.Module, layers: str | LayerPredicate) -> str:
    """An error message for a spec that matched no layer, suggesting the specs that would match."""
    spec = getattr(layers, "__qualname__", repr(layers)) if callable(layers) else repr(layers)
    alternatives = [
        other
        for other in LAYER_SPECS
        if other not in (layers, "auto") and select_layers(model, other, warn_skipped=False)
    ]
    if alternatives:
        advice = f"use layers={alternatives[0]!r}"
        if alternatives[1:]:
            advice += f" (or {', '.join(map(repr, alternatives[1:]))})"
    else:
        advice = "it has no convertible nn.Linear or nn.Conv2d layer outside the classifier head"
    return f"layers={spec} matched no layer in {type(model).__name__}; {advice}"
