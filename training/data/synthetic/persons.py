"""Procedurally drawn pedestrians: head, hair, hat, torso with a pattern, arms, legs, shoes, bags.

Identity attributes come from small palettes, so many identities share the colour of a shirt or
of trousers and differ in the combination and in details (a stripe, a logo that only shows from
the front, a backpack that only shows from the back, a hat, the shoes). Mean colour alone cannot
tell them apart; a model has to learn the parts and how they look from each side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

from training.data.synthetic.scene import Colour, jitter_colour

SKIN: tuple[Colour, ...] = ((235, 200, 170), (205, 160, 120), (160, 110, 75), (110, 75, 50))
HAIR: tuple[Colour, ...] = ((25, 20, 18), (70, 45, 30), (120, 85, 50), (200, 170, 110))
TOPS: tuple[Colour, ...] = (
    (235, 235, 230),  # white
    (30, 30, 32),  # black
    (120, 120, 125),  # grey
    (35, 45, 90),  # navy
    (180, 40, 40),  # red
    (50, 110, 60),  # green
    (60, 110, 185),  # blue
    (200, 180, 140),  # beige
)
#: Dark and neutral clothes are the most common, as in a real street: many identities share them.
TOP_WEIGHTS = (0.15, 0.2, 0.15, 0.15, 0.08, 0.07, 0.1, 0.1)
BOTTOMS: tuple[Colour, ...] = (
    (28, 28, 30),  # black
    (35, 45, 85),  # navy
    (70, 95, 140),  # jeans
    (110, 110, 115),  # grey
    (190, 170, 130),  # beige
    (90, 65, 45),  # brown
)
BOTTOM_WEIGHTS = (0.3, 0.2, 0.25, 0.12, 0.08, 0.05)
SHOES: tuple[Colour, ...] = ((25, 25, 25), (230, 230, 230), (100, 70, 45))
ACCENTS: tuple[Colour, ...] = ((220, 200, 50), (200, 60, 60), (235, 235, 235), (30, 30, 30), (60, 140, 200))
BAGS: tuple[Colour, ...] = ((30, 30, 30), (90, 60, 40), (150, 30, 30), (40, 60, 110), (130, 130, 130))

TOP_PATTERNS = ("plain", "hstripes", "vstripes", "check", "logo", "back_print", "two_tone")
BOTTOM_TYPES = ("trousers", "shorts", "skirt")
BAG_TYPES = ("none", "backpack", "shoulder", "handbag")
HATS = ("none", "cap", "beanie")

T = TypeVar("T")


@dataclass(frozen=True)
class PersonIdentity:
    """What one synthetic person looks like, whatever the camera."""

    skin: Colour
    hair: Colour
    long_hair: bool
    hat: str
    hat_colour: Colour
    top: Colour
    top_pattern: str
    accent: Colour
    long_sleeves: bool
    bottom: Colour
    bottom_type: str
    shoes: Colour
    bag: str
    bag_colour: Colour
    bag_side: int  # -1 left, +1 right (of the person)
    height: float  # relative body height
    build: float  # relative body width


def _pick(rng: np.random.Generator, options: Sequence[T], weights: Sequence[float] | None = None) -> T:
    """One of ``options``, uniformly or with the given relative weights."""
    if weights is None:
        return options[int(rng.integers(len(options)))]
    p = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def random_person(rng: np.random.Generator) -> PersonIdentity:
    """Draw one identity; each palette colour gets a small per-identity shift (its own shade), smaller
    than what cameras do to colours, so the shade alone does not identify anyone."""
    return PersonIdentity(
        skin=jitter_colour(_pick(rng, SKIN), rng, 8),
        hair=jitter_colour(_pick(rng, HAIR), rng, 8),
        long_hair=bool(rng.random() < 0.35),
        hat=_pick(rng, HATS, (0.7, 0.18, 0.12)),
        hat_colour=jitter_colour(_pick(rng, ACCENTS + BAGS), rng, 8),
        top=jitter_colour(_pick(rng, TOPS, TOP_WEIGHTS), rng, 4),
        top_pattern=_pick(rng, TOP_PATTERNS, (0.4, 0.12, 0.08, 0.08, 0.14, 0.1, 0.08)),
        accent=jitter_colour(_pick(rng, ACCENTS), rng, 4),
        long_sleeves=bool(rng.random() < 0.55),
        bottom=jitter_colour(_pick(rng, BOTTOMS, BOTTOM_WEIGHTS), rng, 4),
        bottom_type=_pick(rng, BOTTOM_TYPES, (0.7, 0.18, 0.12)),
        shoes=jitter_colour(_pick(rng, SHOES), rng, 8),
        bag=_pick(rng, BAG_TYPES, (0.4, 0.3, 0.2, 0.1)),
        bag_colour=jitter_colour(_pick(rng, BAGS), rng, 8),
        bag_side=1 if rng.random() < 0.5 else -1,
        height=float(rng.uniform(0.92, 1.06)),
        build=float(rng.uniform(0.85, 1.15)),
    )


def _limb(
    draw: ImageDraw.ImageDraw,
    pivot: tuple[float, float],
    length: float,
    width: float,
    angle: float,
    fill: Colour,
) -> tuple[float, float]:
    """A limb hanging from ``pivot`` rotated by ``angle`` radians (0 = straight down); returns its end."""
    dx, dy = math.sin(angle), math.cos(angle)
    px, py = -dy * width / 2, dx * width / 2
    end = (pivot[0] + dx * length, pivot[1] + dy * length)
    draw.polygon(
        [
            (pivot[0] + px, pivot[1] + py),
            (pivot[0] - px, pivot[1] - py),
            (end[0] - px, end[1] - py),
            (end[0] + px, end[1] + py),
        ],
        fill=fill,
    )
    return end


def draw_person(
    person: PersonIdentity,
    view: str,
    size: tuple[int, int],
    scale: float,
    offset: tuple[float, float],
    rng: np.random.Generator,
) -> Image.Image:
    """An RGBA layer (transparent around the person) of ``person`` seen from ``view``.

    Args:
        size: image (height, width).
        scale: person height as a fraction of the image height (before the identity's own height).
        offset: shift of the person's centre in pixels (x, y).
        rng: per-image generator: walking phase, arm swing, small pose changes.
    """
    height, width = size
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    fh = height * scale * person.height
    cx = width / 2 + offset[0]
    top = (height - fh) / 2 + offset[1]
    side = view in ("left", "right")
    facing = 1 if view == "right" else -1  # direction of the nose in a side view
    phase = rng.uniform(0, 2 * math.pi)
    stride = math.sin(phase) * rng.uniform(0.15, 0.45)

    shoulder_y, hip_y, foot_y = top + 0.15 * fh, top + 0.52 * fh, top + 0.96 * fh
    half = (0.1 if side else 0.15) * fh * person.build
    waist = half * 0.88
    leg_w = 0.1 * fh * person.build
    leg_len = foot_y - hip_y
    arm_len, arm_w = 0.34 * fh, 0.06 * fh * person.build

    # Legs (behind the torso): trousers, shorts (skin below the knee) or a skirt over bare legs.
    leg_colour = person.skin if person.bottom_type == "skirt" else person.bottom
    ends = []
    for k in (-1, 1):
        if side:
            pivot, angle = (cx, hip_y), k * stride * 0.9
        else:
            pivot, angle = (cx + k * waist * 0.5, hip_y), k * 0.04
        end = _limb(draw, pivot, leg_len, leg_w, angle, leg_colour)
        if person.bottom_type == "shorts":
            knee = (pivot[0] + (end[0] - pivot[0]) * 0.45, pivot[1] + (end[1] - pivot[1]) * 0.45)
            _limb(draw, knee, leg_len * 0.55, leg_w * 0.8, angle, person.skin)
        ends.append(end)
    for end in ends:
        fx = end[0] + (facing * 0.03 * fh if side else 0)
        draw.ellipse(
            (fx - leg_w * 0.75, end[1] - 0.02 * fh, fx + leg_w * 0.75, end[1] + 0.02 * fh), fill=person.shoes
        )

    # Backpack behind the body in a side view; across the back in a back view (drawn later).
    if person.bag == "backpack" and side:
        bx = cx - facing * (half + 0.05 * fh)
        draw.rounded_rectangle(
            (bx - 0.06 * fh, shoulder_y + 0.03 * fh, bx + 0.06 * fh, hip_y - 0.04 * fh),
            radius=2,
            fill=person.bag_colour,
        )

    # Torso: a trapezoid from the shoulders to the hips.
    torso = [(cx - half, shoulder_y), (cx + half, shoulder_y), (cx + waist, hip_y), (cx - waist, hip_y)]
    draw.polygon(torso, fill=person.top)
    _pattern(draw, person, view, cx, half, waist, shoulder_y, hip_y, fh)
    if person.bottom_type == "skirt":
        draw.polygon(
            [
                (cx - waist, hip_y - 1),
                (cx + waist, hip_y - 1),
                (cx + waist * 1.5, hip_y + 0.2 * fh),
                (cx - waist * 1.5, hip_y + 0.2 * fh),
            ],
            fill=person.bottom,
        )
    else:
        draw.rectangle((cx - waist, hip_y - 0.03 * fh, cx + waist, hip_y + 0.02 * fh), fill=person.bottom)

    # Bags seen from the front/back.
    if person.bag == "backpack" and view == "back":
        draw.rounded_rectangle(
            (cx - half * 0.75, shoulder_y + 0.04 * fh, cx + half * 0.75, hip_y - 0.03 * fh),
            radius=3,
            fill=person.bag_colour,
        )
    elif person.bag == "backpack" and view == "front":
        for k in (-1, 1):
            draw.line(
                (cx + k * half * 0.55, shoulder_y, cx + k * half * 0.5, hip_y - 0.12 * fh),
                fill=person.bag_colour,
                width=2,
            )
    elif person.bag == "shoulder" and not side:
        k = person.bag_side * (1 if view == "back" else -1)
        draw.line(
            (cx - k * half * 0.8, shoulder_y, cx + k * waist, hip_y - 0.02 * fh),
            fill=person.bag_colour,
            width=2,
        )

    # Arms: long sleeves in the shirt colour, short ones show skin; hands at the ends.
    sleeve = person.accent if person.top_pattern == "two_tone" else person.top
    arm_pivots = (
        [(cx, shoulder_y + 0.02 * fh)]
        if side
        else [(cx - half, shoulder_y + 0.02 * fh), (cx + half, shoulder_y + 0.02 * fh)]
    )
    for i, pivot in enumerate(arm_pivots):
        swing = -stride if side else (0.08 if i else -0.08)
        if person.long_sleeves:
            end = _limb(draw, pivot, arm_len, arm_w, swing, sleeve)
        else:
            mid = _limb(draw, pivot, arm_len * 0.4, arm_w * 1.1, swing, sleeve)
            end = _limb(draw, mid, arm_len * 0.6, arm_w * 0.85, swing, person.skin)
        draw.ellipse(
            (end[0] - arm_w * 0.6, end[1] - arm_w * 0.6, end[0] + arm_w * 0.6, end[1] + arm_w * 0.6),
            fill=person.skin,
        )
        carrying = person.bag == "handbag" or (person.bag == "shoulder" and side)
        # The person's right hand is on the image's left when they face the camera.
        image_side = -1 if i == 0 else 1
        holds = side or image_side == person.bag_side * (1 if view == "back" else -1)
        if carrying and holds:
            bw = 0.07 * fh
            draw.rounded_rectangle(
                (end[0] - bw, end[1] - bw * 0.6, end[0] + bw, end[1] + bw), radius=2, fill=person.bag_colour
            )

    # Head, hair, hat.
    head_r = 0.062 * fh
    hy = top + 0.075 * fh
    hx = cx + (facing * 0.01 * fh if side else 0)
    draw.rectangle(
        (cx - head_r * 0.35, hy + head_r * 0.6, cx + head_r * 0.35, shoulder_y + 1), fill=person.skin
    )
    draw.ellipse((hx - head_r * 0.85, hy - head_r, hx + head_r * 0.85, hy + head_r), fill=person.skin)
    if view == "back":
        draw.ellipse(
            (hx - head_r * 0.9, hy - head_r * 1.05, hx + head_r * 0.9, hy + head_r * 0.8), fill=person.hair
        )
    elif side:
        draw.pieslice(
            (hx - head_r * 0.9, hy - head_r * 1.05, hx + head_r * 0.9, hy + head_r * 0.9),
            90 if facing > 0 else -90,
            270 if facing > 0 else 90,
            fill=person.hair,
        )
    else:
        draw.chord(
            (hx - head_r * 0.9, hy - head_r * 1.05, hx + head_r * 0.9, hy + head_r * 0.3),
            180,
            360,
            fill=person.hair,
        )
    if person.long_hair and view != "front":
        draw.rectangle((hx - head_r * 0.8, hy, hx + head_r * 0.8, hy + head_r * 2.2), fill=person.hair)
    if person.hat == "cap":
        draw.chord(
            (hx - head_r, hy - head_r * 1.15, hx + head_r, hy + head_r * 0.2),
            180,
            360,
            fill=person.hat_colour,
        )
        brim = (hx + facing * head_r * 1.5) if side else hx
        draw.rectangle(
            (
                min(hx, brim) - (0 if side else head_r),
                hy - head_r * 0.45,
                max(hx, brim) + (0 if side else head_r),
                hy - head_r * 0.25,
            ),
            fill=person.hat_colour,
        )
    elif person.hat == "beanie":
        draw.chord(
            (hx - head_r, hy - head_r * 1.3, hx + head_r, hy + head_r * 0.1), 180, 360, fill=person.hat_colour
        )
    return layer


def _pattern(
    draw: ImageDraw.ImageDraw,
    person: PersonIdentity,
    view: str,
    cx: float,
    half: float,
    waist: float,
    y0: float,
    y1: float,
    fh: float,
) -> None:
    """The shirt's pattern, drawn inside the torso trapezoid (some only show from one side)."""
    pattern, accent = person.top_pattern, person.accent

    def edges(y: float) -> tuple[float, float]:
        t = (y - y0) / (y1 - y0)
        w = half + (waist - half) * t
        return cx - w, cx + w

    if pattern in ("hstripes", "check"):
        step = max(3.0, 0.05 * fh)
        y = y0 + step / 2
        while y + step / 2 <= y1:
            (l0, r0), (l1, r1) = edges(y), edges(y + step / 2)
            draw.polygon([(l0, y), (r0, y), (r1, y + step / 2), (l1, y + step / 2)], fill=accent)
            y += step
    if pattern in ("vstripes", "check"):
        step = max(3.0, 0.05 * fh)
        x = cx - waist + step / 2
        while x + step / 2 <= cx + waist:
            draw.rectangle((x, y0 + 1, x + step / 2 - 1, y1 - 1), fill=accent)
            x += step
    if pattern == "logo" and view == "front":
        r = 0.045 * fh
        draw.ellipse((cx - r, y0 + 0.09 * fh - r, cx + r, y0 + 0.09 * fh + r), fill=accent)
    if pattern == "back_print" and view == "back":
        draw.rectangle((cx - half * 0.55, y0 + 0.05 * fh, cx + half * 0.55, y0 + 0.2 * fh), fill=accent)
    if pattern == "two_tone":
        ym = (y0 + y1) / 2
        (l0, r0), (l1, r1) = edges(ym), edges(y1)
        draw.polygon([(l0, ym), (r0, ym), (r1, y1), (l1, y1)], fill=accent)
