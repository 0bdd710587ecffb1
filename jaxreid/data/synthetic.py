"""Synthetic person re-identification data in the Market-1501 layout (CPU demo).

Little pedestrians are drawn procedurally with PIL: head, hair, torso, arms, legs and
optional accessories, with identity-specific clothing colours, patterns, sleeve/trouser
lengths, body proportions and accessories sampled from deliberately small palettes so that
many identities share attributes. Every camera has its own scene (textured background with
clutter), colour cast, brightness/contrast, blur, resolution and noise, and each image adds
viewpoint/pose jitter and sometimes an occluder. The camera style dominates raw pixels (as in
real ReID): same-camera images of different people look more alike than one person seen by two
cameras, so raw-pixel retrieval is weak while a learned, camera-invariant feature can do well.

`generate(root, ...)` writes

    root/bounding_box_train/0001_c1s1_000151_01.jpg   (train identities)
    root/query/...                                    (one image per test identity and camera)
    root/bounding_box_test/...                        (rest of the test images, plus
                                                       distractors "0000_..." and junk "-1_...")
    root/synthetic.json                               (parameters and counts)

deterministically from `seed`, atomically (built in a temporary folder beside `root`, then
renamed) and idempotently (an existing folder with the same parameters is reused).

Only NumPy and PIL are used, so data can be generated without jax:
    python -m jaxreid.data.synthetic --root /tmp/synthetic_reid
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFilter

from jaxreid.command_line import parse, run

# Bump whenever the rendering or the sampling changes, so that a cached folder made by an older
# generator is reported as a mismatch instead of being silently reused.
GENERATOR_VERSION = 1
METADATA_FILE = "synthetic.json"
SPLITS = ("bounding_box_train", "query", "bounding_box_test")

# Default CPU-demo set: 300 identities (150 train / 150 test), 6 cameras, each identity in
# 2-6 of them (4 on average) with 3 images per camera: ~1,800 train images, ~600 queries and
# ~1,200 gallery images, generated in well under 30 s on two cores.
DEFAULT_SYNTHETIC: dict[str, Any] = dict(
    num_ids=300,
    num_cameras=6,
    images_per_id_per_camera=3,
    seed=0,
    height=128,
    width=64,
    train_fraction=0.5,
    num_distractors=60,
    num_junk=20,
    occlusion_prob=0.2,
    jpeg_quality=92,
)

_SUPERSAMPLE = 2  # draw at 2x and downsample: cheap anti-aliasing for PIL's hard-edged shapes

# Small palettes on purpose: identities collide on single attributes and differ in combinations.
_UPPER_COLOURS = np.array(
    [
        (225, 225, 220),  # white
        (35, 35, 40),  # black
        (125, 125, 130),  # grey
        (180, 35, 40),  # red
        (40, 75, 165),  # blue
        (35, 45, 85),  # navy
        (50, 125, 65),  # green
        (225, 195, 60),  # yellow
        (225, 145, 175),  # pink
        (125, 80, 50),  # brown
        (230, 120, 40),  # orange
        (110, 60, 140),  # purple
    ],
    np.float32,
)
_LOWER_COLOURS = np.array(
    [
        (30, 30, 35),  # black
        (55, 75, 120),  # denim
        (115, 115, 120),  # grey
        (185, 165, 115),  # khaki
        (215, 215, 210),  # white
        (100, 70, 45),  # brown
        (35, 45, 80),  # navy
    ],
    np.float32,
)
_SKIN_COLOURS = np.array(
    [(240, 205, 175), (220, 175, 135), (175, 125, 85), (110, 75, 50)], np.float32
)
_HAIR_COLOURS = np.array([(25, 20, 20), (90, 60, 35), (200, 170, 100), (150, 150, 150)], np.float32)
_SHOE_COLOURS = np.array([(30, 30, 30), (230, 230, 230), (110, 70, 45)], np.float32)
PATTERNS = ("plain", "hstripes", "vstripes", "checks", "logo")
ACCESSORIES = ("none", "bag", "hat", "backpack", "scarf")
_PATTERN_PROBS = (0.4, 0.15, 0.15, 0.15, 0.15)
_ACCESSORY_PROBS = (0.35, 0.2, 0.15, 0.15, 0.15)

# Random streams are keyed by purpose so that, e.g., identity k looks the same whatever the
# number of cameras or images (each stream is np.random.default_rng([seed, purpose, ...])).
_STREAM_IDENTITY, _STREAM_CAMERA, _STREAM_IMAGE, _STREAM_LAYOUT, _STREAM_EXTRA = range(5)


@dataclasses.dataclass(frozen=True)
class Identity:
    """What stays fixed for one person across cameras (colours are RGB floats)."""

    upper: tuple[float, float, float]
    lower: tuple[float, float, float]
    pattern: str
    pattern_colour: tuple[float, float, float]
    long_sleeves: bool
    long_trousers: bool
    skin: tuple[float, float, float]
    hair: tuple[float, float, float]
    long_hair: bool
    shoes: tuple[float, float, float]
    accessory: str
    accessory_colour: tuple[float, float, float]
    width_scale: float  # body width relative to the average
    height_scale: float  # body height relative to the canvas


@dataclasses.dataclass(frozen=True)
class CameraStyle:
    """What one camera does to every image it sees."""

    background: np.ndarray  # (H, PANORAMA * W, 3) uint8 scene at supersampled resolution
    clutter_colours: np.ndarray  # (K, 3) colours of scene objects, reused for occluders
    gains: tuple[float, float, float]  # per-channel colour cast
    brightness: float  # added after gains, in pixel units
    contrast: float  # scales around mid-grey
    saturation: float  # 0 = greyscale, 1 = unchanged
    blur: float  # GaussianBlur radius at output resolution
    low_res: float  # downsample factor before the blur (1 = none)
    noise: float  # per-pixel Gaussian noise std


_PANORAMA = 3  # the camera scene is 3 canvases wide; each image sees a random window of it


def _jitter_colour(rng: np.random.Generator, colour: np.ndarray, amount: float) -> tuple:
    return tuple(float(c) for c in np.clip(colour + rng.normal(0, amount, 3), 0, 255))


def sample_identity(seed: int, pid: int) -> Identity:
    """Attributes of identity `pid` (deterministic in (seed, pid))."""
    rng = np.random.default_rng([seed, _STREAM_IDENTITY, pid])
    upper_idx = rng.integers(len(_UPPER_COLOURS))
    # The pattern colour differs from the base colour, otherwise the pattern is invisible.
    pattern_idx = (upper_idx + rng.integers(1, len(_UPPER_COLOURS))) % len(_UPPER_COLOURS)
    return Identity(
        upper=_jitter_colour(rng, _UPPER_COLOURS[upper_idx], 8.0),
        lower=_jitter_colour(rng, _LOWER_COLOURS[rng.integers(len(_LOWER_COLOURS))], 8.0),
        pattern=str(rng.choice(PATTERNS, p=_PATTERN_PROBS)),
        pattern_colour=_jitter_colour(rng, _UPPER_COLOURS[pattern_idx], 8.0),
        long_sleeves=bool(rng.random() < 0.6),
        long_trousers=bool(rng.random() < 0.7),
        skin=_jitter_colour(rng, _SKIN_COLOURS[rng.integers(len(_SKIN_COLOURS))], 6.0),
        hair=_jitter_colour(rng, _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))], 6.0),
        long_hair=bool(rng.random() < 0.3),
        shoes=_jitter_colour(rng, _SHOE_COLOURS[rng.integers(len(_SHOE_COLOURS))], 6.0),
        accessory=str(rng.choice(ACCESSORIES, p=_ACCESSORY_PROBS)),
        accessory_colour=_jitter_colour(
            rng, _UPPER_COLOURS[rng.integers(len(_UPPER_COLOURS))], 8.0
        ),
        width_scale=float(rng.uniform(0.82, 1.2)),
        height_scale=float(rng.uniform(0.85, 0.95)),
    )


def _draw_background(rng: np.random.Generator, height: int, width: int) -> tuple:
    """A camera scene: wall/floor gradient, a texture, and clutter objects."""
    # Mostly desaturated scene colours (walls, pavement) with a tint.
    wall_top, wall_bottom, floor = rng.uniform(70, 190, (3, 1)) + rng.normal(0, 15, (3, 3))
    horizon = int(height * rng.uniform(0.45, 0.8))
    ys = np.arange(height, dtype=np.float32)[:, None]
    t = np.clip(ys / max(horizon, 1), 0, 1)
    img = (1 - t) * wall_top + t * wall_bottom
    floor_t = np.clip((ys - horizon) / max(height - horizon, 1), 0, 1)
    img = np.where(ys < horizon, img, floor * (0.85 + 0.3 * floor_t))
    img = np.broadcast_to(img[:, None, :], (height, width, 3)).copy()

    # Texture: bricks/tiles/stripes on the wall so backgrounds are not flat.
    texture = rng.integers(4)
    period = int(rng.integers(10, 28))
    strength = rng.uniform(8, 25)
    yy, xx = np.mgrid[0:height, 0:width]
    if texture == 0:  # vertical stripes
        mask = (xx // period) % 2 == 0
    elif texture == 1:  # horizontal stripes
        mask = (yy // period) % 2 == 0
    elif texture == 2:  # tiles
        mask = ((xx // period) + (yy // period)) % 2 == 0
    else:  # bricks: offset every other row
        row = yy // period
        mask = ((xx + (row % 2) * period // 2) // period + row) % 2 == 0
    img[mask & (yy < horizon)] += strength
    img[mask & (yy >= horizon)] -= strength / 2

    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    clutter_colours = np.clip(rng.uniform(30, 220, (4, 1)) + rng.normal(0, 40, (4, 3)), 0, 255)
    for _ in range(int(rng.integers(6, 12))):
        colour = tuple(int(c) for c in clutter_colours[rng.integers(len(clutter_colours))])
        kind = rng.integers(3)
        x0 = rng.uniform(0, width)
        if kind == 0:  # pole / door frame
            w = rng.uniform(0.02, 0.08) * width / _PANORAMA
            draw.rectangle([x0, 0, x0 + w, horizon + rng.uniform(0, height - horizon)], colour)
        elif kind == 1:  # box / bench / sign standing on the floor
            w = rng.uniform(0.1, 0.35) * width / _PANORAMA
            h = rng.uniform(0.08, 0.3) * height
            y1 = horizon + rng.uniform(0, 0.5) * (height - horizon)
            draw.rectangle([x0, y1 - h, x0 + w, y1], colour)
        else:  # window / plant
            r = rng.uniform(0.05, 0.15) * height
            y = rng.uniform(0.1, 0.6) * horizon
            draw.ellipse([x0 - r / 2, y - r, x0 + r / 2, y + r], colour)
    return np.asarray(canvas), clutter_colours


def sample_camera(seed: int, camera: int, height: int = 128, width: int = 64) -> CameraStyle:
    """Style of camera `camera` (0-based; deterministic in (seed, camera))."""
    rng = np.random.default_rng([seed, _STREAM_CAMERA, camera])
    s = _SUPERSAMPLE
    background, clutter = _draw_background(rng, height * s, width * s * _PANORAMA)
    return CameraStyle(
        background=background,
        clutter_colours=clutter,
        gains=tuple(float(g) for g in rng.uniform(0.85, 1.15, 3)),
        brightness=float(rng.uniform(-20, 20)),
        contrast=float(rng.uniform(0.8, 1.15)),
        saturation=float(rng.uniform(0.7, 1.15)),
        blur=float(rng.choice([0.0, 0.5, 0.9, 1.3])),
        low_res=float(rng.choice([1.0, 1.0, 1.6, 2.2])),
        noise=float(rng.uniform(2, 9)),
    )


def _rgb(colour: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(round(c)) for c in colour)  # type: ignore[return-value]


def _limb(draw: ImageDraw.ImageDraw, p0, p1, w0: float, w1: float, colour) -> None:
    """A tapered thick segment from p0 to p1 with rounded ends."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    norm = max(np.hypot(dx, dy), 1e-6)
    nx, ny = -dy / norm, dx / norm
    draw.polygon(
        [
            (x0 + nx * w0 / 2, y0 + ny * w0 / 2),
            (x1 + nx * w1 / 2, y1 + ny * w1 / 2),
            (x1 - nx * w1 / 2, y1 - ny * w1 / 2),
            (x0 - nx * w0 / 2, y0 - ny * w0 / 2),
        ],
        fill=colour,
    )
    for (x, y), w in (((x0, y0), w0), ((x1, y1), w1)):
        draw.ellipse([x - w / 2, y - w / 2, x + w / 2, y + w / 2], fill=colour)


def _draw_person(
    draw: ImageDraw.ImageDraw,
    ident: Identity,
    cx: float,
    feet_y: float,
    body_h: float,
    mirror: bool,
    stride: float,
    arm_swing: float,
) -> None:
    """Draw `ident` standing on `feet_y`, centred on `cx`, `body_h` pixels tall."""
    side = -1.0 if mirror else 1.0  # mirror = seen from the other side: accessories swap sides
    top = feet_y - body_h

    def pt(dx: float, fy: float) -> tuple[float, float]:
        # dx in units of body height (positive = the identity's "right" side), fy from the top.
        return cx + side * dx * body_h, top + fy * body_h

    def box(dx0, fy0, dx1, fy1):
        (xa, ya), (xb, yb) = pt(dx0, fy0), pt(dx1, fy1)
        return [min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb)]

    ws = ident.width_scale
    upper, lower, skin = _rgb(ident.upper), _rgb(ident.lower), _rgb(ident.skin)
    hair, shoes, acc = _rgb(ident.hair), _rgb(ident.shoes), _rgb(ident.accessory_colour)
    half_torso = 0.13 * ws
    hip_y, knee_y, ankle_y = 0.52, 0.75, 0.95
    shoulder_y, elbow_y, wrist_y = 0.2, 0.36, 0.5

    # Backpack body sits behind the torso: visible as a block on one side.
    if ident.accessory == "backpack":
        draw.rectangle(box(0.02, 0.2, half_torso + 0.06, 0.45), fill=acc)
    if ident.long_hair:
        draw.rectangle(box(-0.065, 0.05, 0.065, 0.24), fill=hair)

    # Legs: stride swings the feet apart (pose change between frames).
    leg_w = 0.085 * ws * body_h
    for leg_side, swing in ((-1.0, stride), (1.0, -stride)):
        hip = pt(leg_side * 0.055 * ws, hip_y)
        knee = pt(leg_side * 0.055 * ws + swing * 0.5, knee_y)
        ankle = pt(leg_side * 0.05 * ws + swing, ankle_y)
        _limb(draw, hip, knee, leg_w, leg_w * 0.9, lower)
        _limb(draw, knee, ankle, leg_w * 0.9, leg_w * 0.75, lower if ident.long_trousers else skin)
        if not ident.long_trousers:  # shorts end just below the hip-knee midpoint
            _limb(draw, hip, pt(leg_side * 0.055 * ws + swing * 0.35, 0.68), leg_w, leg_w, lower)
        foot = pt(leg_side * 0.05 * ws + swing + 0.03, 0.985)
        _limb(draw, ankle, foot, leg_w * 0.7, leg_w * 0.6, shoes)

    # Arms, behind the torso edges, swinging opposite to the legs.
    arm_w = 0.06 * ws * body_h
    for arm_side, swing in ((-1.0, -arm_swing), (1.0, arm_swing)):
        shoulder = pt(arm_side * (half_torso - 0.02), shoulder_y + 0.02)
        elbow = pt(arm_side * (half_torso + 0.015) + swing * 0.5, elbow_y)
        wrist = pt(arm_side * (half_torso + 0.02) + swing, wrist_y)
        _limb(draw, shoulder, elbow, arm_w, arm_w * 0.9, upper)
        _limb(draw, elbow, wrist, arm_w * 0.9, arm_w * 0.75, upper if ident.long_sleeves else skin)
        hand = pt(arm_side * (half_torso + 0.02) + swing * 1.1, wrist_y + 0.035)
        _limb(draw, wrist, hand, arm_w * 0.75, arm_w * 0.7, skin)

    # Torso: a slightly tapered polygon from shoulders to hips.
    torso = [
        pt(-half_torso, shoulder_y),
        pt(half_torso, shoulder_y),
        pt(half_torso * 0.88, hip_y),
        pt(-half_torso * 0.88, hip_y),
    ]
    draw.polygon(torso, fill=upper)
    _draw_pattern(draw, ident, box(-half_torso, shoulder_y, half_torso, hip_y), body_h)

    # Neck, head, hair.
    draw.rectangle(box(-0.025, 0.14, 0.025, 0.2), fill=skin)
    head = box(-0.06, 0.025, 0.06, 0.16)
    draw.ellipse(head, fill=skin)
    hx0, hy0, hx1, hy1 = head
    draw.chord([hx0, hy0 - 1, hx1, hy1 - (hy1 - hy0) * 0.2], 180, 360, fill=hair)

    if ident.accessory == "hat":
        draw.rectangle(box(-0.085, 0.06, 0.085, 0.075), fill=acc)  # brim
        draw.chord(box(-0.065, 0.0, 0.065, 0.12), 180, 360, fill=acc)
    elif ident.accessory == "scarf":
        draw.rectangle(box(-0.07, 0.16, 0.07, 0.215), fill=acc)
        draw.rectangle(box(0.02, 0.2, 0.06, 0.33), fill=acc)
    elif ident.accessory == "backpack":  # straps over the shoulders
        draw.rectangle(box(-half_torso + 0.02, shoulder_y, -half_torso + 0.05, 0.42), fill=acc)
        draw.rectangle(box(half_torso - 0.05, shoulder_y, half_torso - 0.02, 0.42), fill=acc)
    elif ident.accessory == "bag":  # shoulder bag: diagonal strap and a bag at the hip
        strap = 0.02 * body_h
        _limb(
            draw, pt(-half_torso + 0.02, shoulder_y), pt(half_torso + 0.03, 0.47), strap, strap, acc
        )
        draw.rectangle(box(half_torso - 0.01, 0.44, half_torso + 0.1, 0.58), fill=acc)


def _draw_pattern(draw: ImageDraw.ImageDraw, ident: Identity, bbox, body_h: float) -> None:
    """Clothing pattern inside the torso box."""
    x0, y0, x1, y1 = bbox
    colour = _rgb(ident.pattern_colour)
    step = max(body_h * 0.05, 2.0)
    if ident.pattern == "hstripes":
        y = y0 + step / 2
        while y < y1:
            draw.rectangle([x0 + 1, y, x1 - 1, y + step / 2], fill=colour)
            y += step
    elif ident.pattern == "vstripes":
        x = x0 + step / 2
        while x < x1 - 1:
            draw.rectangle([x, y0, x + step / 2, y1], fill=colour)
            x += step
    elif ident.pattern == "checks":
        for i, y in enumerate(np.arange(y0, y1, step)):
            for j, x in enumerate(np.arange(x0 + 1, x1 - 1, step)):
                if (i + j) % 2 == 0:
                    draw.rectangle([x, y, min(x + step, x1 - 1), min(y + step, y1)], fill=colour)
    elif ident.pattern == "logo":
        cx, cy, r = (x0 + x1) / 2, y0 + (y1 - y0) * 0.35, (x1 - x0) * 0.22
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def render_image(
    ident: Identity | None,
    camera: CameraStyle,
    rng: np.random.Generator,
    height: int = 128,
    width: int = 64,
    occlusion_prob: float = 0.2,
    partial: bool = False,
) -> np.ndarray:
    """One (height, width, 3) uint8 image of `ident` (None = background only) by `camera`.

    `partial` renders a badly-aligned detection (most of the body off the crop), as used for
    Market-style distractor and junk boxes.
    """
    s = _SUPERSAMPLE
    h2, w2 = height * s, width * s
    pan = camera.background
    x_off = int(rng.integers(0, pan.shape[1] - w2 + 1))
    canvas = Image.fromarray(pan[:, x_off : x_off + w2])
    draw = ImageDraw.Draw(canvas)

    if ident is not None:
        # Viewpoint/scale jitter: small shift and scale, mirror, leg stride and arm swing.
        body_h = h2 * ident.height_scale * rng.uniform(0.93, 1.05)
        feet_y = h2 * rng.uniform(0.95, 0.995)
        cx = w2 / 2 + rng.uniform(-0.08, 0.08) * w2
        if partial:
            feet_y += rng.uniform(0.3, 0.6) * h2 * rng.choice([-1, 1])
            cx += rng.uniform(0.3, 0.5) * w2 * rng.choice([-1, 1])
        _draw_person(
            draw,
            ident,
            cx,
            feet_y,
            body_h,
            mirror=bool(rng.random() < 0.5),
            stride=float(rng.uniform(0.0, 0.06)),
            arm_swing=float(rng.uniform(-0.04, 0.04)),
        )

    if rng.random() < occlusion_prob:
        # An object from the camera's scene covering a side or the bottom of the body.
        colour = _rgb(camera.clutter_colours[rng.integers(len(camera.clutter_colours))])
        if rng.random() < 0.5:  # something in front of the legs
            top = rng.uniform(0.55, 0.8) * h2
            draw.rectangle(
                [rng.uniform(-0.3, 0.2) * w2, top, rng.uniform(0.8, 1.3) * w2, h2], fill=colour
            )
        else:  # something beside the person (pole, another pedestrian's shoulder)
            left = rng.random() < 0.5
            edge = rng.uniform(0.25, 0.45) * w2
            x0, x1 = (0, edge) if left else (w2 - edge, w2)
            draw.rectangle([x0, rng.uniform(0, 0.4) * h2, x1, h2], fill=colour)

    # Camera: resolution loss, blur, colour cast, brightness/contrast, saturation, noise.
    if camera.low_res > 1:
        small = (max(int(width / camera.low_res), 1), max(int(height / camera.low_res), 1))
        canvas = canvas.resize(small, Image.Resampling.BOX)
    canvas = canvas.resize((width, height), Image.Resampling.BILINEAR)
    if camera.blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(camera.blur))
    img = np.asarray(canvas, np.float32)
    grey = img.mean(axis=-1, keepdims=True)
    img = grey + camera.saturation * (img - grey)
    img = img * np.asarray(camera.gains, np.float32)
    img = (img - 128.0) * camera.contrast + 128.0 + camera.brightness
    img = img * rng.uniform(0.95, 1.05) + rng.uniform(-5, 5)  # per-image lighting flicker
    img = img + rng.normal(0.0, camera.noise, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _market_name(pid: int, camera: int, frame: int, detection: int) -> str:
    """Market-1501 file name; camera is 0-based here and 1-based in the name, sequence 1."""
    pid_str = "-1" if pid == -1 else f"{pid:04d}"
    return f"{pid_str}_c{camera + 1}s1_{frame:06d}_{detection:02d}.jpg"


def _plan(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every image to write: split, pid, 0-based camera, kind, and its file name."""
    seed, num_ids, num_cams = params["seed"], params["num_ids"], params["num_cameras"]
    per_cam = params["images_per_id_per_camera"]
    rng = np.random.default_rng([seed, _STREAM_LAYOUT])
    num_train = int(round(num_ids * params["train_fraction"]))

    items: list[dict[str, Any]] = []
    for pid in range(1, num_ids + 1):
        # Each identity is seen by a random subset of >= 2 cameras.
        n_cams = int(rng.integers(2, num_cams + 1))
        cams = sorted(int(c) for c in rng.choice(num_cams, n_cams, replace=False))
        train = pid <= num_train
        for cam in cams:
            query_j = int(rng.integers(per_cam))  # one query per (test identity, camera)
            for j in range(per_cam):
                if train:
                    split = "bounding_box_train"
                else:
                    split = "query" if j == query_j else "bounding_box_test"
                items.append(dict(split=split, pid=pid, camera=cam, kind="person", index=j))
    for kind, pid, count in (
        ("distractor", 0, params["num_distractors"]),
        ("junk", -1, params["num_junk"]),
    ):
        for j in range(count):
            cam = int(rng.integers(num_cams))
            items.append(dict(split="bounding_box_test", pid=pid, camera=cam, kind=kind, index=j))

    # Frame numbers increase along each camera's timeline; an identity's images in one camera
    # are a short tracklet of nearby frames. Names are unique because frames never repeat.
    frame = rng.integers(1, 200, num_cams)
    for item in items:
        cam = item["camera"]
        frame[cam] += int(rng.integers(1, 40 if item["index"] == 0 else 8))
        item["name"] = _market_name(item["pid"], cam, int(frame[cam]), int(rng.integers(1, 9)))
    if frame.max() > 999_999:
        raise ValueError("too many images per camera for 6-digit Market-1501 frame numbers")
    return items


def _validate(params: dict[str, Any]) -> None:
    if params["num_cameras"] < 2:
        raise ValueError("num_cameras must be >= 2 (every identity is seen by >= 2 cameras)")
    if params["images_per_id_per_camera"] < 2:
        raise ValueError(
            "images_per_id_per_camera must be >= 2 (one goes to the query, the rest to the gallery)"
        )
    num_train = int(round(params["num_ids"] * params["train_fraction"]))
    if not 1 <= num_train < params["num_ids"]:
        raise ValueError(
            f"num_ids={params['num_ids']} with train_fraction={params['train_fraction']} "
            "leaves no train or no test identity"
        )
    if params["num_ids"] > 9999:
        raise ValueError("num_ids must be <= 9999 (4-digit Market-1501 person ids)")


def _count(items: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, int]:
    def ids(split: str) -> set[int]:
        return {it["pid"] for it in items if it["split"] == split and it["pid"] > 0}

    def n(split: str) -> int:
        return sum(it["split"] == split for it in items)

    return dict(
        num_train_images=n("bounding_box_train"),
        num_train_ids=len(ids("bounding_box_train")),
        num_query_images=n("query"),
        num_query_ids=len(ids("query")),
        num_gallery_images=n("bounding_box_test"),  # includes distractors and junk
        num_gallery_ids=len(ids("bounding_box_test")),  # real identities only
        num_distractors=params["num_distractors"],
        num_junk=params["num_junk"],
        num_cameras=params["num_cameras"],
    )


def _read_metadata(root: str) -> dict[str, Any] | None:
    path = os.path.join(root, METADATA_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _check_existing(root: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """Metadata of an existing matching folder, None if `root` is absent/empty, else raise."""
    if not os.path.exists(root):
        return None
    if os.path.isdir(root) and not os.listdir(root):
        return None
    meta = _read_metadata(root)
    if meta is None:
        raise FileExistsError(
            f"{root} exists but has no {METADATA_FILE}: not a synthetic ReID folder; "
            "choose another --root or remove it"
        )
    if meta.get("params") != params:
        old = meta.get("params", {})
        diff = {k: (old.get(k), v) for k, v in params.items() if old.get(k) != v}
        raise FileExistsError(
            f"{root} holds a synthetic set generated with different parameters "
            f"(name: (existing, requested)) {diff}; remove it or choose another root"
        )
    return meta


def generate(
    root: str,
    num_ids: int = DEFAULT_SYNTHETIC["num_ids"],
    num_cameras: int = DEFAULT_SYNTHETIC["num_cameras"],
    images_per_id_per_camera: int = DEFAULT_SYNTHETIC["images_per_id_per_camera"],
    seed: int = 0,
    height: int = 128,
    width: int = 64,
    train_fraction: float = 0.5,
    num_distractors: int = DEFAULT_SYNTHETIC["num_distractors"],
    num_junk: int = DEFAULT_SYNTHETIC["num_junk"],
    occlusion_prob: float = DEFAULT_SYNTHETIC["occlusion_prob"],
    jpeg_quality: int = DEFAULT_SYNTHETIC["jpeg_quality"],
) -> dict[str, Any]:
    """Write a synthetic ReID set in the Market-1501 layout under `root`; return its metadata.

    Identities 1..round(num_ids * train_fraction) form the train split, the rest the test split
    (one query per test identity and camera, the other images in the gallery together with
    `num_distractors` "0000" and `num_junk` "-1" boxes). Deterministic in all arguments.
    Idempotent: an existing folder with identical parameters is returned as is; one with other
    parameters raises FileExistsError. The folder appears atomically (temp folder + rename).
    """
    params = dict(
        generator_version=GENERATOR_VERSION,
        num_ids=int(num_ids),
        num_cameras=int(num_cameras),
        images_per_id_per_camera=int(images_per_id_per_camera),
        seed=int(seed),
        height=int(height),
        width=int(width),
        train_fraction=float(train_fraction),
        num_distractors=int(num_distractors),
        num_junk=int(num_junk),
        occlusion_prob=float(occlusion_prob),
        jpeg_quality=int(jpeg_quality),
    )
    _validate(params)
    root = os.path.abspath(root)
    existing = _check_existing(root, params)
    if existing is not None:
        return existing

    start = time.perf_counter()
    items = _plan(params)
    cameras = [sample_camera(seed, c, height, width) for c in range(num_cameras)]
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        for split in SPLITS:
            os.makedirs(os.path.join(tmp, split))
        identities: dict[int, Identity] = {}
        for item in items:
            pid, cam, kind = item["pid"], item["camera"], item["kind"]
            # Each image has its own stream, so one image never depends on another's draws.
            rng = np.random.default_rng([seed, _STREAM_IMAGE, pid + 1, cam, item["index"]])
            if kind == "person":
                if pid not in identities:
                    identities[pid] = sample_identity(seed, pid)
                img = render_image(
                    identities[pid], cameras[cam], rng, height, width, occlusion_prob
                )
            else:
                # Distractors/junk: badly-aligned boxes of strangers, or background only.
                # Strangers use pids above 9999, which no real identity can have.
                stranger = sample_identity(seed, 10_000 + 2 * item["index"] + (pid == -1))
                rng_extra = np.random.default_rng([seed, _STREAM_EXTRA, pid + 1, item["index"]])
                ident = None if rng_extra.random() < 0.3 else stranger
                img = render_image(
                    ident, cameras[cam], rng, height, width, occlusion_prob, partial=True
                )
            Image.fromarray(img).save(
                os.path.join(tmp, item["split"], item["name"]), quality=jpeg_quality
            )
        meta = dict(
            params=params,
            counts=_count(items, params),
            generation_seconds=round(time.perf_counter() - start, 2),
        )
        # The metadata file is written last: a folder without it is never considered complete.
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        if os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first: reuse its result if it matches.
            existing = _check_existing(root, params)
            if existing is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return existing
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def define_flags(fv: flags.FlagValues) -> None:
    """Writes a synthetic set in the Market-1501 layout (see generate)."""
    flags.DEFINE_string(
        "root", None, "output folder (Market-1501 layout)", flag_values=fv, required=True
    )
    for name in ("num_ids", "num_cameras", "images_per_id_per_camera", "seed", "height", "width"):
        flags.DEFINE_integer(name, DEFAULT_SYNTHETIC[name], "see generate", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
    args, _ = parse(define_flags, argv, "python -m jaxreid.data.synthetic")
    meta = generate(
        args.root,
        num_ids=args.num_ids,
        num_cameras=args.num_cameras,
        images_per_id_per_camera=args.images_per_id_per_camera,
        seed=args.seed,
        height=args.height,
        width=args.width,
    )
    print(json.dumps(meta["counts"], sort_keys=True))


if __name__ == "__main__":
    run(main)
