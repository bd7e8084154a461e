"""Uploaded images, kept content-addressed under the data directory, and their thumbnails.

An upload is stored once per content (``images/ab/cd/<sha256>.<ext>``), written to a temporary file
and renamed so that a crash never leaves half an image behind. Ingested files are not copied:
items refer to them where they lie. Thumbnails are made on first request and cached.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from PIL import Image

from index.snapshot import fsync_dir
from service.imaging.decoding import EXTENSIONS


class ImageMissingError(FileNotFoundError):
    """An item's image is no longer on disk."""


class ImageStore:
    """Content-addressed image files and cached JPEG thumbnails under ``root``."""

    def __init__(self, root: Path, *, thumbnail_size: int = 128) -> None:
        self.root = Path(root)
        self.images = self.root / "images"
        self.thumbs = self.root / "thumbnails"
        self.thumbnail_size = thumbnail_size
        self.images.mkdir(parents=True, exist_ok=True)
        self.thumbs.mkdir(parents=True, exist_ok=True)

    def path_for(self, content_hash: str, image_format: str) -> Path:
        ext = EXTENSIONS.get(image_format, "bin")
        return self.images / content_hash[:2] / content_hash[2:4] / f"{content_hash}.{ext}"

    def put(self, data: bytes, content_hash: str, image_format: str) -> Path:
        """Store the bytes (once per content) and return their path; durable before it returns."""
        path = self.path_for(content_hash, image_format)
        if path.exists():
            return path
        _atomic_write(path, data)
        return path

    def source_of(self, content_hash: str, image_format: str, source_path: str | None) -> Path:
        """Where an item's image is: its ingested source file, else the stored upload."""
        if source_path:
            return Path(source_path)
        return self.path_for(content_hash, image_format)

    def thumbnail(self, content_hash: str, image_format: str, source_path: str | None) -> bytes:
        """A JPEG thumbnail (longest side ``thumbnail_size``), made once and cached."""
        size = self.thumbnail_size
        cached = self.thumbs / content_hash[:2] / f"{content_hash}-{size}.jpg"
        if cached.exists():
            return cached.read_bytes()
        source = self.source_of(content_hash, image_format, source_path)
        try:
            with Image.open(source) as img:
                img = img.convert("RGB")
                img.thumbnail((size, size))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=85)
        except FileNotFoundError as exc:
            raise ImageMissingError(
                f"the image file {source.name} of this item is no longer on disk"
            ) from exc
        data = buf.getvalue()
        _atomic_write(cached, data)
        return data


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        # The rename is durable only once the directory entry is: without this a power loss can
        # leave the item's row pointing at a file that never appeared.
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
