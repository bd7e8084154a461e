"""Image decoding (format sniffed from content, pixel limits) and dataset-path confinement."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.imaging.decoding import (
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    sniff_format,
)
from service.jobs.sources import (
    DatasetPathForbiddenError,
    DatasetPathInvalidError,
    inside_roots,
    resolve_dataset_root,
)


def encoded(fmt: str, size: tuple[int, int] = (20, 40), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_supported_formats_decode_to_rgb(fmt: str) -> None:
    out = decode_image(encoded(fmt), max_pixels=10_000)
    assert out.format == fmt and out.image.mode == "RGB" and (out.width, out.height) == (20, 40)
    assert len(out.content_hash) == 64


def test_grayscale_png_is_converted() -> None:
    assert decode_image(encoded("PNG", mode="L"), max_pixels=10_000).image.mode == "RGB"


@pytest.mark.parametrize("data", [b"", b"hello", encoded("GIF"), encoded("BMP"), b"RIFF\x00\x00\x00\x00WAVE"])
def test_unsupported_content_is_refused(data: bytes) -> None:
    with pytest.raises(UnsupportedImageError):
        decode_image(data, max_pixels=10_000)


def test_truncated_image_is_refused() -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(encoded("JPEG", (200, 200))[:300], max_pixels=10**6)


def test_too_many_pixels_is_refused_before_decoding() -> None:
    # A 5000x5000 PNG of one colour compresses to a few kB: a small upload, a large image.
    with pytest.raises(ImageTooLargeError, match="5000x5000"):
        decode_image(encoded("PNG", (5000, 5000), mode="L"), max_pixels=1_000_000)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=64))
def test_sniffing_arbitrary_bytes_never_crashes(data: bytes) -> None:
    fmt = sniff_format(data)
    assert fmt in (None, "JPEG", "PNG", "WEBP")
    if fmt is None:
        with pytest.raises(UnsupportedImageError):
            decode_image(data, max_pixels=100)


def test_dataset_root_confinement(tmp_path: Path) -> None:
    root = tmp_path / "datasets"
    (root / "market" / "sub").mkdir(parents=True)
    outside = tmp_path / "private"
    outside.mkdir()
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "link-in").symlink_to(root / "market", target_is_directory=True)

    assert resolve_dataset_root(str(root / "market"), [root]) == (root / "market").resolve()
    assert resolve_dataset_root("market/sub", [root]) == (root / "market" / "sub").resolve()
    assert resolve_dataset_root(str(root / "link-in"), [root]) == (root / "market").resolve()
    for bad in (str(outside), str(root / "link-out"), str(root / "market" / ".." / ".." / "private"), "/etc"):
        with pytest.raises(DatasetPathForbiddenError):
            resolve_dataset_root(bad, [root])
    with pytest.raises(DatasetPathInvalidError):
        resolve_dataset_root(str(root / "missing"), [root])
    with pytest.raises(DatasetPathForbiddenError, match="--dataset-root"):
        resolve_dataset_root(str(root / "market"), [])


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.sampled_from(["a", "b", "..", ".", "link-out", "link-in"]), min_size=1, max_size=5))
def test_no_path_resolves_outside_the_roots(
    tmp_path_factory: pytest.TempPathFactory, parts: list[str]
) -> None:
    base = tmp_path_factory.getbasetemp() / "confine"
    root = base / "root"
    if not root.exists():
        (root / "a" / "b").mkdir(parents=True)
        (base / "secret").mkdir()
        (root / "link-out").symlink_to(base / "secret", target_is_directory=True)
        (root / "a" / "link-in").symlink_to(root / "a" / "b", target_is_directory=True)
    candidate = os.path.join(str(root), *parts)
    try:
        resolved = resolve_dataset_root(candidate, [root])
    except (DatasetPathForbiddenError, DatasetPathInvalidError):
        return
    assert resolved.is_relative_to(root.resolve()) and inside_roots(resolved, [root])
