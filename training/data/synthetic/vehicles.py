"""Procedurally drawn vehicles: body, cabin and windows, wheels, lights, grille, plate, stripes, racks.

As on real roads, a few models and colours are common (white, black and silver saloons), so many
identities share model and colour and differ only in details: windscreen stickers (visible from
the front only), a roof rack, a stripe, the rims, a spoiler, the plate colour. That is what
VehicleID calls "similar vehicles", and what a model has to learn to look at.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from training.data.synthetic.scene import Colour, jitter_colour, shade


@dataclass(frozen=True)
class VehicleModel:
    """A make/model: body type and proportions (fractions of the vehicle length in a side view)."""

    name: str
    body_type: str
    length: float  # relative to the other models
    body_h: float  # lower body height / length
    cabin_h: float  # cabin height / length
    cabin: tuple[float, float, float, float]  # cabin outline x: rear-bottom... as fractions from the front
    lights: str  # "rect" | "round" | "slim"
    grille: str  # "bars" | "mesh" | "slot"


BODY_TYPES = ("sedan", "suv", "van", "hatchback", "mpv", "pickup", "estate")

MODELS: tuple[VehicleModel, ...] = (
    VehicleModel("saloon-a", "sedan", 1.0, 0.22, 0.17, (0.20, 0.36, 0.64, 0.80), "rect", "bars"),
    VehicleModel("saloon-b", "sedan", 1.0, 0.21, 0.16, (0.18, 0.34, 0.62, 0.78), "slim", "mesh"),
    VehicleModel("saloon-c", "sedan", 0.97, 0.23, 0.17, (0.22, 0.36, 0.66, 0.80), "round", "slot"),
    VehicleModel("hatch-a", "hatchback", 0.85, 0.24, 0.19, (0.24, 0.38, 0.88, 0.95), "round", "mesh"),
    VehicleModel("hatch-b", "hatchback", 0.88, 0.25, 0.18, (0.22, 0.35, 0.86, 0.94), "rect", "slot"),
    VehicleModel("suv-a", "suv", 0.96, 0.30, 0.20, (0.20, 0.30, 0.92, 0.96), "rect", "bars"),
    VehicleModel("suv-b", "suv", 0.98, 0.32, 0.19, (0.18, 0.30, 0.90, 0.95), "slim", "mesh"),
    VehicleModel("van", "van", 0.95, 0.28, 0.30, (0.06, 0.16, 0.97, 0.99), "rect", "slot"),
    VehicleModel("pickup", "pickup", 1.0, 0.28, 0.20, (0.20, 0.32, 0.55, 0.58), "round", "bars"),
    VehicleModel("estate", "estate", 1.0, 0.22, 0.17, (0.20, 0.34, 0.93, 0.96), "slim", "bars"),
    VehicleModel("mpv", "mpv", 0.95, 0.27, 0.24, (0.12, 0.26, 0.94, 0.97), "round", "mesh"),
)
#: Common models are drawn more often, like best-sellers on a real road.
MODEL_WEIGHTS = (0.18, 0.14, 0.1, 0.1, 0.08, 0.1, 0.06, 0.06, 0.05, 0.07, 0.06)

COLOUR_NAMES = ("white", "black", "silver", "grey", "red", "blue", "navy", "yellow", "green", "brown")
COLOURS: tuple[Colour, ...] = (
    (232, 232, 228),
    (28, 28, 30),
    (178, 180, 184),
    (110, 112, 116),
    (170, 30, 30),
    (40, 80, 160),
    (30, 40, 80),
    (220, 190, 40),
    (40, 100, 60),
    (110, 75, 45),
)
COLOUR_WEIGHTS = (0.24, 0.2, 0.14, 0.1, 0.08, 0.08, 0.05, 0.04, 0.04, 0.03)
RIMS: tuple[Colour, ...] = ((190, 190, 195), (40, 40, 40), (200, 170, 90))
STICKERS: tuple[Colour, ...] = ((60, 160, 80), (220, 220, 80), (230, 230, 230), (200, 80, 60), (80, 140, 220))
PLATES: tuple[Colour, ...] = ((30, 60, 160), (220, 190, 40))


@dataclass(frozen=True)
class VehicleIdentity:
    """What one synthetic vehicle looks like, whatever the camera."""

    model: int  # index into MODELS
    colour: int  # index into COLOURS
    body: Colour
    roof: Colour
    tint: Colour
    rims: Colour
    bumper: Colour
    plate: Colour
    roof_rack: bool
    spoiler: bool
    sunroof: bool
    stripes: int  # 0, 1 or 2
    stripe_colour: Colour
    stickers: tuple[tuple[float, float, float, Colour], ...]  # (x, y, size) in windscreen fractions


def random_vehicle(rng: np.random.Generator) -> VehicleIdentity:
    """Draw one identity: a model and a colour (both skewed to the common ones), then details."""
    model = int(rng.choice(len(MODELS), p=np.asarray(MODEL_WEIGHTS) / sum(MODEL_WEIGHTS)))
    colour = int(rng.choice(len(COLOURS), p=np.asarray(COLOUR_WEIGHTS) / sum(COLOUR_WEIGHTS)))
    body = jitter_colour(COLOURS[colour], rng, 7)
    two_tone = rng.random() < 0.1
    stickers = tuple(
        (
            float(rng.uniform(0.05, 0.85)),
            float(rng.uniform(0.05, 0.6)),
            float(rng.uniform(0.08, 0.16)),
            STICKERS[int(rng.integers(len(STICKERS)))],
        )
        for _ in range(int(rng.choice(4, p=[0.3, 0.35, 0.25, 0.1])))
    )
    return VehicleIdentity(
        model=model,
        colour=colour,
        body=body,
        roof=(COLOURS[1] if colour != 1 else COLOURS[0]) if two_tone else body,
        tint=shade((40, 50, 60), rng.uniform(0.5, 1.6)),
        rims=RIMS[int(rng.integers(len(RIMS)))],
        bumper=(35, 35, 35) if rng.random() < 0.35 else shade(body, 0.85),
        plate=PLATES[0] if rng.random() < 0.8 else PLATES[1],
        roof_rack=bool(rng.random() < 0.2),
        spoiler=bool(rng.random() < 0.12),
        sunroof=bool(rng.random() < 0.15),
        stripes=int(rng.choice(3, p=[0.78, 0.12, 0.1])),
        stripe_colour=jitter_colour(STICKERS[int(rng.integers(len(STICKERS)))], rng, 10),
        stickers=stickers,
    )


def draw_vehicle(
    vehicle: VehicleIdentity,
    view: str,
    size: tuple[int, int],
    scale: float,
    offset: tuple[float, float],
    rng: np.random.Generator,
) -> Image.Image:
    """An RGBA layer (transparent around the vehicle) of ``vehicle`` seen from ``view``.

    Args:
        size: image (height, width).
        scale: vehicle length (side view) as a fraction of the image width.
        offset: shift of the vehicle's centre in pixels (x, y).
        rng: per-image generator (small changes of aspect: perspective is never quite the same).
    """
    height, width = size
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    model = MODELS[vehicle.model]
    aspect = rng.uniform(0.95, 1.05)
    cx, cy = width / 2 + offset[0], height / 2 + offset[1]
    if view in ("left", "right"):
        length = width * scale * model.length
        _side(draw, vehicle, model, cx, cy, length, aspect)
        if view == "left":
            layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        span = width * scale * 0.72 * (0.95 + 0.1 * model.body_h / 0.3)
        _end(draw, vehicle, model, cx, cy, span, aspect, front=view == "front")
    return layer


def _side(
    draw: ImageDraw.ImageDraw,
    v: VehicleIdentity,
    m: VehicleModel,
    cx: float,
    cy: float,
    length: float,
    aspect: float,
) -> None:
    """Side view, facing right."""
    x_front, x_rear = cx + length / 2, cx - length / 2
    wheel_r = 0.09 * length
    ground = cy + (m.body_h + m.cabin_h) * length * aspect / 2 + wheel_r * 0.4
    body_bottom = ground - wheel_r * 0.6
    body_top = body_bottom - m.body_h * length * aspect
    roof_y = body_top - m.cabin_h * length * aspect

    def at(fraction_from_front: float) -> float:
        return x_front - fraction_from_front * length

    draw.rounded_rectangle(
        (x_rear, body_top, x_front, body_bottom), radius=max(1, int(0.05 * length)), fill=v.body
    )
    a, b, c, d = m.cabin
    cabin = [(at(a), body_top + 1), (at(b), roof_y), (at(c), roof_y), (at(d), body_top + 1)]
    draw.polygon(cabin, fill=v.roof)
    inset = 0.025 * length
    window = [
        (at(a) - inset * 1.6, body_top - 1),
        (at(b) - inset, roof_y + inset),
        (at(c) + inset, roof_y + inset),
        (at(d) + inset * 1.2, body_top - 1),
    ]
    draw.polygon(window, fill=v.tint)
    pillar = at((b + c) / 2)
    draw.rectangle((pillar - inset * 0.6, roof_y, pillar + inset * 0.6, body_top), fill=v.roof)
    if m.body_type == "pickup":  # open bed behind the cab
        draw.rectangle((x_rear, body_top - 0.05 * length, at(0.62), body_top), fill=shade(v.body, 0.8))
    if v.stripes:
        band = 0.03 * length
        for k in range(v.stripes):
            y = body_top + (0.35 + 0.25 * k) * (body_bottom - body_top)
            draw.rectangle((x_rear + 2, y, x_front - 2, y + band), fill=v.stripe_colour)
    draw.line((at(b + 0.05), body_top + 2, at(b + 0.05), body_bottom - 2), fill=shade(v.body, 0.6))
    draw.line((at(0.02), body_bottom - 2, at(0.98), body_bottom - 2), fill=v.bumper, width=2)
    if v.roof_rack:
        draw.line((at(b), roof_y - 0.03 * length, at(c), roof_y - 0.03 * length), fill=(50, 50, 50), width=2)
        for x in (at(b) - 2, at(c) + 2):
            draw.line((x, roof_y, x, roof_y - 0.03 * length), fill=(50, 50, 50))
    if v.sunroof:
        draw.line((at(b) - 4, roof_y, at(b) - 0.15 * length, roof_y), fill=(20, 20, 20), width=2)
    if v.spoiler:
        draw.rectangle(
            (
                at(d) + 0.01 * length,
                body_top - 0.03 * length,
                at(d) + 0.08 * length,
                body_top - 0.01 * length,
            ),
            fill=(25, 25, 25),
        )
    light_h = 0.05 * length
    draw.rectangle(
        (x_front - 0.04 * length, body_top + 2, x_front - 1, body_top + 2 + light_h), fill=(235, 235, 210)
    )
    draw.rectangle(
        (x_rear + 1, body_top + 2, x_rear + 0.035 * length, body_top + 2 + light_h), fill=(190, 30, 30)
    )
    draw.polygon(
        [
            (at(a) - 1, body_top),
            (at(a) + 0.04 * length, body_top - 0.03 * length),
            (at(a) + 0.04 * length, body_top),
        ],
        fill=v.bumper,
    )
    for x in (at(0.18), at(0.8)):
        draw.ellipse((x - wheel_r, ground - 2 * wheel_r, x + wheel_r, ground), fill=(22, 22, 22))
        rim = wheel_r * 0.55
        draw.ellipse((x - rim, ground - wheel_r - rim, x + rim, ground - wheel_r + rim), fill=v.rims)


def _end(
    draw: ImageDraw.ImageDraw,
    v: VehicleIdentity,
    m: VehicleModel,
    cx: float,
    cy: float,
    span: float,
    aspect: float,
    *,
    front: bool,
) -> None:
    """Front or rear view: the vehicle's width is ``span`` pixels."""
    body_h = m.body_h * 1.5 * span * aspect
    cabin_h = m.cabin_h * 1.7 * span * aspect
    wheel_h = 0.12 * span
    bottom = cy + (body_h + cabin_h) / 2
    body_top = bottom - body_h
    roof_y = body_top - cabin_h
    left, right = cx - span / 2, cx + span / 2
    for x in (left + 0.04 * span, right - 0.2 * span):
        draw.rectangle((x, bottom - 2, x + 0.16 * span, bottom + wheel_h), fill=(22, 22, 22))
    draw.rounded_rectangle((left, body_top, right, bottom), radius=max(1, int(0.06 * span)), fill=v.body)
    top_half = 0.31 * span
    cabin = [
        (cx - 0.44 * span, body_top + 1),
        (cx - top_half, roof_y),
        (cx + top_half, roof_y),
        (cx + 0.44 * span, body_top + 1),
    ]
    draw.polygon(cabin, fill=v.roof)
    inset = 0.04 * span
    glass = [
        (cx - 0.44 * span + inset, body_top - 1),
        (cx - top_half + inset * 0.7, roof_y + inset),
        (cx + top_half - inset * 0.7, roof_y + inset),
        (cx + 0.44 * span - inset, body_top - 1),
    ]
    draw.polygon(glass, fill=v.tint)
    if front:
        # Windscreen stickers: the fine detail that tells two identical cars apart from the front.
        g_left, g_top = cx - 0.4 * span, roof_y + inset
        g_w, g_h = 0.8 * span, body_top - roof_y - 2 * inset
        for x, y, s, colour in v.stickers:
            side = max(2.0, s * g_w * 0.5)
            x0, y0 = g_left + x * g_w, g_top + y * g_h
            draw.rectangle((x0, y0, x0 + side, y0 + side), fill=colour)
        for k in (-1, 1):  # mirrors
            draw.rectangle(
                (cx + k * 0.5 * span - 3, body_top - 0.06 * span, cx + k * 0.5 * span + 3, body_top),
                fill=v.bumper,
            )
    elif v.spoiler:
        draw.rectangle((cx - top_half, roof_y - 0.04 * span, cx + top_half, roof_y), fill=(25, 25, 25))
    if v.roof_rack:
        draw.line(
            (cx - top_half, roof_y - 0.05 * span, cx + top_half, roof_y - 0.05 * span),
            fill=(50, 50, 50),
            width=2,
        )
    for k in range(v.stripes):
        x = cx + (k - (v.stripes - 1) / 2) * 0.12 * span
        draw.rectangle(
            (x - 0.035 * span, body_top + 1, x + 0.035 * span, bottom - body_h * 0.35), fill=v.stripe_colour
        )
    # Lights: white/amber at the front, red at the rear, in the model's shape.
    lamp = (235, 235, 210) if front else (190, 30, 30)
    ly0 = body_top + body_h * 0.15
    for k in (-1, 1):
        outer, inner = cx + k * 0.46 * span, cx + k * 0.27 * span
        x0, x1 = min(outer, inner), max(outer, inner)
        if m.lights == "round":
            draw.ellipse((x0 + 2, ly0, x1 - 2, ly0 + body_h * 0.3), fill=lamp)
        elif m.lights == "slim":
            draw.rectangle((x0, ly0, x1, ly0 + body_h * 0.12), fill=lamp)
        else:
            draw.rectangle((x0, ly0, x1, ly0 + body_h * 0.24), fill=lamp)
    if front:
        g0, g1 = cx - 0.22 * span, cx + 0.22 * span
        if m.grille == "bars":
            for i in range(3):
                y = ly0 + i * body_h * 0.1
                draw.line((g0, y, g1, y), fill=(40, 40, 40), width=2)
        elif m.grille == "mesh":
            draw.rectangle((g0, ly0, g1, ly0 + body_h * 0.3), fill=(45, 45, 45))
        else:
            draw.rectangle((g0, ly0 + body_h * 0.08, g1, ly0 + body_h * 0.16), fill=(30, 30, 30))
    draw.rectangle((left + 2, bottom - body_h * 0.25, right - 2, bottom), fill=v.bumper)
    plate_w, plate_h = 0.24 * span, 0.16 * body_h + 2
    py = bottom - body_h * 0.42
    draw.rectangle((cx - plate_w / 2, py, cx + plate_w / 2, py + plate_h), fill=v.plate)
    draw.line(
        (cx - plate_w * 0.35, py + plate_h / 2, cx + plate_w * 0.35, py + plate_h / 2), fill=(225, 225, 225)
    )
