"""The evaluation job: embed a labelled dataset with a served model and score it with ``evaluation.metrics``.

The numbers are those of ``reid evaluate-features`` on the same embeddings, because both call the
same functions: :func:`evaluation.metrics.evaluate_features` for query-against-gallery protocols
(``market1501`` and every layout with a query split) and :func:`evaluation.metrics.vehicleid_protocol`
for VehicleID. The embeddings are kept next to the result as feature files (``query.npz`` and
``gallery.npz``, or ``features.npz`` for VehicleID), so ``reid evaluate-features`` can re-derive the
numbers offline.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from evaluation.feature_file import save_feature_file
from evaluation.metrics import EvaluationError, evaluate_features, vehicleid_protocol
from service.db.session import transaction
from service.db.tables import Evaluation, ModelRow
from service.embedder import ModelUnavailableError
from service.evaluation_files import FEATURE_FILES, SAMPLES_NAME, evaluation_dir
from service.imaging.preparation import BatchPreparation, stack
from service.jobs.runner import JobContext, JobFailedError
from service.jobs.sources import (
    DatasetOptionsError,
    DatasetPathForbiddenError,
    DatasetPathInvalidError,
    open_dataset,
    relative_message,
)
from training.data.errors import DatasetError

logger = logging.getLogger(__name__)


def embed_paths(ctx: JobContext, runtime: Any, paths: list[str]) -> tuple[np.ndarray, str]:
    """Embed image files in large prefetched batches; any unreadable image fails the evaluation.

    Returns:
        the (n, dim) features and how JPEGs were decoded: ``"pil"`` (Pillow, as ``reid evaluate``),
        ``"gpu"`` (nvJPEG) or ``"cpu"`` (libjpeg-turbo), the last two resized on the GPU.
    """
    settings = ctx.state.settings
    # On a GPU, JPEGs are decoded and resized there as in ingestion (the setting's road is recorded
    # in the result); on a CPU the pool does everything with Pillow, as `reid evaluate` does.
    preparation = BatchPreparation(ctx.state.decoder, {0: runtime.model}, jpeg_decoder=settings.jpeg_decoder)
    out = np.empty((len(paths), runtime.dim), dtype=np.float32)
    row = 0
    for batch in preparation.batches(
        paths,
        lambda path: preparation.prepare_file(path, path),
        batch_size=settings.ingest_batch_size,
        prefetch=settings.ingest_prefetch_batches,
    ):
        ctx.check()
        bad = [p for p in batch if p.error is not None]
        if bad:
            raise JobFailedError(
                f"{len(bad)} image(s) could not be read, e.g. {bad[0].source}: {bad[0].error}"
            )
        vectors = runtime.batcher.forward(stack([p.tensors[0] for p in batch]))
        out[row : row + len(batch)] = vectors
        row += len(batch)
        ctx.advance(done=len(batch))
    return out, preparation.road


def run_evaluate(ctx: JobContext) -> dict[str, Any]:
    """Job handler for ``evaluate``: foreseeable mistakes fail the job with their message, no trace."""
    try:
        return _evaluate(ctx)
    except (
        DatasetError,
        DatasetOptionsError,
        DatasetPathForbiddenError,
        DatasetPathInvalidError,
        EvaluationError,
        ModelUnavailableError,
    ) as exc:
        raise JobFailedError(relative_message(str(exc), ctx.state.settings.dataset_roots)) from exc


def _evaluate(ctx: JobContext) -> dict[str, Any]:
    settings = ctx.state.settings
    evaluation_id = int(ctx.params["evaluation_id"])
    with ctx.state.sessions() as session:
        evaluation = session.get(Evaluation, evaluation_id)
        if evaluation is None:
            raise JobFailedError(f"evaluation {evaluation_id} no longer exists")
        model_row = session.get(ModelRow, evaluation.model_id)
        assert model_row is not None
        dataset_spec = dict(evaluation.dataset)
        protocol = evaluation.protocol
        rerank = evaluation.rerank
        options = dict(evaluation.options or {})
    runtime = ctx.state.models.get(model_row.name, model_row.version)
    started = time.monotonic()
    # Every image the dataset lists is checked against the roots, as ingestion does.
    dataset = open_dataset(
        dataset_spec["layout"], dataset_spec["root"], dataset_spec.get("options"), settings.dataset_roots
    )

    if protocol == "vehicleid":
        samples = dataset.gallery
        if not samples:
            raise JobFailedError(f"dataset {dataset.name} has no test images for the VehicleID protocol")
        ctx.set_total(len(samples))
        feats, decoding = embed_paths(ctx, runtime, [s.path for s in samples])
        pids = np.array([s.pid for s in samples], dtype=np.int64)
        camids = np.array([s.camid for s in samples], dtype=np.int64)
        is_query = np.zeros(len(samples), dtype=bool)
        result = vehicleid_protocol(
            feats,
            pids,
            camids,
            trials=int(options.get("trials", 10)),
            seed=int(options.get("seed", 0)),
            test_size=options.get("test_size"),
            rerank=rerank,
            ap_mode=options.get("ap_mode", "standard"),
        )
    else:
        query, gallery = dataset.query, dataset.gallery
        if not query or not gallery:
            raise JobFailedError(
                f"dataset {dataset.name} has {len(query)} query and {len(gallery)} gallery images; "
                f"the {protocol} protocol needs both (use protocol 'vehicleid' for VehicleID)"
            )
        samples = query + gallery
        ctx.set_total(len(samples))
        feats, decoding = embed_paths(ctx, runtime, [s.path for s in samples])
        pids = np.array([s.pid for s in samples], dtype=np.int64)
        camids = np.array([s.camid for s in samples], dtype=np.int64)
        is_query = np.zeros(len(samples), dtype=bool)
        is_query[: len(query)] = True
        result = evaluate_features(
            feats[is_query],
            feats[~is_query],
            pids[is_query],
            pids[~is_query],
            camids[is_query],
            camids[~is_query],
            rerank=rerank,
            ap_mode=options.get("ap_mode", "standard"),
            protocol=protocol,
        )
    duration = time.monotonic() - started
    out_dir = evaluation_dir(settings.data_dir, evaluation_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Which image each feature row is (for rank-list views of the evaluation).
    paths = [str(s.path) for s in samples]
    (out_dir / SAMPLES_NAME).write_text(
        json.dumps(
            {
                "query": [p for p, q in zip(paths, is_query, strict=True) if q],
                "gallery": [p for p, q in zip(paths, is_query, strict=True) if not q],
            }
        )
    )
    if protocol == "vehicleid":
        save_feature_file(out_dir / FEATURE_FILES["all"], feats, pids, camids)
    else:
        save_feature_file(out_dir / FEATURE_FILES["query"], feats[is_query], pids[is_query], camids[is_query])
        save_feature_file(
            out_dir / FEATURE_FILES["gallery"], feats[~is_query], pids[~is_query], camids[~is_query]
        )
    result = {
        **result,
        "model": model_row.name,
        "model_version": model_row.version,
        "dataset": dataset.name,
        # Distances are computed exactly by evaluation.metrics (no approximate vector index involved).
        "index_spec": "exact",
        # GPU decoding differs from Pillow by ~0.07/255 per pixel: enough to move a 4th decimal.
        "jpeg_decoding": decoding,
        "num_query": int(is_query.sum()),
        "num_gallery": int((~is_query).sum()),
        "duration_s": round(duration, 3),
    }
    with transaction(ctx.state.sessions) as session:
        row = session.get(Evaluation, evaluation_id)
        if row is not None:
            row.result = _jsonable(result)
            row.duration_s = duration
    logger.info(
        "evaluation %d: mAP %.4f rank-1 %.4f", evaluation_id, result["mAP"], result["cmc"].get("1", 0.0)
    )
    return {"evaluation_id": evaluation_id}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value
