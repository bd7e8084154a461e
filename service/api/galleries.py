"""``/v1/galleries``: create, list, describe, delete; model upgrade (re-embed, switch, drop standby)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, BackgroundTasks, Depends, Query, Response
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import image_release
from service.api.deps import DbSession, GalleryId, Scope, State, authorize
from service.api.jobs import accepted, job_out
from service.api.pagination import cursor_after, page_of, page_query
from service.api.schemas import (
    GalleryCreate,
    GalleryOut,
    JobOut,
    Page,
    ReembedCreate,
    SnapshotOut,
    StandbyOut,
    SwitchModel,
)
from service.db.session import transaction
from service.db.tables import Gallery, IndexSnapshot, Item, Job
from service.embedder import ModelRuntime, ModelUnavailableError
from service.http.problems import PROBLEM_RESPONSES, Problem, not_found
from service.item_writer import GalleryGoneError, StandbyNotReadyError
from service.state import ServiceState

router = APIRouter(prefix="/v1/galleries", tags=["galleries"], responses=PROBLEM_RESPONSES)

Read = Depends(authorize(Scope.READ))
Admin = Depends(authorize(Scope.ADMIN))


def resolve_model(state: ServiceState, name: str, version: str | None) -> ModelRuntime:
    try:
        return state.models.get(name, version)
    except ModelUnavailableError as exc:
        raise Problem(422, "Unknown model", str(exc), slug="unknown-model") from exc


def gallery_out(state: ServiceState, session: Session, gallery: Gallery) -> GalleryOut:
    count = session.scalar(
        select(func.count()).select_from(Item).where(Item.gallery_id == gallery.id, Item.status == "active")
    )
    snap = session.scalar(
        select(IndexSnapshot)
        .where(IndexSnapshot.gallery_id == gallery.id, IndexSnapshot.model_id == gallery.model_id)
        .order_by(IndexSnapshot.id.desc())
        .limit(1)
    )
    size = None
    backend = state.indexes.backend_for(gallery.index_spec)
    if state.indexes.has(gallery.id, gallery.model_id):
        gi = state.indexes.gallery(gallery.id).indexes[gallery.model_id]
        # The loaded index says which backend it is (a snapshot may hold another backend's index).
        size, backend = len(gi), getattr(gi.index, "backend", backend)
    standby = None
    if gallery.standby_model is not None:
        standby = StandbyOut(
            model=gallery.standby_model.name,
            model_version=gallery.standby_model.version,
            ready=gallery.standby_ready,
        )
    return GalleryOut(
        id=gallery.id,
        name=gallery.name,
        model=gallery.model.name,
        model_version=gallery.model.version,
        kind=gallery.model.kind,
        dim=gallery.model.dim,
        count=int(count or 0),
        index={"backend": backend, "spec": gallery.index_spec, "size": size},
        last_snapshot=SnapshotOut(last_seq=snap.last_seq, count=snap.count, created_at=snap.created_at)
        if snap
        else None,
        standby=standby,
        created_at=gallery.created_at,
    )


def get_gallery_or_404(session: Session, gallery_id: int) -> Gallery:
    gallery = session.get(Gallery, gallery_id)
    if gallery is None:
        raise not_found("Gallery", gallery_id)
    return gallery


@router.post(
    "",
    status_code=201,
    summary="Create a gallery bound to a model version",
    dependencies=[Admin],
    responses={201: {"headers": {"Location": {"description": "/v1/galleries/{id}"}}}},
)
def create_gallery(body: GalleryCreate, state: State) -> JSONResponse:
    runtime = resolve_model(state, body.model, body.version)
    spec = body.index_spec or state.settings.index_spec
    try:
        with transaction(state.sessions) as session:
            gallery = Gallery(name=body.name, model_id=runtime.row_id, index_spec=spec)
            session.add(gallery)
            session.flush()
            gallery_id = gallery.id
    except IntegrityError as exc:
        raise Problem(
            409, "Gallery exists", f"A gallery named {body.name!r} already exists.", slug="gallery-exists"
        ) from exc
    try:
        state.indexes.create_empty(gallery_id, runtime.row_id, runtime.dim, spec)
    except Exception as exc:
        with transaction(state.sessions) as session:
            row = session.get(Gallery, gallery_id)
            if row is not None:
                session.delete(row)
        state.indexes.drop_gallery(gallery_id)
        raise Problem(
            422,
            "Invalid index spec",
            f"Index spec {spec!r} cannot be built: {exc}",
            slug="invalid-index-spec",
        ) from exc
    with state.sessions() as session:
        out = gallery_out(state, session, get_gallery_or_404(session, gallery_id))
    return JSONResponse(
        out.model_dump(mode="json"), status_code=201, headers={"Location": f"/v1/galleries/{gallery_id}"}
    )


@router.get("", summary="List galleries", dependencies=[Read])
def list_galleries(
    state: State,
    session: DbSession,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> Page[GalleryOut]:
    after = cursor_after(cursor)
    rows = session.scalars(page_query(select(Gallery), Gallery.id, after, limit)).unique().all()
    return page_of(rows, limit, GalleryOut, lambda g: gallery_out(state, session, g))


@router.get("/{gallery_id}", summary="Describe a gallery", dependencies=[Read])
def get_gallery(gallery_id: GalleryId, state: State, session: DbSession) -> GalleryOut:
    return gallery_out(state, session, get_gallery_or_404(session, gallery_id))


@router.delete(
    "/{gallery_id}", status_code=204, summary="Delete a gallery and its items", dependencies=[Admin]
)
def delete_gallery(gallery_id: GalleryId, state: State, background: BackgroundTasks) -> Response:
    with state.sessions() as session:
        get_gallery_or_404(session, gallery_id)
        contents = image_release.contents_of(session, gallery_id=gallery_id)
        active_jobs = session.scalars(
            select(Job.id).where(Job.gallery_id == gallery_id, Job.status.in_(("queued", "running")))
        ).all()
    if state.jobs is not None:
        for job_id in active_jobs:
            state.jobs.cancel(job_id)
    try:
        lock = state.indexes.gallery(gallery_id).write_lock
    except KeyError:
        lock = None
    if lock is not None:
        lock.acquire()
    try:
        with transaction(state.sessions) as session:
            gallery = session.get(Gallery, gallery_id)
            if gallery is not None:
                session.delete(gallery)
        state.indexes.drop_gallery(gallery_id)
    finally:
        if lock is not None:
            lock.release()
    # After the answer: a large gallery has many contents to check (the hourly sweep is the backstop).
    background.add_task(image_release.release_quietly, state.sessions, state.images, contents)
    return Response(status_code=204, background=background)


@router.post(
    "/{gallery_id}/reembed-jobs",
    status_code=202,
    response_model=JobOut,
    dependencies=[Admin],
    summary="Re-embed the gallery with another model version into a new index beside the live one",
)
async def create_reembed_job(gallery_id: GalleryId, body: ReembedCreate, state: State) -> Any:
    runtime = resolve_model(state, body.model, body.version)

    def create() -> JSONResponse:
        with transaction(state.sessions) as session:
            gallery = get_gallery_or_404(session, gallery_id)
            if gallery.model_id == runtime.row_id:
                raise Problem(
                    409, "Same model version", f"The gallery already uses {runtime.key}.", slug="same-model"
                )
            if gallery.model.kind != runtime.kind:
                raise Problem(
                    422,
                    "Wrong model kind",
                    f"The gallery holds {gallery.model.kind} images; "
                    f"{runtime.key} is a {runtime.kind} model.",
                    slug="wrong-model-kind",
                )
            running = session.scalar(
                select(Job.id).where(
                    Job.gallery_id == gallery_id, Job.kind == "reembed", Job.status.in_(("queued", "running"))
                )
            )
            if running is not None:
                raise Problem(
                    409,
                    "Re-embed in progress",
                    f"Job {running} is already re-embedding this gallery.",
                    slug="reembed-in-progress",
                )
            job = Job(
                kind="reembed",
                status="queued",
                gallery_id=gallery_id,
                params={
                    "model_id": runtime.row_id,
                    "model": runtime.name,
                    "version": runtime.version,
                    "switch": body.switch,
                },
            )
            session.add(job)
            session.flush()
            session.refresh(job)
            out = job_out(job).model_dump(mode="json")
        if state.jobs is not None:
            state.jobs.wake()
        return accepted(out, f"/v1/jobs/{out['id']}")

    return await anyio.to_thread.run_sync(create)


@router.post(
    "/{gallery_id}/switch-model",
    summary="Swap the active and the standby model (atomic)",
    dependencies=[Admin],
)
def switch_model(gallery_id: GalleryId, state: State, body: SwitchModel | None = None) -> GalleryOut:
    with state.sessions() as session:
        gallery = get_gallery_or_404(session, gallery_id)
        if (
            body
            and body.version
            and (gallery.standby_model is None or gallery.standby_model.version != body.version)
        ):
            raise Problem(
                409,
                "Unexpected standby",
                f"The gallery's standby model is not version {body.version}.",
                slug="unexpected-standby",
            )
    try:
        state.writer.switch_model(gallery_id)
    except StandbyNotReadyError as exc:
        raise Problem(409, "No standby index", str(exc), slug="standby-not-ready") from exc
    except GalleryGoneError as exc:
        raise not_found("Gallery", gallery_id) from exc
    with state.sessions() as session:
        return gallery_out(state, session, get_gallery_or_404(session, gallery_id))


@router.delete(
    "/{gallery_id}/standby",
    status_code=204,
    summary="Drop the standby model and its index",
    dependencies=[Admin],
)
def drop_standby(gallery_id: GalleryId, state: State) -> Response:
    with state.sessions() as session:
        get_gallery_or_404(session, gallery_id)
        busy = session.scalar(
            select(Job.id).where(
                Job.gallery_id == gallery_id, Job.kind == "reembed", Job.status.in_(("queued", "running"))
            )
        )
    if busy is not None:
        raise Problem(409, "Re-embed in progress", f"Cancel job {busy} first.", slug="reembed-in-progress")
    try:
        state.writer.drop_standby(gallery_id)
    except GalleryGoneError as exc:
        raise not_found("Gallery", gallery_id) from exc
    return Response(status_code=204)
