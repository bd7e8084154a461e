"""``POST /v1/galleries/{id}/search`` (by uploaded images) and ``.../search-by-item`` (by a stored item)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, File, Form, UploadFile

from index import SearchFilter
from service.api.deps import GalleryId, Scope, State, authorize
from service.api.items import thumbnail_url
from service.api.schemas import (
    MAX_FILTER_VALUES,
    MAX_METADATA_LENGTH,
    QueryResult,
    SearchByItem,
    SearchHit,
    SearchResponse,
)
from service.api.uploads import embed_prepared, parse_time, prepare_uploads, read_uploads
from service.embedder import ModelRuntime
from service.gallery_index import GalleryIndex, attribute_code
from service.http.problems import PROBLEM_RESPONSES, Problem, not_found, problem_responses
from service.search import Hit, ItemNotEmbeddedError, ItemNotFoundError, item_query, run_search
from service.state import ServiceState

router = APIRouter(
    prefix="/v1/galleries/{gallery_id}",
    tags=["search"],
    responses={**PROBLEM_RESPONSES, **problem_responses(413, 415)},
    dependencies=[Depends(authorize(Scope.READ))],
)


def _active_index(state: ServiceState, gallery_id: int) -> tuple[GalleryIndex, ModelRuntime | None]:
    try:
        gallery_state = state.indexes.gallery(gallery_id)
    except KeyError as exc:
        raise not_found("Gallery", gallery_id) from exc
    # Read once: a model switch during this request changes the next request, not this one.
    gi = gallery_state.indexes.get(gallery_state.active_model_id)
    if gi is None:
        raise Problem(503, "Index not loaded", "The gallery's index is not loaded.", slug="not-ready")
    return gi, state.models.by_row(gi.model_id)


def _check_k(state: ServiceState, k: int | None) -> int:
    k = state.settings.default_k if k is None else k
    if k < 1 or k > state.settings.max_k:
        raise Problem(
            422, "Invalid k", f"k must be between 1 and {state.settings.max_k}, got {k}.", slug="validation"
        )
    return k


def build_filter(
    cameras: list[str] | None,
    time_from: dt.datetime | None,
    time_to: dt.datetime | None,
    exclude_identity: str | None,
    exclude_ids: list[int] | None = None,
) -> tuple[SearchFilter | None, set[int]]:
    """The index filter (integer codes of cameras/identities), and ids to drop from the results."""
    if time_from and time_to and time_from > time_to:
        raise Problem(422, "Empty time window", "time_from is after time_to.", slug="validation")
    flt = SearchFilter(
        cameras=[attribute_code(c) for c in cameras] if cameras else None,
        time_from=time_from.timestamp() if time_from else None,
        time_to=time_to.timestamp() if time_to else None,
        exclude_identity=attribute_code(exclude_identity) if exclude_identity else None,
    )
    return (None if flt.is_empty else flt), set(exclude_ids or ())


def _split_cameras(values: list[str] | None) -> list[str] | None:
    """The cameras of the form field (repeated or comma-separated), within the same caps as JSON."""
    if not values:
        return None
    out = [c.strip() for v in values for c in v.split(",") if c.strip()]
    if len(out) > MAX_FILTER_VALUES or any(len(c) > MAX_METADATA_LENGTH for c in out):
        raise Problem(
            422,
            "Too many cameras",
            f"cameras takes at most {MAX_FILTER_VALUES} values of at most {MAX_METADATA_LENGTH} "
            f"characters each, got {len(out)}.",
            slug="validation",
        )
    return out or None


def _results(hits: list[list[Hit]]) -> list[QueryResult]:
    return [
        QueryResult(
            results=[
                SearchHit(
                    item_id=h.item.id,
                    score=h.score,
                    identity=h.item.identity,
                    camera=h.item.camera,
                    captured_at=h.item.captured_at,
                    thumbnail_url=thumbnail_url(h.item),
                )
                for h in query_hits
            ]
        )
        for query_hits in hits
    ]


@router.post("/search", summary="Search the gallery with one or more query images")
async def search(
    gallery_id: GalleryId,
    state: State,
    image: Annotated[
        list[UploadFile], File(description="Query images (JPEG/PNG/WebP), one result list each.")
    ],
    k: Annotated[int | None, Form(description="Results per query (capped by the service).")] = None,
    cameras: Annotated[
        list[str] | None, Form(description="Only these cameras (repeat or comma-separate).")
    ] = None,
    time_from: Annotated[str | None, Form(description="ISO 8601 or epoch seconds, inclusive.")] = None,
    time_to: Annotated[str | None, Form(description="ISO 8601 or epoch seconds, inclusive.")] = None,
    exclude_identity: Annotated[str | None, Form(max_length=MAX_METADATA_LENGTH)] = None,
    rerank: Annotated[bool, Form(description="k-reciprocal re-ranking of the candidates.")] = False,
) -> SearchResponse:
    k = _check_k(state, k)
    gi, runtime = _active_index(state, gallery_id)
    if runtime is None:
        raise Problem(
            503,
            "Model not loaded",
            "The gallery's model is not loaded by this service; search by stored item still works.",
            slug="model-not-loaded",
        )
    flt, drop = await anyio.to_thread.run_sync(
        build_filter,
        _split_cameras(cameras),
        parse_time(time_from, "time_from"),
        parse_time(time_to, "time_to"),
        exclude_identity,
    )
    uploads = await read_uploads(state, image)
    prepared = await prepare_uploads(state, uploads, {runtime.row_id: runtime})
    queries = await embed_prepared(state, runtime, runtime.row_id, prepared)
    hits = await anyio.to_thread.run_sync(run_search, state, gi, queries, k, flt, drop, rerank)
    return SearchResponse(model=runtime.name, model_version=runtime.version, queries=_results(hits))


@router.post("/search-by-item", summary="Search the gallery with a stored item's embedding")
async def search_by_item(gallery_id: GalleryId, body: SearchByItem, state: State) -> SearchResponse:
    k = _check_k(state, body.k)
    gi, _ = _active_index(state, gallery_id)
    try:
        query, name, version = await anyio.to_thread.run_sync(item_query, state, gi, gallery_id, body.item_id)
    except ItemNotFoundError as exc:
        raise not_found("Item", body.item_id) from exc
    except ItemNotEmbeddedError as exc:
        raise Problem(
            409, "No embedding", "The item has no embedding by the gallery's model yet.", slug="no-embedding"
        ) from exc
    # Off the event loop: a filter of many cameras is hashed value by value.
    flt, drop = await anyio.to_thread.run_sync(
        build_filter,
        body.cameras,
        body.time_from,
        body.time_to,
        body.exclude_identity,
        [body.item_id] if body.exclude_self else None,
    )
    hits = await anyio.to_thread.run_sync(run_search, state, gi, query, k, flt, drop, body.rerank)
    return SearchResponse(model=name, model_version=version, queries=_results(hits))
