"""Uploaded images, kept content-addressed under the data directory, and their thumbnails.

An upload is stored once per content (``images/ab/cd/<sha256>.<ext>``), written to a temporary file
and renamed so that a crash never leaves half an image behind. Ingested files are not copied:
items refer to them where they lie. Thumbnails are made on first request and cached.

Bytes that no item needs any more are removed in two steps, :meth:`ImageStore.withdraw` (an atomic
rename out of the way) and deleting the file or :meth:`ImageStore.restore`, so that the
caller can check the database between them (``service.image_release`` says why that is race-free).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
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

    def withdraw(self, content_hash: str, image_format: str) -> Path | None:
        """Move the stored bytes out of the way (where readers and :meth:`put` no longer see them).

        Returns where they went (to delete, or to :meth:`restore`), or None when there were none.
        """
        path = self.path_for(content_hash, image_format)
        aside = path.with_name(f".{path.name}.withdrawn-{uuid.uuid4().hex}")
        try:
            os.replace(path, aside)
        except FileNotFoundError:
            return None
        return aside

    def restore(self, aside: Path, content_hash: str, image_format: str) -> None:
        """Put withdrawn bytes back (over a copy an upload may have written meanwhile: same content)."""
        path = self.path_for(content_hash, image_format)
        os.replace(aside, path)
        fsync_dir(path.parent)

    def drop_thumbnails(self, content_hash: str) -> None:
        for cached in (self.thumbs / content_hash[:2]).glob(f"{content_hash}-*.jpg"):
            cached.unlink(missing_ok=True)

    def stored(self, *, older_than_s: float) -> Iterator[tuple[str, str]]:
        """(content hash, format) of every stored upload last written more than ``older_than_s`` ago.

        Leftovers of an interrupted withdrawal or write (the process died between its two steps)
        are deleted on the way: a withdrawn file was unreferenced, a temporary one never renamed.
        """
        formats = {ext: fmt for fmt, ext in EXTENSIONS.items()}
        cutoff = time.time() - older_than_s
        for path in self.images.glob("??/??/*"):
            try:
                if path.stat().st_mtime >= cutoff:
                    continue
            except FileNotFoundError:
                continue
            if ".withdrawn-" in path.name or (path.name.startswith(".") and path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)
                continue
            stem, _, ext = path.name.partition(".")
            if not path.name.startswith(".") and ext in formats and len(stem) == 64:
                yield stem, formats[ext]

    def thumbnailed(self, *, older_than_s: float) -> Iterator[str]:
        """Content hashes with a cached thumbnail written more than ``older_than_s`` ago."""
        cutoff = time.time() - older_than_s
        seen = set()
        for path in self.thumbs.glob("??/*.jpg"):
            content_hash = path.name.partition("-")[0]
            with contextlib.suppress(FileNotFoundError):
                if content_hash not in seen and len(content_hash) == 64 and path.stat().st_mtime < cutoff:
                    seen.add(content_hash)
                    yield content_hash

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
