"""Cameras of a synthetic dataset: background, viewpoint, scale, lighting, blur, noise, occlusion.

Each camera is a fixed draw from ``(seed, camera)``, so the same camera looks the same in every
image; each image then jitters around it. What makes cross-camera matching hard in real data is
reproduced on purpose: colour casts and gains that move an identity's colours, cluttered
backgrounds whose colours come from the same palettes as clothes and cars, occluders, blur and a
low-resolution camera.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Stream tags keep the random draws of different purposes independent of each other.
STREAM_CAMERA = 1
STREAM_IDENTITY = 2
STREAM_IMAGE = 3
STREAM_PLAN = 4
STREAM_EXTRA = 5

VIEWS = ("front", "back", "left", "right")

Colour = tuple[int, int, int]


def rng_for(seed: int, stream: int, *keys: int) -> np.random.Generator:
    """A generator determined by (seed, stream, keys): the same numbers on every machine.

    Keys may be -1 (junk images, strangers); the seed sequence only takes non-negative integers,
    hence the offset.
    """
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return np.random.default_rng([seed, stream, *(k + 1_000_000 for k in keys)])


def jitter_colour(colour: Colour, rng: np.random.Generator, amount: float) -> Colour:
    """``colour`` moved by up to ``amount`` per channel (an identity's own shade of a palette colour)."""
    moved = np.clip(np.asarray(colour, float) + rng.uniform(-amount, amount, 3), 0, 255)
    return (int(moved[0]), int(moved[1]), int(moved[2]))


def shade(colour: Colour, factor: float) -> Colour:
    """A darker (factor < 1) or lighter (> 1) version of ``colour``."""
    return (
        int(min(255, colour[0] * factor)),
        int(min(255, colour[1] * factor)),
        int(min(255, colour[2] * factor)),
    )


@dataclass(frozen=True)
class Camera:
    """One synthetic camera: where it looks from and what its pictures suffer from."""

    index: int
    view_weights: tuple[float, float, float, float]  # P(front, back, left, right)
    scale: float  # subject height (person) or width (vehicle) as a fraction of the image
    offset: tuple[float, float]  # mean subject shift (x, y) in pixels
    gains: tuple[float, float, float]  # per-channel colour cast times overall light level
    contrast: float
    blur: float  # Gaussian blur radius in pixels
    noise: float  # sensor noise standard deviation (0-255 scale)
    low_res: float  # 1.0 = full resolution; < 1 renders through a smaller image
    occlusion: float  # probability that an image is occluded
    occluder: str  # "pole" | "bottom" | "side" | "foliage"
    background: np.ndarray  # H' x W' x 3 uint8, larger than the image; each image crops it


def make_camera(
    seed: int, index: int, size: tuple[int, int], kind: str, allowed_views: tuple[str, ...]
) -> Camera:
    """Draw camera ``index`` of a dataset (``size`` is the image (height, width))."""
    rng = rng_for(seed, STREAM_CAMERA, index)
    dominant = rng.integers(len(allowed_views))
    weights = np.array([0.0 if v not in allowed_views else 1.0 for v in VIEWS])
    weights[VIEWS.index(allowed_views[dominant])] += rng.uniform(1.5, 4.0)
    weights /= weights.sum()
    light = rng.uniform(0.7, 1.2)
    cast = rng.uniform(0.86, 1.14, 3)
    cast /= cast.mean()
    low_res = 1.0 if rng.random() < 0.75 else float(rng.uniform(0.4, 0.6))
    return Camera(
        index=index,
        view_weights=(float(weights[0]), float(weights[1]), float(weights[2]), float(weights[3])),
        scale=float(rng.uniform(0.8, 0.94) if kind == "person" else rng.uniform(0.72, 0.92)),
        offset=(float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4))),
        gains=(float(light * cast[0]), float(light * cast[1]), float(light * cast[2])),
        contrast=float(rng.uniform(0.75, 1.1)),
        blur=float(rng.uniform(0.0, 1.0)),
        noise=float(rng.uniform(2.0, 9.0)),
        low_res=low_res,
        occlusion=float(rng.uniform(0.1, 0.35)),
        occluder=str(rng.choice(["pole", "bottom", "side", "foliage"])),
        background=_background(rng, size, kind),
    )


_WALL_TONES: tuple[Colour, ...] = (
    (150, 140, 125),
    (110, 115, 120),
    (170, 165, 150),
    (95, 85, 80),
    (130, 140, 130),
)
_GROUND_TONES: tuple[Colour, ...] = ((120, 120, 118), (90, 90, 95), (140, 130, 115), (75, 80, 75))
#: Colours of background clutter: deliberately the clothing/car palette, so colour alone misleads.
_CLUTTER_TONES: tuple[Colour, ...] = (
    (200, 40, 40),
    (40, 60, 140),
    (30, 30, 30),
    (230, 230, 225),
    (60, 120, 60),
    (200, 180, 60),
    (120, 80, 50),
)


def _background(rng: np.random.Generator, size: tuple[int, int], kind: str) -> np.ndarray:
    height, width = size
    # Much larger than one image, so that crops of the same camera differ.
    big_h, big_w = int(height * 2), int(width * 3)
    image = Image.new("RGB", (big_w, big_h), _WALL_TONES[rng.integers(len(_WALL_TONES))])
    draw = ImageDraw.Draw(image)
    horizon = int(big_h * rng.uniform(0.45, 0.75) if kind == "person" else big_h * rng.uniform(0.2, 0.45))
    ground = _GROUND_TONES[rng.integers(len(_GROUND_TONES))]
    draw.rectangle((0, horizon, big_w, big_h), fill=ground)
    style = rng.integers(3)
    if style == 0:  # shop fronts / panels: vertical blocks above the horizon
        x = 0
        while x < big_w:
            w = int(rng.integers(8, 30))
            draw.rectangle((x, 0, x + w - 2, horizon), fill=_clutter(rng, 0.8))
            x += w
    elif style == 1:  # tiles / lane markings on the ground
        step = int(rng.integers(6, 16))
        line = shade(ground, rng.uniform(0.6, 1.4))
        for y in range(horizon, big_h, step):
            draw.line((0, y, big_w, y), fill=line)
        for x in range(0, big_w, step * 2):
            draw.line((x, horizon, x - big_w // 4, big_h), fill=line)
    else:  # foliage / crowd blobs
        for _ in range(int(rng.integers(6, 16))):
            cx, cy = rng.integers(big_w), rng.integers(horizon)
            r = int(rng.integers(4, 14))
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_clutter(rng, 0.7))
    for _ in range(int(rng.integers(1, 4))):  # a few strong clutter objects anywhere
        x0, y0 = rng.integers(big_w), rng.integers(big_h)
        draw.rectangle((x0, y0, x0 + rng.integers(3, 12), y0 + rng.integers(6, 30)), fill=_clutter(rng, 1.0))
    array = np.asarray(image, dtype=np.float32)
    array += rng.normal(0.0, 6.0, array.shape).astype(np.float32)  # texture
    return np.clip(array, 0, 255).astype(np.uint8)


def _clutter(rng: np.random.Generator, strength: float) -> Colour:
    return shade(_CLUTTER_TONES[rng.integers(len(_CLUTTER_TONES))], rng.uniform(0.6, 1.0) * strength + 0.2)


def pick_view(camera: Camera, rng: np.random.Generator) -> str:
    return VIEWS[int(rng.choice(len(VIEWS), p=np.asarray(camera.view_weights)))]


def background_crop(camera: Camera, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random window of the camera's background, the size of one image."""
    height, width = size
    big_h, big_w = camera.background.shape[:2]
    y = int(rng.integers(0, big_h - height + 1))
    x = int(rng.integers(0, big_w - width + 1))
    image = Image.fromarray(camera.background[y : y + height, x : x + width]).convert("RGBA")
    # Passing clutter (other people's clothes, signs, cars) in the palette colours.
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        w, h = rng.uniform(0.1, 0.4) * width, rng.uniform(0.1, 0.5) * height
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=_clutter(rng, 1.0))
    return image


def draw_occluder(
    draw: ImageDraw.ImageDraw, camera: Camera, size: tuple[int, int], rng: np.random.Generator
) -> None:
    """Something between the camera and the subject: a pole, a bench, a passer-by, leaves."""
    height, width = size
    colour = _clutter(rng, 0.9)
    if camera.occluder == "pole":
        w = max(2, int(width * rng.uniform(0.06, 0.14)))
        x = int(rng.uniform(0.1, 0.9) * width)
        draw.rectangle((x, 0, x + w, height), fill=colour)
    elif camera.occluder == "bottom":
        top = int(height * rng.uniform(0.72, 0.88))
        draw.rectangle((0, top, width, height), fill=colour)
        draw.line((0, top, width, top), fill=shade(colour, 1.3), width=2)
    elif camera.occluder == "side":
        w = int(width * rng.uniform(0.2, 0.35))
        x0 = 0 if rng.random() < 0.5 else width - w
        draw.rounded_rectangle((x0, int(height * 0.15), x0 + w, height), radius=max(1, w // 3), fill=colour)
        draw.ellipse(
            (x0 + w // 4, int(height * 0.02), x0 + 3 * w // 4, int(height * 0.15)), fill=(190, 150, 120)
        )
    else:
        for _ in range(int(rng.integers(3, 7))):
            cx, cy = rng.uniform(0, width), rng.uniform(0.3 * height, height)
            r = rng.uniform(0.06, 0.14) * width
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=shade((60, 110, 50), rng.uniform(0.6, 1.2)))


def finish(image: Image.Image, camera: Camera, rng: np.random.Generator) -> Image.Image:
    """Apply the camera's light, colour cast, contrast, resolution, blur and noise to a rendering."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    if camera.low_res < 1.0:
        small = (max(8, int(width * camera.low_res)), max(8, int(height * camera.low_res)))
        rgb = rgb.resize(small, Image.Resampling.BILINEAR).resize((width, height), Image.Resampling.BILINEAR)
    blur = camera.blur + rng.uniform(0.0, 0.6)
    if blur > 0.25:
        rgb = rgb.filter(ImageFilter.GaussianBlur(blur))
    gains = np.asarray(camera.gains, dtype=np.float32) * np.float32(rng.uniform(0.88, 1.12))
    # ((x - 128) * contrast + 128) * gains, folded into one multiply and one add (this runs per image).
    scale = gains * np.float32(camera.contrast)
    shift = gains * np.float32(128.0 * (1.0 - camera.contrast))
    noise = rng.standard_normal((height, width, 3), dtype=np.float32)
    noise *= np.float32(camera.noise)
    noise += shift
    array = np.asarray(rgb, dtype=np.float32)
    array *= scale
    array += noise
    np.clip(array, 0, 255, out=array)
    return Image.fromarray(array.astype(np.uint8))
