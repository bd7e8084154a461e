"""``/v1/evaluations``: evaluate a served model on a labelled dataset (a job); results stored and listed."""

from __future__ import annotations

from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from service.api import idempotency
from service.api.deps import DbSession, EvaluationId, Scope, State, authorize
from service.api.galleries import resolve_model
from service.api.jobs import check_dataset, check_layout, create_job_idempotently
from service.api.pagination import cursor_after, page_of, page_query
from service.api.schemas import EvaluationCreate, EvaluationOut, Page
from service.db.tables import Evaluation, Job, ModelRow
from service.http.limits import check_job_images
from service.http.problems import PROBLEM_RESPONSES, not_found

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"], responses=PROBLEM_RESPONSES)


def evaluation_out(ev: Evaluation) -> EvaluationOut:
    return EvaluationOut(
        id=ev.id,
        status=ev.job.status,
        job_id=ev.job_id,
        model=ev.model.name,
        model_version=ev.model.version,
        protocol=ev.protocol,
        dataset=ev.dataset,
        rerank=ev.rerank,
        options=ev.options or {},
        result=ev.result,
        duration_s=ev.duration_s,
        error=ev.job.error,
        created_at=ev.created_at,
    )


@router.post(
    "",
    status_code=202,
    response_model=EvaluationOut,
    summary="Evaluate a model on a dataset (Market-1501 or VehicleID protocol)",
    dependencies=[Depends(authorize(Scope.WRITE))],
    responses={202: {"headers": {"Location": {"description": "/v1/evaluations/{id}"}}}},
)
async def create_evaluation(
    body: EvaluationCreate,
    state: State,
    key: Annotated[idempotency.Claim | None, Depends(idempotency.claim)] = None,
) -> Any:
    runtime = resolve_model(state, body.model, body.version)
    check_layout(body.dataset.layout)
    protocol = body.protocol or ("vehicleid" if body.dataset.layout.lower() == "vehicleid" else "market1501")
    count = await anyio.to_thread.run_sync(
        check_dataset,
        state,
        body.dataset.layout,
        body.dataset.root,
        body.dataset.options,
        ("gallery",) if protocol == "vehicleid" else ("query", "gallery"),
    )
    check_job_images(count, state.settings.max_evaluation_images, "evaluation", "REID_MAX_EVALUATION_IMAGES")
    options: dict[str, Any] = {"ap_mode": body.ap_mode}
    if protocol == "vehicleid":
        options.update(trials=body.trials, seed=body.seed, test_size=body.test_size)
    dataset = body.dataset.model_dump()
    payload = {
        "model": runtime.key,
        "dataset": dataset,
        "protocol": protocol,
        "rerank": body.rerank,
        "options": options,
    }

    def build(session: Any) -> tuple[dict[str, Any], str]:
        job = Job(kind="evaluate", status="queued", params={})
        session.add(job)
        session.flush()
        ev = Evaluation(
            job_id=job.id,
            model_id=runtime.row_id,
            protocol=protocol,
            dataset=dataset,
            options=options,
            rerank=body.rerank,
        )
        session.add(ev)
        session.flush()
        job.params = {"evaluation_id": ev.id}
        session.flush()
        session.refresh(ev)
        return evaluation_out(ev).model_dump(mode="json"), f"/v1/evaluations/{ev.id}"

    return await anyio.to_thread.run_sync(
        lambda: create_job_idempotently(
            state,
            key=key,
            scope="POST /v1/evaluations",
            request_hash=idempotency.fingerprint(payload),
            build=build,
        )
    )


@router.get("", summary="List evaluations", dependencies=[Depends(authorize(Scope.READ))])
def list_evaluations(
    session: DbSession,
    model: str | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
) -> Page[EvaluationOut]:
    after = cursor_after(cursor)
    stmt = select(Evaluation)
    if model is not None:
        stmt = stmt.where(Evaluation.model_id.in_(select(ModelRow.id).where(ModelRow.name == model)))
    rows = session.scalars(page_query(stmt, Evaluation.id, after, limit)).unique().all()
    return page_of(rows, limit, EvaluationOut, evaluation_out)


@router.get(
    "/{evaluation_id}",
    summary="An evaluation's status and result",
    dependencies=[Depends(authorize(Scope.READ))],
)
def get_evaluation(evaluation_id: EvaluationId, session: DbSession) -> EvaluationOut:
    ev = session.get(Evaluation, evaluation_id)
    if ev is None:
        raise not_found("Evaluation", evaluation_id)
    return evaluation_out(ev)
