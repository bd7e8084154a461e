"""The re-embed job: build a gallery's index for another model version beside the live one.

The target becomes the gallery's *standby* model first, so items added while the job runs are
embedded by both models. The job then embeds every active item that lacks a target embedding
(uploads from the image store, ingested files where they lie), committing each batch. When none is
left the standby is marked ready and, unless told otherwise, switched in atomically; the old model
stays as standby so the switch can be undone (``POST /v1/galleries/{id}/switch-model``).
Resuming after a crash continues where the stored embeddings end.
"""

from __future__ import annotations

import logging

from sqlalchemy import func, select

from service.db.tables import Embedding, Item
from service.imaging.preparation import BatchPreparation, Prepared, stack
from service.item_writer import GalleryGoneError, missing_items
from service.jobs.runner import JobContext, JobFailedError

logger = logging.getLogger(__name__)


def run_reembed(ctx: JobContext) -> dict[str, object]:
    """Job handler for ``reembed``."""
    state = ctx.state
    gallery_id = ctx.gallery_id
    if gallery_id is None:
        raise JobFailedError("the gallery of this job was deleted")
    model_id = int(ctx.params["model_id"])
    runtime = state.models.by_row(model_id)
    if runtime is None:
        raise JobFailedError(f"model id {model_id} is not loaded by this service; start it with that model")
    try:
        state.writer.bind_standby(gallery_id, model_id, runtime.dim)
    except GalleryGoneError as exc:
        raise JobFailedError(str(exc)) from exc

    with state.sessions() as session:
        have = (
            session.scalar(
                select(func.count())
                .select_from(Item)
                .join(Embedding, (Embedding.item_id == Item.id) & (Embedding.model_id == model_id))
                .where(Item.gallery_id == gallery_id, Item.status == "active")
            )
            or 0
        )
        todo = (
            session.scalar(
                select(func.count()).select_from(
                    missing_items(gallery_id, model_id, after_id=-1, limit=10**12).subquery()
                )
            )
            or 0
        )
    ctx.set_total(int(have) + int(todo))
    ctx.advance(skipped=int(have), done=int(have))

    settings = state.settings
    models = {model_id: runtime.model}
    preparation = BatchPreparation(state.decoder, models, jpeg_decoder=settings.jpeg_decoder)

    def prepare(item: Item) -> Prepared[Item]:
        return preparation.prepare_file(
            item, state.images.source_of(item.content_hash, item.image_format, item.source_path)
        )

    failed_ids: set[int] = set()
    after_id = -1
    while True:
        with state.sessions() as session:
            items = session.scalars(
                missing_items(
                    gallery_id,
                    model_id,
                    after_id=after_id,
                    limit=settings.ingest_batch_size * 8,
                    exclude=failed_ids,
                )
            ).all()
        if not items:
            if after_id == -1:
                break  # a whole pass found nothing left to embed
            # Another pass catches items committed behind this one (added just before the standby
            # was bound); it ends at once when there are none.
            after_id = -1
            continue
        after_id = items[-1].id
        for batch in preparation.batches(
            items, prepare, batch_size=settings.ingest_batch_size, prefetch=settings.ingest_prefetch_batches
        ):
            ctx.check()
            good = [p for p in batch if p.error is None]
            bad = [p for p in batch if p.error is not None]
            failed_ids.update(p.source.id for p in bad)
            ctx.record_errors([(f"item {p.source.id}", p.error or "") for p in bad])
            stored = 0
            if good:
                vectors = runtime.batcher.forward(stack([p.tensors[model_id] for p in good]))
                try:
                    stored = state.writer.add_embeddings(
                        gallery_id, model_id, [p.source.id for p in good], vectors
                    )
                except GalleryGoneError as exc:
                    raise JobFailedError("the gallery was deleted while the job ran") from exc
            ctx.advance(done=stored, failed=len(bad))

    if failed_ids:
        raise JobFailedError(
            f"{len(failed_ids)} item(s) could not be re-embedded (see the job's errors); the gallery keeps "
            "serving its current model. Delete those items or restore their files, then run the job again"
        )
    if not state.writer.mark_standby_ready(gallery_id, model_id):
        raise JobFailedError("the gallery's standby model changed while the job ran; run the job again")
    switched = False
    if ctx.params.get("switch", True):
        state.writer.switch_model(gallery_id)
        switched = True
    logger.info(
        "re-embed job %d: gallery %d ready on model %d (switched: %s)",
        ctx.job_id,
        gallery_id,
        model_id,
        switched,
    )
    return {"switched": switched}
