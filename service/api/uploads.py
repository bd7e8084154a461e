"""Uploaded images: read, checked and decoded off the event loop, preprocessed, embedded in micro-batches."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
from fastapi import UploadFile

from service.api.schemas import MAX_METADATA_LENGTH, to_utc
from service.embedder import EmbedderBusyError, EmbedderClosedError, EmbeddingFailedError, ModelRuntime
from service.http.problems import Problem
from service.imaging.decoding import ImageError, ImageTooLargeError, UnsupportedImageError, probe_image
from service.imaging.preparation import BatchPreparation, Prepared
from service.imaging.processes import DecodeWorkersUnavailableError
from service.state import ServiceState


async def read_uploads(state: ServiceState, files: Sequence[UploadFile]) -> list[tuple[str, bytes]]:
    """(name, bytes) of each uploaded file, after checking how many there are."""
    limit = state.settings.max_images_per_request
    if not files:
        raise Problem(
            422, "No image", "Send one or more image files in the multipart field 'image'.", slug="no-image"
        )
    if len(files) > limit:
        raise Problem(
            422,
            "Too many images",
            f"{len(files)} images in one request; at most {limit}.",
            slug="too-many-images",
        )
    out = []
    for n, f in enumerate(files):
        out.append((f.filename or f"image[{n}]", await f.read()))
    return out


async def prepare_uploads(
    state: ServiceState, uploads: Sequence[tuple[str, bytes]], runtimes: Mapping[int, ModelRuntime]
) -> list[Prepared[str]]:
    """Check, decode and preprocess every upload for these models (model id -> runtime).

    Off the event loop, in the decoder pool. When the models run on a GPU, JPEGs take the road of
    ingestion (:class:`~service.imaging.preparation.BatchPreparation`): only their header is checked
    here, then nvJPEG decodes them and the GPU resizes them, so a query does not pay Pillow's ~1 ms; other
    formats are decoded by Pillow and copied up. The first bad upload answers 415/413/422 naming it.
    """
    models = {model_id: r.model for model_id, r in runtimes.items()}
    preparation = BatchPreparation(state.decoder, models, jpeg_decoder=state.settings.jpeg_decoder)
    loop = asyncio.get_running_loop()
    pool = state.decoder.pool
    await loop.run_in_executor(pool, check_request_pixels, state, uploads)
    prepared = list(
        await asyncio.gather(
            *(
                loop.run_in_executor(pool, partial(preparation.prepare_bytes, name, data, name=name))
                for name, data in uploads
            )
        )
    )
    _raise_for_bad_image(prepared)
    if preparation.stage is not None:
        await loop.run_in_executor(pool, preparation.stage, prepared)
        _raise_for_bad_image(prepared)  # what nvJPEG refused and Pillow could not decode either
    return prepared


def check_request_pixels(state: ServiceState, uploads: Sequence[tuple[str, bytes]]) -> None:
    """Refuse (413) a request whose images together have more pixels than ``max_request_pixels``.

    Read from the headers, before any image is decoded: a few hundred KB of palette PNGs can
    decode to several GB, each image under the per-image limit. An image whose header cannot be
    read, or that is over the per-image limit, is left out of the sum: its own decoding names it.
    """
    limit = state.settings.max_request_pixels
    total = 0
    for name, data in uploads:
        try:
            info = probe_image(data, max_pixels=state.settings.max_image_pixels, name=name)
        except ImageError:
            continue
        total += info.width * info.height
    if total > limit:
        raise Problem(
            413,
            "Too many pixels",
            f"The {len(uploads)} images of this request have {total:,} pixels in all, more than the "
            f"{limit:,} one request may carry: send fewer or smaller images per request (split them "
            "over several requests, or downscale them first).",
            slug="too-many-pixels",
        )


def _raise_for_bad_image(prepared: Sequence[Prepared[str]]) -> None:
    for p in prepared:
        if p.error is None:
            continue
        if isinstance(p.cause, UnsupportedImageError):
            raise Problem(415, "Unsupported image", p.error, slug="unsupported-image")
        if isinstance(p.cause, ImageTooLargeError):
            raise Problem(413, "Image too large", p.error, slug="image-too-large")
        if isinstance(p.cause, ImageError):
            raise Problem(422, "Undecodable image", p.error, slug="undecodable-image")
        if isinstance(p.cause, DecodeWorkersUnavailableError):
            raise Problem(
                503, "Shutting down", p.cause.args[0], slug="shutting-down", headers={"Retry-After": "5"}
            )
        raise RuntimeError(f"{p.source}: {p.error}") from p.cause  # a server fault: 500, logged


async def embed_prepared(
    state: ServiceState, runtime: ModelRuntime, model_id: int, prepared: Sequence[Prepared[str]]
) -> np.ndarray:
    """Embed prepared uploads with one model through its micro-batcher: (n, dim) float32.

    Uploads prepared without this model (it joined the gallery meanwhile) are preprocessed now.
    """
    loop = asyncio.get_running_loop()
    max_pixels = state.settings.max_image_pixels

    def preprocess(p: Prepared[str]) -> Prepared[str]:
        try:
            p.tensor_for(model_id, runtime.model.preprocess, max_pixels)
        except ImageError as exc:
            p.error, p.cause = str(exc), exc
        return p

    missing = [p for p in prepared if model_id not in p.tensors]
    if missing:
        _raise_for_bad_image(
            await asyncio.gather(*(loop.run_in_executor(state.decoder.pool, preprocess, p) for p in missing))
        )
    try:
        vectors = await asyncio.gather(*(runtime.batcher.embed(p.tensors[model_id]) for p in prepared))
    except EmbedderBusyError as exc:
        raise Problem(
            503, "Embedding queue full", str(exc), slug="busy", headers={"Retry-After": "1"}
        ) from exc
    except EmbedderClosedError as exc:
        raise Problem(
            503, "Shutting down", str(exc), slug="shutting-down", headers={"Retry-After": "5"}
        ) from exc
    except EmbeddingFailedError as exc:
        raise Problem(
            422, "Embedding failed", f"The model could not embed an image: {exc}", slug="embedding-failed"
        ) from exc
    return np.stack(vectors).astype(np.float32, copy=False)


def parse_time(value: str | None, field: str) -> dt.datetime | None:
    """An ISO 8601 time (UTC when no offset is given) or epoch seconds; None stays None."""
    if value is None or value.strip() == "":
        return None
    text = value.strip()
    try:
        return dt.datetime.fromtimestamp(float(text), dt.UTC)
    except (ValueError, OverflowError, OSError):
        pass
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise Problem(
            422,
            "Invalid time",
            f"{field}={value!r} is neither ISO 8601 nor epoch seconds.",
            slug="validation",
        ) from exc
    try:
        return to_utc(parsed)
    except ValueError as exc:
        raise Problem(422, "Invalid time", f"{field}={value!r}: {exc}.", slug="validation") from exc


def per_image(values: list[str] | None, n: int, field: str) -> list[str | None]:
    """A metadata form field given once for all images or once per image (in upload order)."""
    if not values:
        return [None] * n
    for value in values:
        # The columns hold 200 characters, and PostgreSQL text cannot hold NUL at all.
        if len(value) > MAX_METADATA_LENGTH or "\x00" in value:
            raise Problem(
                422,
                "Invalid metadata",
                f"{field} values must be at most {MAX_METADATA_LENGTH} characters, without NUL.",
                slug="validation",
            )
    if len(values) == 1:
        return [values[0] or None] * n
    if len(values) != n:
        raise Problem(
            422,
            "Metadata count mismatch",
            f"{len(values)} values of {field!r} for {n} images: give one for all or one per image.",
            slug="validation",
        )
    return [v or None for v in values]
