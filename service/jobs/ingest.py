"""The ingestion job: embed a server-side dataset folder into a gallery, resumably.

Images whose content (SHA-256) the gallery already holds are skipped, so running a job twice, or
resuming one after a crash, stores each image once; so are images of deleted items, which a
re-run must not bring back (uploading the image again is how to re-add it deliberately).
Unreadable images are recorded as job errors and counted as failed; the job goes on. Each batch is
committed (items, embeddings, log) before the next one starts, so a crash loses at most the batch
in flight, which the resumed job redoes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from sqlalchemy import select

from service.db.tables import Item
from service.imaging.preparation import BatchPreparation, Prepared, stack
from service.item_writer import GalleryGoneError, GalleryModelsChangedError, NewItem, gallery_model_ids
from service.jobs.runner import JobContext, JobFailedError
from service.jobs.sources import (
    DatasetOptionsError,
    DatasetPathForbiddenError,
    DatasetPathInvalidError,
    SourceImage,
    inside_roots,
    load_source_images,
    relative_message,
)
from training.data.errors import DatasetError

logger = logging.getLogger(__name__)


def known_hashes(ctx: JobContext, gallery_id: int) -> set[str]:
    """Contents the gallery has seen, deleted ones included: a deleted image is not ingested again."""
    with ctx.state.sessions() as session:
        return set(session.scalars(select(Item.content_hash).where(Item.gallery_id == gallery_id)))


def current_models(ctx: JobContext, gallery_id: int) -> set[int]:
    with ctx.state.sessions() as session:
        return gallery_model_ids(session, gallery_id)


def embed_batch(ctx: JobContext, prepared: list[Prepared], model_ids: set[int]) -> dict[int, np.ndarray]:
    """Embed prepared images with each model (preprocessing any model the pool did not know about)."""
    vectors: dict[int, np.ndarray] = {}
    for model_id in sorted(model_ids):
        runtime = ctx.state.models.by_row(model_id)
        if runtime is None:
            raise JobFailedError(
                f"the gallery needs model id {model_id}, which this service does not load: "
                "start it with that model (--model NAME=DIR)"
            )
        max_pixels = ctx.state.settings.max_image_pixels
        tensors = [p.tensor_for(model_id, runtime.model.preprocess, max_pixels) for p in prepared]
        vectors[model_id] = runtime.batcher.forward(stack(tensors))
    return vectors


def run_ingest(ctx: JobContext) -> dict[str, object]:
    """Job handler for ``ingest``."""
    settings = ctx.state.settings
    gallery_id = ctx.gallery_id
    if gallery_id is None:
        raise JobFailedError("the gallery of this job was deleted")
    try:
        images = load_source_images(ctx.params["source"], settings.dataset_roots)
    except (DatasetError, DatasetOptionsError, DatasetPathForbiddenError, DatasetPathInvalidError) as exc:
        raise JobFailedError(relative_message(str(exc), settings.dataset_roots)) from exc
    ctx.set_total(len(images))
    known = known_hashes(ctx, gallery_id)
    try:
        model_ids = current_models(ctx, gallery_id)
    except GalleryGoneError as exc:
        raise JobFailedError(str(exc)) from exc
    loaded = {}
    for model_id in model_ids:
        runtime = ctx.state.models.by_row(model_id)
        if runtime is not None:
            loaded[model_id] = runtime.model
    # On a GPU, JPEGs are decoded and resized there (nvJPEG, or libjpeg-turbo pixels + GPU resize),
    # a batch ahead of the model; elsewhere the pool does everything with Pillow, as evaluation does.
    preparation = BatchPreparation(ctx.state.decoder, loaded, jpeg_decoder=settings.jpeg_decoder)

    def prepare(source: SourceImage) -> Prepared[SourceImage]:
        if not inside_roots(source.path, settings.dataset_roots):
            return Prepared(source, error="the image lies outside the allowed dataset roots (symbolic link?)")
        return preparation.prepare_file(source, source.path, is_known=known.__contains__)

    started = time.monotonic()
    stored = 0
    batches = preparation.batches(
        images, prepare, batch_size=settings.ingest_batch_size, prefetch=settings.ingest_prefetch_batches
    )
    # One writer thread commits batch i while the model embeds batch i+1 (at most one write in
    # flight, in order), so the database's time hides behind the model's.
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"reid-ingest-{ctx.job_id}")
    pending: Future[int] | None = None
    try:
        for batch in batches:
            ctx.check()
            ready: list[Prepared[SourceImage]] = []
            errors: list[tuple[str, str]] = []
            skipped = 0
            batch_hashes: set[str] = set()
            for p in batch:
                if p.error is not None:
                    errors.append((p.source.path, p.error))
                elif p.skipped or p.content_hash in known or p.content_hash in batch_hashes:
                    skipped += 1  # stored before (or twice in this folder): nothing to do
                else:
                    assert p.content_hash is not None
                    batch_hashes.add(p.content_hash)
                    ready.append(p)
            model_ids = current_models(ctx, gallery_id)
            vectors = embed_batch(ctx, ready, model_ids) if ready else {}
            if pending is not None:
                stored += pending.result()
            pending = writer.submit(_commit, ctx, gallery_id, ready, vectors, errors, len(batch), skipped)
            known.update(batch_hashes)
            if settings.ingest_batch_pause_s:
                time.sleep(settings.ingest_batch_pause_s)
        if pending is not None:
            stored += pending.result()
            pending = None
    except GalleryGoneError as exc:
        raise JobFailedError("the gallery was deleted while the job ran") from exc
    finally:
        if pending is not None:  # stopping: let the write in flight finish, so its items count
            with contextlib.suppress(Exception):
                pending.result()
        writer.shutdown(wait=True)
    ctx.flush(force=True)
    elapsed = time.monotonic() - started
    logger.info(
        "ingest job %d: %d stored, %d skipped, %d failed in %.1f s",
        ctx.job_id,
        stored,
        ctx.skipped,
        ctx.failed,
        elapsed,
    )
    return {"stored": stored, "seconds": round(elapsed, 3)}


def _commit(
    ctx: JobContext,
    gallery_id: int,
    ready: list[Prepared[SourceImage]],
    vectors: dict[int, np.ndarray],
    errors: list[tuple[str, str]],
    size: int,
    skipped: int,
) -> int:
    """Commit one batch's items, then its errors and progress (the writer thread's work)."""
    stored = _store(ctx, gallery_id, ready, vectors) if ready else 0
    ctx.record_errors(errors)
    ctx.advance(done=size - len(errors), failed=len(errors), skipped=skipped)
    return stored


def _store(
    ctx: JobContext, gallery_id: int, ready: list[Prepared[SourceImage]], vectors: dict[int, np.ndarray]
) -> int:
    new_items = [
        NewItem(
            content_hash=p.content_hash or "",
            image_format=p.image_format,
            width=p.width,
            height=p.height,
            identity=p.source.identity,
            camera=p.source.camera,
            captured_at=p.source.captured_at,
            source_path=p.source.path,
        )
        for p in ready
    ]
    for _attempt in range(3):
        try:
            ctx.state.writer.add(gallery_id, new_items, vectors, job_id=ctx.job_id)
            return len(new_items)
        except GalleryModelsChangedError as exc:
            # An upgrade started or switched after this batch was embedded: embed with its models too.
            vectors = {**vectors, **embed_batch(ctx, ready, exc.required - set(vectors))}
    raise JobFailedError("the gallery's models kept changing while the job ran; run the job again")
