"""``/v1/galleries/{id}/items``: upload images (201 once durable), get, list, delete, thumbnails."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import image_release
from service.api import idempotency
from service.api.deps import DbSession, GalleryId, ItemId, Scope, State, authorize
from service.api.pagination import cursor_after, page_of, page_query
from service.api.schemas import MAX_METADATA_LENGTH, ItemOut, Page, SortOrder
from service.api.uploads import embed_prepared, parse_time, per_image, prepare_uploads, read_uploads
from service.db.tables import Gallery, Item
from service.http.problems import PROBLEM_RESPONSES, Problem, not_found, problem_responses
from service.imaging.store import ImageMissingError
from service.item_writer import (
    GalleryGoneError,
    GalleryModelsChangedError,
    NewItem,
    StoredItem,
    gallery_model_ids,
)
from service.state import ServiceState

router = APIRouter(
    prefix="/v1/galleries/{gallery_id}/items",
    tags=["items"],
    responses={**PROBLEM_RESPONSES, **problem_responses(410, 413, 415)},
)

Read = Depends(authorize(Scope.READ))
Write = Depends(authorize(Scope.WRITE))
Admin = Depends(authorize(Scope.ADMIN))


def thumbnail_url(item: Item | StoredItem) -> str:
    return f"/v1/galleries/{item.gallery_id}/items/{item.id}/thumbnail"


def item_out(item: Item | StoredItem) -> ItemOut:
    return ItemOut(
        id=item.id,
        gallery_id=item.gallery_id,
        identity=item.identity,
        camera=item.camera,
        captured_at=item.captured_at,
        content_hash=item.content_hash,
        source_path=item.source_path,
        width=item.width,
        height=item.height,
        status=item.status,
        created_at=item.created_at,
        thumbnail_url=thumbnail_url(item),
    )


def _models_of(state: ServiceState, gallery_id: int) -> set[int]:
    with state.sessions() as session:
        try:
            return gallery_model_ids(session, gallery_id)
        except GalleryGoneError as exc:
            raise not_found("Gallery", gallery_id) from exc


@router.post(
    "",
    status_code=201,
    summary="Add images to the gallery (multipart: files in 'image', optional metadata per image)",
    dependencies=[Write],
    responses={201: {"description": "The new items, durable (committed) and searchable"}},
)
async def add_items(
    gallery_id: GalleryId,
    state: State,
    image: Annotated[list[UploadFile], File(description="One or more JPEG/PNG/WebP files.")],
    identity: Annotated[list[str] | None, Form(description="Once for all images, or once per image.")] = None,
    camera: Annotated[list[str] | None, Form(description="Once for all images, or once per image.")] = None,
    captured_at: Annotated[
        list[str] | None, Form(description="ISO 8601 or epoch seconds; once or per image.")
    ] = None,
    key: Annotated[idempotency.Claim | None, Depends(idempotency.claim)] = None,
) -> Any:
    model_ids = await anyio.to_thread.run_sync(_models_of, state, gallery_id)
    uploads = await read_uploads(state, image)
    n = len(uploads)
    identities = per_image(identity, n, "identity")
    cameras = per_image(camera, n, "camera")
    times = [parse_time(t, "captured_at") for t in per_image(captured_at, n, "captured_at")]
    runtimes = {
        model_id: runtime for model_id in model_ids if (runtime := state.models.by_row(model_id)) is not None
    }
    prepared = await prepare_uploads(state, uploads, runtimes)
    scope = f"POST /v1/galleries/{gallery_id}/items"
    request_hash = idempotency.fingerprint(
        {
            "images": [p.content_hash for p in prepared],
            "identity": identities,
            "camera": cameras,
            "captured_at": [t.isoformat() if t else None for t in times],
        }
    )
    if key is not None:
        with state.sessions() as session:
            stored = idempotency.lookup(session, key, scope, request_hash)
        if stored is not None:
            return JSONResponse(stored.body, status_code=stored.status_code)
    # Durable image bytes first: an acknowledged item never points at a missing upload.
    for (_, data), d in zip(uploads, prepared, strict=True):
        await anyio.to_thread.run_sync(state.images.put, data, d.content_hash, d.image_format)
    new_items = [
        NewItem(
            content_hash=d.content_hash,
            image_format=d.image_format,
            width=d.width,
            height=d.height,
            identity=identities[i],
            camera=cameras[i],
            captured_at=times[i],
        )
        for i, d in enumerate(prepared)
    ]
    vectors: dict[int, Any] = {}
    for _attempt in range(3):
        for model_id in model_ids - set(vectors):
            runtime = state.models.by_row(model_id)
            if runtime is None:
                raise Problem(
                    503,
                    "Model not loaded",
                    f"The gallery's model (id {model_id}) is not loaded by this service.",
                    slug="model-not-loaded",
                )
            vectors[model_id] = await embed_prepared(state, runtime, model_id, prepared)
        try:
            body = await anyio.to_thread.run_sync(
                _write, state, gallery_id, new_items, vectors, key, scope, request_hash
            )
        except GalleryModelsChangedError as exc:
            model_ids = exc.required  # an upgrade started meanwhile: embed with its model too
            continue
        except GalleryGoneError as exc:
            raise not_found("Gallery", gallery_id) from exc
        # Again after the commit (a stat when the bytes are there): a concurrent release of the
        # same content may have withdrawn them before it could see these items (image_release).
        for (_, data), d in zip(uploads, prepared, strict=True):
            await anyio.to_thread.run_sync(state.images.put, data, d.content_hash, d.image_format)
        return JSONResponse(body, status_code=201)
    raise Problem(
        503,
        "Gallery busy",
        "The gallery's models kept changing; retry.",
        slug="busy",
        headers={"Retry-After": "1"},
    )


def _write(
    state: ServiceState,
    gallery_id: int,
    new_items: list[NewItem],
    vectors: dict[int, Any],
    key: idempotency.Claim | None,
    scope: str,
    request_hash: str,
) -> dict[str, Any]:
    body: dict[str, Any] = {}

    def record(session: Session, items: list[StoredItem]) -> None:
        body["items"] = [item_out(i).model_dump(mode="json") for i in items]
        if key is not None:  # committed with the items: a retry can never add them twice
            idempotency.remember(session, key, scope, request_hash, 201, body, None)

    try:
        state.writer.add(gallery_id, new_items, vectors, before_commit=record)
    except IntegrityError:
        if key is None:
            raise
        # A concurrent request with the same key committed first; this one rolled back entirely.
        with state.sessions() as session:
            stored = idempotency.lookup(session, key, scope, request_hash)
        if stored is None:
            raise
        return stored.body
    return body


@router.get("", summary="List items with filters", dependencies=[Read])
def list_items(
    gallery_id: GalleryId,
    session: DbSession,
    identity: Annotated[str | None, Query(max_length=MAX_METADATA_LENGTH)] = None,
    camera: Annotated[str | None, Query(max_length=MAX_METADATA_LENGTH)] = None,
    time_from: str | None = None,
    time_to: str | None = None,
    include_deleted: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
    order: Annotated[SortOrder, Query(description="By id: asc, oldest first; desc, newest first.")] = "asc",
) -> Page[ItemOut]:
    if session.get(Gallery, gallery_id) is None:
        raise not_found("Gallery", gallery_id)
    after = cursor_after(cursor)
    stmt = select(Item).where(Item.gallery_id == gallery_id)
    if not include_deleted:
        stmt = stmt.where(Item.status == "active")
    if identity is not None:
        stmt = stmt.where(Item.identity == identity)
    if camera is not None:
        stmt = stmt.where(Item.camera == camera)
    start, end = parse_time(time_from, "time_from"), parse_time(time_to, "time_to")
    if start is not None:
        stmt = stmt.where(Item.captured_at >= start)
    if end is not None:
        stmt = stmt.where(Item.captured_at <= end)
    rows = session.scalars(page_query(stmt, Item.id, after, limit, order)).all()
    return page_of(rows, limit, ItemOut, item_out)


def _get_item(session: Any, gallery_id: int, item_id: int, *, active: bool = False) -> Item:
    """The gallery's item; with ``active``, a deleted item is not found either (its pixels are gone
    for clients the moment DELETE answered 204, whatever the store still holds)."""
    item = session.get(Item, item_id)
    if item is None or item.gallery_id != gallery_id or (active and item.status != "active"):
        raise not_found("Item", item_id)
    return item


@router.get("/{item_id}", summary="Get an item", dependencies=[Read])
def get_item(gallery_id: GalleryId, item_id: ItemId, session: DbSession) -> ItemOut:
    return item_out(_get_item(session, gallery_id, item_id))


@router.delete(
    "/{item_id}", status_code=204, summary="Delete an item (it never comes back)", dependencies=[Admin]
)
def delete_item(gallery_id: GalleryId, item_id: ItemId, state: State) -> Response:
    with state.sessions() as session:
        item = _get_item(session, gallery_id, item_id)
        if item.status != "active":
            raise not_found("Item", item_id)
        contents = image_release.contents_of(session, gallery_id=gallery_id, item_ids=[item_id])
    try:
        state.writer.delete(gallery_id, [item_id])
    except GalleryGoneError as exc:
        raise not_found("Gallery", gallery_id) from exc
    # The item is deleted whatever happens to its bytes: a failure here is logged, the sweep retries.
    image_release.release_quietly(state.sessions, state.images, contents)
    return Response(status_code=204)


@router.get(
    "/{item_id}/thumbnail",
    summary="JPEG thumbnail of an item",
    dependencies=[Read],
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def thumbnail(gallery_id: GalleryId, item_id: ItemId, state: State) -> Response:
    def load() -> bytes:
        with state.sessions() as session:
            item = _get_item(session, gallery_id, item_id, active=True)
        try:
            return state.images.thumbnail(item.content_hash, item.image_format, item.source_path)
        except ImageMissingError as exc:
            raise Problem(410, "Image gone", str(exc), slug="image-gone") from exc
        except OSError as exc:
            raise Problem(
                410, "Image unreadable", f"The item's image cannot be read: {exc}", slug="image-gone"
            ) from exc

    loop = asyncio.get_running_loop()
    data = await loop.run_in_executor(state.decoder.pool, load)
    # private: the thumbnail needed a key (when auth is on) and must not sit in a shared cache; not
    # immutable: a deleted item's thumbnail must stop being shown.
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/{item_id}/image",
    summary="The item's original image",
    dependencies=[Read],
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}}},
)
def original_image(gallery_id: GalleryId, item_id: ItemId, state: State, session: DbSession) -> FileResponse:
    item = _get_item(session, gallery_id, item_id, active=True)
    path = state.images.source_of(item.content_hash, item.image_format, item.source_path)
    if not path.is_file():
        raise Problem(410, "Image gone", "The item's image file is no longer on disk.", slug="image-gone")
    media = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}.get(
        item.image_format, "application/octet-stream"
    )
    return FileResponse(path, media_type=media, headers={"Cache-Control": "private, max-age=3600"})
