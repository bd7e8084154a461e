"""Decoding client images safely: format sniffed from the bytes, pixel limits, off the event loop.

Only JPEG, PNG and WebP are accepted, recognised by their magic numbers (a text file named
``.jpg`` is refused before Pillow sees it). Pillow's decompression-bomb guard stays on, and the
declared size is checked against the service's own limit before any pixel is decoded.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from dataclasses import dataclass

from PIL import Image

logger = logging.getLogger(__name__)

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


class DecoderCrashedError(ImageError):
    """Decoding the image killed the decoder process twice (in two different worker processes).

    Such an image is never decoded in the service process, where the same crash would take the
    service down; it fails alone, the other images of its request or job go on.
    """


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
    """An RGB image with the facts about its bytes that the service stores.

    ``source_mode`` and ``progressive`` describe the file (its mode before the RGB conversion).
    """

    image: Image.Image
    format: str
    content_hash: str
    width: int
    height: int
    source_mode: str = "RGB"
    progressive: bool = False

    @property
    def info(self) -> ImageInfo:
        """The header facts alone, as :func:`probe_image` reads them (what a worker process sends back)."""
        return ImageInfo(self.format, self.width, self.height, self.source_mode, self.progressive)


def content_hash(data: bytes) -> str:
    """Hex SHA-256 of the image bytes: the content address of uploads and the dedup key of jobs."""
    return hashlib.sha256(data).hexdigest()


def _accepted_format(data: bytes, name: str) -> str:
    """The format of ``data`` judged by its content; UnsupportedImageError when empty or not accepted."""
    if not data:
        raise UnsupportedImageError(f"{name} is empty (0 bytes): send a JPEG, PNG or WebP file")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageError(
            f"{name} is not a JPEG, PNG or WebP image (judged by its content, not its name)"
        )
    return fmt


def decode_image(data: bytes, *, max_pixels: int, name: str = "image") -> DecodedImage:
    """Decode image bytes into an RGB PIL image, refusing anything unsafe or unsupported.

    Args:
        data: the file's bytes.
        max_pixels: largest width*height accepted.
        name: how to call the image in error messages (upload field, file name).

    Raises:
        UnsupportedImageError, ImageTooLargeError, ImageDecodeError.
    """
    fmt = _accepted_format(data, name)
    try:
        with warnings.catch_warnings():
            # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that; a warning is a refusal here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            source_mode = img.mode
            progressive = _is_progressive(img)
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
    return DecodedImage(img, fmt, content_hash(data), width, height, source_mode, progressive)


def _is_progressive(img: Image.Image) -> bool:
    return bool(img.info.get("progressive") or img.info.get("progression"))


#: Start-of-frame markers of the Huffman-coded 8/12-bit JPEG processes that libjpeg-turbo and
#: nvJPEG decode (baseline, extended sequential, progressive); others go through Pillow.
_HUFFMAN_SOF = {0xC0: False, 0xC1: False, 0xC2: True}
_STANDALONE_MARKERS = {0x01, 0xD8, *range(0xD0, 0xD8)}
_COMPONENT_MODES = {1: "L", 3: "RGB"}


def jpeg_frame(data: bytes) -> tuple[int, int, str, bool] | None:
    """(width, height, mode, progressive) from a JPEG's frame header, or None to let Pillow judge.

    Walks the marker segments up to the first start-of-frame with bounds checks at every step;
    anything unusual (12-bit samples, arithmetic coding, CMYK, a malformed segment) returns None.
    """
    n = len(data)
    i = 2  # after SOI
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE_MARKERS:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or scan data before any frame header
            return None
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2 or i + 2 + length > n:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _HUFFMAN_SOF or length < 8:
                return None
            precision = data[i + 4]
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            mode = _COMPONENT_MODES.get(data[i + 9])
            if precision != 8 or mode is None or width == 0 or height == 0:
                return None
            return width, height, mode, _HUFFMAN_SOF[marker]
        i += 2 + length
    return None


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says, read without decoding pixels (for decoding on a GPU later)."""

    format: str
    width: int
    height: int
    mode: str
    progressive: bool


def probe_image(data: bytes, *, max_pixels: int, name: str = "image") -> ImageInfo:
    """The checks of :func:`decode_image` that need no pixels: format by content and pixel limit.

    A decoder that runs elsewhere (nvJPEG on the GPU) gets only bytes that passed these checks.

    Raises:
        UnsupportedImageError, ImageTooLargeError, ImageDecodeError (unreadable header).
    """
    fmt = _accepted_format(data, name)
    if fmt == "JPEG" and (frame := jpeg_frame(data)) is not None:
        # The frame header alone, read in microseconds: Pillow's parser costs ~50 us of GIL time
        # per image, which would cap a decode pool far below a GPU's appetite.
        width, height, mode, progressive = frame
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)  # Pillow's bomb guard too
        if width * height > limit:
            raise ImageTooLargeError(
                f"{name} is {width}x{height} pixels, more than the {limit} this service accepts"
            )
        return ImageInfo(fmt, width, height, mode, progressive)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                width, height = img.size
                mode = img.mode
                progressive = _is_progressive(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"{name} is too large to decode safely: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{name} could not be read as {fmt} (truncated or corrupt?): {exc}") from exc
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} pixels, more than the {max_pixels} this service accepts"
        )
    return ImageInfo(fmt, width, height, mode, progressive)
