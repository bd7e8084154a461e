"""Uploaded images: read, decode (off the event loop), preprocess and embed through the micro-batcher."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence

import numpy as np
from fastapi import UploadFile

from service.api.problems import Problem
from service.embedder import EmbedderBusyError, EmbedderClosedError, EmbeddingFailedError, ModelRuntime
from service.image_decoding import DecodedImage, ImageError, ImageTooLargeError, UnsupportedImageError
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


async def decode_uploads(state: ServiceState, uploads: Sequence[tuple[str, bytes]]) -> list[DecodedImage]:
    """Decode every upload in the decoder pool; the first bad one answers 415/413/422 naming it."""
    results = await asyncio.gather(
        *(state.decoder.decode(data, name=name) for name, data in uploads), return_exceptions=True
    )
    decoded: list[DecodedImage] = []
    for result in results:
        if isinstance(result, DecodedImage):
            decoded.append(result)
            continue
        if isinstance(result, UnsupportedImageError):
            raise Problem(415, "Unsupported image", str(result), slug="unsupported-image")
        if isinstance(result, ImageTooLargeError):
            raise Problem(413, "Image too large", str(result), slug="image-too-large")
        if isinstance(result, ImageError):
            raise Problem(422, "Undecodable image", str(result), slug="undecodable-image")
        raise result
    return decoded


async def embed_decoded(
    state: ServiceState, runtime: ModelRuntime, images: Sequence[DecodedImage]
) -> np.ndarray:
    """Preprocess (in the decoder pool) and embed (micro-batched) decoded images: (n, dim) float32."""
    loop = asyncio.get_running_loop()
    tensors = await asyncio.gather(
        *(loop.run_in_executor(state.decoder.pool, runtime.model.preprocess, img.image) for img in images)
    )
    try:
        vectors = await asyncio.gather(*(runtime.batcher.embed(t) for t in tensors))
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
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


#: Longest identity or camera name (the database columns' size).
MAX_METADATA_LENGTH = 200


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
