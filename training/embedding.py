"""Embedding labelled samples and evaluating the embeddings with the re-identification protocols.

One path for everything that measures a model: evaluation during training (with the fused model),
``reid evaluate`` (with an exported model through :func:`training.export.load_model`) and the
benchmarks. Unreadable images are dropped from the query/gallery lists and counted, not fatal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from training.data.dataset import ReIDDataset, Sample
from training.data.image_dataset import EvalImageDataset, collate_eval

__all__ = ["PROTOCOLS", "EmbeddedSamples", "embed_samples", "evaluate_embedder", "protocol_for"]

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "market1501", "vehicleid")

EmbedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EmbeddedSamples:
    """Features of the readable samples, in the order given, with their labels.

    Attributes:
        features: (n, d) float32, L2-normalised.
        pids, camids: (n,) int64.
        indices: positions of the embedded samples in the input list.
        skipped: how many samples were unreadable and left out.
    """

    features: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    indices: np.ndarray
    skipped: int


def embed_samples(
    embed: EmbedFn,
    samples: Sequence[Sample],
    transform: Callable[[Any], torch.Tensor],
    *,
    batch_size: int = 128,
    num_workers: int = 0,
    desc: str = "embedding",
) -> EmbeddedSamples:
    """Embeds samples in order with ``embed`` (a preprocessed NCHW batch -> (N, d) features).

    Args:
        embed: e.g. ``LoadedModel.embed`` or an eval model's forward under ``inference_mode``.
        samples: the images to embed.
        transform: the test-time transform (PIL image -> CHW tensor).
        batch_size, num_workers: DataLoader settings (decoding runs in the workers).
        desc: progress-bar label.
    """
    loader = DataLoader(
        EvalImageDataset(samples, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_eval,
    )
    chunks: list[np.ndarray] = []
    kept: list[int] = []
    skipped = 0
    for batch, indices, dropped in tqdm(loader, desc=desc, unit="batch", disable=None, leave=False):
        skipped += dropped
        if batch is None:
            continue
        feats = embed(batch)
        chunks.append(feats.detach().float().cpu().numpy())
        kept.extend(indices)
    if skipped:
        log.warning("%s: %d of %d images were unreadable and left out", desc, skipped, len(samples))
    if not chunks:
        raise ValueError(f"{desc}: none of the {len(samples)} images could be embedded")
    index = np.asarray(kept, dtype=np.int64)
    return EmbeddedSamples(
        features=np.concatenate(chunks).astype(np.float32, copy=False),
        pids=np.asarray([samples[i].pid for i in kept], dtype=np.int64),
        camids=np.asarray([samples[i].camid for i in kept], dtype=np.int64),
        indices=index,
        skipped=skipped,
    )


def protocol_for(dataset: ReIDDataset, requested: str = "auto") -> str:
    """The evaluation protocol: VehicleID's for datasets without a query split, else Market-1501's."""
    if requested not in PROTOCOLS:
        raise ValueError(f"unknown protocol {requested!r}: choose one of {', '.join(PROTOCOLS)}")
    if requested != "auto":
        return requested
    return "vehicleid" if not dataset.query else "market1501"


def evaluate_embedder(
    embed: EmbedFn,
    dataset: ReIDDataset,
    transform: Callable[[Any], torch.Tensor],
    *,
    protocol: str = "auto",
    metric: str = "cosine",
    rerank: bool = False,
    test_size: int | None = None,
    trials: int = 10,
    seed: int = 0,
    batch_size: int = 128,
    num_workers: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Embeds a dataset's test split(s) and evaluates them; returns the ``evaluation.metrics`` JSON.

    Market-1501 rule: the query split against the gallery split. VehicleID protocol: the gallery
    split (the whole test list) with random single-image galleries repeated ``trials`` times; when
    the dataset also has a query split (e.g. evaluating VeRi-776 with this protocol) the two are
    pooled. The result gains ``skipped_images`` (unreadable images left out).

    Raises:
        evaluation.metrics.EvaluationError: nothing valid to evaluate.
    """
    from evaluation.metrics import evaluate_features, vehicleid_protocol

    chosen = protocol_for(dataset, protocol)
    if chosen == "market1501":
        if not dataset.query:
            raise ValueError(
                f"dataset {dataset.name} has no query split, so the Market-1501 rule does not apply; "
                "use --protocol vehicleid"
            )
        q = embed_samples(
            embed, dataset.query, transform, batch_size=batch_size, num_workers=num_workers, desc="query"
        )
        g = embed_samples(
            embed, dataset.gallery, transform, batch_size=batch_size, num_workers=num_workers, desc="gallery"
        )
        result = evaluate_features(
            q.features,
            g.features,
            q.pids,
            g.pids,
            q.camids,
            g.camids,
            metric=metric,
            rerank=rerank,
            device=device,
            protocol="market1501",
        )
        skipped = q.skipped + g.skipped
    else:
        samples = [*dataset.query, *dataset.gallery]
        e = embed_samples(
            embed, samples, transform, batch_size=batch_size, num_workers=num_workers, desc="test set"
        )
        result = vehicleid_protocol(
            e.features,
            e.pids,
            e.camids,
            trials=trials,
            seed=seed,
            test_size=test_size,
            metric=metric,
            rerank=rerank,
            device=device,
        )
        skipped = e.skipped
    result["skipped_images"] = skipped
    return result
