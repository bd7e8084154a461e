"""Jobs: ``POST /v1/galleries/{id}/ingest-jobs``, ``/v1/jobs`` (progress, cancel, errors)."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from service.api import idempotency
from service.api.deps import MAX_INT_ID, DbSession, GalleryId, JobId, Scope, State, authorize
from service.api.pagination import cursor_after, page_of, page_query
from service.api.schemas import (
    IngestCreate,
    JobErrorOut,
    JobOut,
    Page,
    SortOrder,
)
from service.db.session import transaction
from service.db.tables import Gallery, Job, JobError, utcnow
from service.http.limits import check_job_images
from service.http.problems import PROBLEM_RESPONSES, Problem, not_found, problem_responses
from service.jobs.sources import (
    DatasetOptionsError,
    DatasetPathForbiddenError,
    DatasetPathInvalidError,
    count_dataset_images,
    relative_message,
)
from service.state import ServiceState

router = APIRouter(prefix="/v1", tags=["jobs"], responses=PROBLEM_RESPONSES)

Read = Depends(authorize(Scope.READ))
Write = Depends(authorize(Scope.WRITE))


def job_out(job: Job) -> JobOut:
    rate = eta = None
    if job.status == "running" and job.started_at is not None:
        elapsed = (utcnow() - job.started_at).total_seconds()
        if elapsed > 0 and job.done:
            rate = job.done / elapsed
            if job.total is not None:
                eta = max(0.0, (job.total - job.done - job.failed) / rate)
    elif job.status == "succeeded" and job.started_at and job.finished_at:
        elapsed = (job.finished_at - job.started_at).total_seconds()
        rate = job.done / elapsed if elapsed > 0 else None
        eta = 0.0
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=job.status,
        gallery_id=job.gallery_id,
        done=job.done,
        total=job.total,
        failed=job.failed,
        skipped=job.skipped,
        rate=rate,
        eta_s=eta,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        error=job.error,
        params=job.params or {},
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        errors_url=f"/v1/jobs/{job.id}/errors",
    )


def check_dataset(
    state: ServiceState, layout: str, root: str, options: dict[str, Any] | None, splits: tuple[str, ...]
) -> int:
    """Answer 403/422 at once for a dataset a job would refuse later; returns its image count.

    Messages name paths as the client gave them or relative to a dataset root, never in full.
    """
    from training.data.errors import DatasetError

    roots = state.settings.dataset_roots
    refusals = {
        DatasetPathForbiddenError: (403, "Dataset path not allowed", "dataset-path-forbidden"),
        DatasetPathInvalidError: (422, "Dataset path not found", "dataset-path-invalid"),
        DatasetOptionsError: (422, "Invalid dataset options", "dataset-options-invalid"),
        DatasetError: (422, "Dataset cannot be read", "dataset-invalid"),
    }
    try:
        return count_dataset_images(layout, root, options or {}, splits, roots)
    except tuple(refusals) as exc:
        status, title, slug = next(v for cls, v in refusals.items() if isinstance(exc, cls))
        raise Problem(status, title, relative_message(str(exc), roots), slug=slug) from exc
    except (ValueError, OSError, RuntimeError) as exc:
        # What resolving a client's path can raise: a NUL byte, a name too long, a symbolic-link
        # loop. The client's mistake, not the server's; the OS message is not echoed.
        raise Problem(
            422,
            "Invalid dataset path",
            f"dataset path {root[:200]!r} cannot be resolved on the server ({type(exc).__name__})",
            slug="dataset-path-invalid",
        ) from exc


def check_layout(layout: str) -> None:
    from training.data.errors import UnknownDatasetError
    from training.data.registry import dataset_kind

    try:
        dataset_kind(layout)
    except UnknownDatasetError as exc:
        raise Problem(422, "Unknown dataset layout", str(exc), slug="unknown-layout") from exc


def accepted(body: dict[str, Any], location: str) -> JSONResponse:
    return JSONResponse(body, status_code=202, headers={"Location": location})


def create_job_idempotently(
    state: ServiceState,
    *,
    key: idempotency.Claim | None,
    scope: str,
    request_hash: str,
    build: Any,
) -> JSONResponse:
    """Run ``build(session) -> (body, location)`` in one transaction with the idempotency record.

    A concurrent request with the same key loses the unique-constraint race and replays the winner.
    """
    for _ in range(2):
        try:
            with transaction(state.sessions) as session:
                if key is not None:
                    stored = idempotency.lookup(session, key, scope, request_hash)
                    if stored is not None:
                        return JSONResponse(
                            stored.body,
                            status_code=stored.status_code,
                            headers={"Location": stored.location} if stored.location else None,
                        )
                body, location = build(session)
                if key is not None:
                    idempotency.remember(session, key, scope, request_hash, 202, body, location)
        except IntegrityError:
            if key is None:
                raise
            continue
        if state.jobs is not None:
            state.jobs.wake()
        return accepted(body, location)
    raise Problem(
        409,
        "Conflicting request",
        "A request with this Idempotency-Key is in progress; retry.",
        slug="idempotency-conflict",
    )


@router.post(
    "/galleries/{gallery_id}/ingest-jobs",
    status_code=202,
    summary="Ingest a server-side dataset folder into the gallery",
    response_model=JobOut,
    dependencies=[Write],
    responses={
        202: {"headers": {"Location": {"description": "/v1/jobs/{job_id}"}}},
        **problem_responses(403),
    },
)
async def create_ingest_job(
    gallery_id: GalleryId,
    body: IngestCreate,
    state: State,
    key: Annotated[idempotency.Claim | None, Depends(idempotency.claim)] = None,
) -> Any:
    check_layout(body.source.layout)
    source = body.source
    count = await anyio.to_thread.run_sync(
        check_dataset, state, source.layout, source.root, source.options, (source.split,)
    )
    check_job_images(count, state.settings.max_job_images, "ingestion source", "REID_MAX_JOB_IMAGES")
    params = {"source": body.source.model_dump()}

    def build(session: Any) -> tuple[dict[str, Any], str]:
        if session.get(Gallery, gallery_id) is None:
            raise not_found("Gallery", gallery_id)
        job = Job(kind="ingest", status="queued", gallery_id=gallery_id, params=params)
        session.add(job)
        session.flush()
        session.refresh(job)
        return job_out(job).model_dump(mode="json"), f"/v1/jobs/{job.id}"

    return await anyio.to_thread.run_sync(
        lambda: create_job_idempotently(
            state,
            key=key,
            scope=f"POST /v1/galleries/{gallery_id}/ingest-jobs",
            request_hash=idempotency.fingerprint(params),
            build=build,
        )
    )


@router.get("/jobs", summary="List jobs", dependencies=[Read])
def list_jobs(
    session: DbSession,
    gallery_id: Annotated[int | None, Query(ge=1, le=MAX_INT_ID)] = None,
    kind: str | None = None,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
    order: Annotated[SortOrder, Query(description="By id: asc, oldest first; desc, newest first.")] = "asc",
) -> Page[JobOut]:
    stmt = select(Job)
    if gallery_id is not None:
        stmt = stmt.where(Job.gallery_id == gallery_id)
    if kind is not None:
        stmt = stmt.where(Job.kind == kind)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    rows = session.scalars(page_query(stmt, Job.id, cursor_after(cursor), limit, order)).all()
    return page_of(rows, limit, JobOut, job_out)


@router.get("/jobs/{job_id}", summary="A job's status and progress", dependencies=[Read])
def get_job(job_id: JobId, session: DbSession) -> JobOut:
    job = session.get(Job, job_id)
    if job is None:
        raise not_found("Job", job_id)
    return job_out(job)


@router.post("/jobs/{job_id}/cancel", status_code=202, summary="Cancel a job", dependencies=[Write])
def cancel_job(job_id: JobId, state: State) -> JobOut:
    if state.jobs is None:
        raise Problem(503, "Jobs unavailable", "The job runner is not running.", slug="not-ready")
    try:
        state.jobs.cancel(job_id)
    except KeyError as exc:
        raise not_found("Job", job_id) from exc
    with state.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job_out(job)


@router.get("/jobs/{job_id}/errors", summary="Inputs a job could not process", dependencies=[Read])
def job_errors(
    job_id: JobId,
    session: DbSession,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> Page[JobErrorOut]:
    if session.get(Job, job_id) is None:
        raise not_found("Job", job_id)
    stmt = select(JobError).where(JobError.job_id == job_id)
    rows = session.scalars(page_query(stmt, JobError.id, cursor_after(cursor), limit)).all()
    return page_of(
        rows,
        limit,
        JobErrorOut,
        lambda r: JobErrorOut(id=r.id, source=r.source, error=r.error, created_at=r.created_at),
    )
