"""Views into a finished evaluation: its worst queries with their rank lists, and the crops they show.

``GET /v1/evaluations/{id}/worst-queries`` ranks the evaluation's kept embeddings again exactly as the
evaluation did (:mod:`service.rank_lists`) and answers the lowest-AP queries with their top-k gallery
items, the protocol's removed items left out. ``GET /v1/evaluations/{id}/images/{split}/{index}`` is a
JPEG thumbnail of one of those crops; the file is the one the evaluation recorded for that row, so a
client can name only an evaluation, a split and a row number, never a path.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Query, Response
from fastapi import Path as PathParam

from evaluation.metrics import EvaluationError
from evaluation.rerank import RerankMemoryError
from service.api.deps import Scope, State, authorize
from service.api.schemas import RankedGalleryImage, WorstQueries, WorstQuery
from service.db.tables import Evaluation
from service.evaluation_files import evaluation_dir
from service.http.problems import PROBLEM_RESPONSES, Problem, not_found, problem_responses
from service.imaging.store import ImageMissingError
from service.jobs.sources import inside_roots
from service.rank_lists import MAX_RANK_LIST, RankListsGoneError, evaluation_samples, rank_evaluation
from service.state import ServiceState

router = APIRouter(
    prefix="/v1/evaluations/{evaluation_id}",
    tags=["evaluations"],
    responses={**PROBLEM_RESPONSES, **problem_responses(410)},
)

Read = Depends(authorize(Scope.READ))
#: Ids are 32-bit INTEGER primary keys: a larger one is refused (422) before it reaches the database.
EvaluationId = Annotated[int, PathParam(ge=1, le=2**31 - 1, description="The evaluation's id.")]


def image_url(evaluation_id: int, split: str, index: int) -> str:
    return f"/v1/evaluations/{evaluation_id}/images/{split}/{index}"


def _finished_evaluation(state: ServiceState, evaluation_id: int) -> dict[str, Any]:
    """The settings of a succeeded evaluation; 404 when unknown, 409 while it is not finished."""
    with state.sessions() as session:
        ev = session.get(Evaluation, evaluation_id)
        if ev is None:
            raise not_found("Evaluation", evaluation_id)
        status = ev.job.status
        if status != "succeeded":
            detail = (
                f"Evaluation {evaluation_id} is {status}; its rank lists exist once it has succeeded."
                if status in ("queued", "running")
                else f"Evaluation {evaluation_id} {status}: it has no rank lists. Run it again."
            )
            raise Problem(409, "Evaluation not finished", detail, slug="evaluation-not-finished")
        return {
            "protocol": ev.protocol,
            "ap_mode": (ev.options or {}).get("ap_mode", "standard"),
            "rerank": bool(ev.rerank),
            "metric": (ev.result or {}).get("metric", "cosine"),
        }


def _gone(exc: Exception) -> Problem:
    return Problem(410, "Evaluation files gone", str(exc), slug="evaluation-files-gone")


def _worst_queries(state: ServiceState, evaluation_id: int, limit: int, k: int) -> WorstQueries:
    ev = _finished_evaluation(state, evaluation_id)
    if ev["protocol"] == "vehicleid":
        raise Problem(
            409,
            "No fixed query set",
            f"Evaluation {evaluation_id} used the VehicleID protocol, which draws a new gallery in every "
            "trial: there is no single ranking per query to show. Rank lists exist for query/gallery "
            "protocols such as market1501.",
            slug="no-rank-lists",
        )
    try:
        ranked = rank_evaluation(
            evaluation_dir(state.settings.data_dir, evaluation_id),
            protocol=ev["protocol"],
            ap_mode=ev["ap_mode"],
            rerank=ev["rerank"],
            metric=ev["metric"],
            # None, as the evaluation job: the same device computes the same distances.
            device=None,
        )
    except RankListsGoneError as exc:
        raise _gone(exc) from exc
    except (EvaluationError, RerankMemoryError) as exc:
        raise Problem(409, "Rank lists unavailable", str(exc), slug="no-rank-lists") from exc
    ranking = ranked.ranking
    queries = []
    for q in ranked.worst(limit).tolist():
        q_pid = int(ranked.query_pids[q])
        results = []
        top = zip(ranking.top_indices[q, :k].tolist(), ranking.top_distances[q, :k].tolist(), strict=True)
        for g, distance in top:
            if g < 0:  # fewer kept gallery items than k
                break
            g_pid = int(ranked.gallery_pids[g])
            results.append(
                RankedGalleryImage(
                    gallery_index=g,
                    identity=str(g_pid),
                    camera=str(int(ranked.gallery_camids[g])),
                    score=1.0 - distance,
                    match=g_pid == q_pid,
                    image_url=image_url(evaluation_id, "gallery", g),
                )
            )
        queries.append(
            WorstQuery(
                query_index=q,
                identity=str(q_pid),
                camera=str(int(ranked.query_camids[q])),
                ap=float(ranking.ap[q]),
                first_match_rank=int(ranking.first_match_rank[q]),
                image_url=image_url(evaluation_id, "query", q),
                results=results,
            )
        )
    return WorstQueries(
        evaluation_id=evaluation_id,
        k=k,
        protocol=ev["protocol"],
        ap_mode=ev["ap_mode"],
        rerank=ev["rerank"],
        num_valid_queries=ranked.num_valid_queries,
        queries=queries,
    )


@router.get(
    "/worst-queries",
    summary="The evaluation's lowest-AP queries with their ranked gallery crops (rank lists)",
    dependencies=[Read],
)
async def worst_queries(
    evaluation_id: EvaluationId,
    state: State,
    limit: Annotated[int, Query(ge=1, le=200, description="How many queries.")] = 8,
    k: Annotated[int, Query(ge=1, le=MAX_RANK_LIST, description="Length of each rank list.")] = 10,
) -> WorstQueries:
    # Ranking a large evaluation takes seconds the first time: off the event loop.
    return await anyio.to_thread.run_sync(_worst_queries, state, evaluation_id, limit, k)


def _thumbnail(state: ServiceState, evaluation_id: int, split: str, index: int) -> bytes:
    _finished_evaluation(state, evaluation_id)
    try:
        paths = evaluation_samples(evaluation_dir(state.settings.data_dir, evaluation_id))[split]
    except RankListsGoneError as exc:
        raise _gone(exc) from exc
    if index >= len(paths):
        raise Problem(
            404,
            "Image not found",
            f"Evaluation {evaluation_id} has {len(paths)} {split} image(s): index {index} is out of range.",
            slug="not-found",
        )
    path = Path(paths[index])
    # The operator may have withdrawn the dataset root since the evaluation ran.
    if not inside_roots(path, state.settings.dataset_roots):
        raise Problem(
            403,
            "Image outside the dataset roots",
            f"This {split} image is no longer inside an allowed dataset root (--dataset-root).",
            slug="dataset-path-forbidden",
        )
    try:
        stat = path.stat()
    except OSError as exc:
        raise Problem(
            410, "Image gone", f"The {split} image {path.name} is no longer on disk.", slug="image-gone"
        ) from exc
    # Thumbnails are cached by content hash; a dataset file has none, so its path, size and time stand
    # in for it (a file replaced in place gets a new thumbnail).
    cache_key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    try:
        return state.images.thumbnail(cache_key, "JPEG", str(path))
    except ImageMissingError as exc:
        raise Problem(410, "Image gone", str(exc), slug="image-gone") from exc
    except OSError as exc:  # unreadable, or no longer an image Pillow can open
        raise Problem(
            410, "Image unreadable", f"The {split} image {path.name} cannot be read: {exc}", slug="image-gone"
        ) from exc


@router.get(
    "/images/{split}/{index}",
    summary="JPEG thumbnail of one query or gallery crop of the evaluation",
    dependencies=[Read],
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **problem_responses(403)},
)
async def evaluation_image(
    evaluation_id: EvaluationId,
    split: Literal["query", "gallery"],
    index: Annotated[int, PathParam(ge=0, le=2**31 - 1, description="Row of the query or gallery set.")],
    state: State,
) -> Response:
    loop = asyncio.get_running_loop()
    data = await loop.run_in_executor(state.decoder.pool, _thumbnail, state, evaluation_id, split, index)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})
