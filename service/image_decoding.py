"""Decoding client images safely: format sniffed from the bytes, pixel limits, off the event loop.

Only JPEG, PNG and WebP are accepted, recognised by their magic numbers (a text file named
``.jpg`` is refused before Pillow sees it). Pillow's decompression-bomb guard stays on, and the
declared size is checked against the service's own limit before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

FORMATS = ("JPEG", "PNG", "WEBP")
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class ImageError(ValueError):
    """An image the service cannot use; the message says why and what is accepted."""


class UnsupportedImageError(ImageError):
    """The bytes are not a JPEG, PNG or WebP image."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the service accepts."""


class ImageDecodeError(ImageError):
    """The bytes look like a supported format but cannot be decoded (truncated, corrupt)."""


def sniff_format(data: bytes) -> str | None:
    """The image format from its magic number: ``JPEG``, ``PNG``, ``WEBP`` or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


@dataclass(frozen=True)
class DecodedImage:
    """An RGB image with the facts about its bytes that the service stores."""

    image: Image.Image
    format: str
    content_hash: str
    width: int
    height: int


def content_hash(data: bytes) -> str:
    """Hex SHA-256 of the image bytes: the content address of uploads and the dedup key of jobs."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> DecodedImage:
    """Decode image bytes into an RGB PIL image, refusing anything unsafe or unsupported.

    Args:
        data: the file's bytes.
        max_pixels: largest width*height accepted.
        name: how to call the image in error messages (upload field, file name).

    Raises:
        UnsupportedImageError, ImageTooLargeError, ImageDecodeError.
    """
    if not data:
        raise UnsupportedImageError(f"{name} is empty (0 bytes): send a JPEG, PNG or WebP file")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageError(
            f"{name} is not a JPEG, PNG or WebP image (judged by its content, not its name)"
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that; a warning is a refusal here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLargeError(
                    f"{name} is {width}x{height} pixels, more than the {max_pixels} this service accepts"
                )
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{name} is too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(
            f"{name} could not be decoded as {fmt} (truncated or corrupt?): {exc}"
        ) from exc
    if img.mode != "RGB":
        img = img.convert("RGB")
    return DecodedImage(img, fmt, content_hash(data), width, height)


class ImageDecoder:
    """A thread pool that decodes images off the event loop (Pillow releases the GIL while decoding)."""

    def __init__(self, threads: int, *, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="reid-decode")

    async def decode(self, data: bytes, *, name: str = "image") -> DecodedImage:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, lambda: decode_image(data, max_pixels=self.max_pixels, name=name)
        )

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The pool itself, for jobs that decode files ahead of the model."""
        return self._pool

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
