"""Drawing the offline world: its vocabulary, one scene per image, the image and its caption.

:mod:`mmtard.world` writes and reads the world; this module decides what an image shows and
draws it. Every function takes its randomness from the generator it is given, so one per-image
seed gives the same pixels and words on every run, in any order.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mmtard.errors import DataError

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond")
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 210, 35),
    "purple": (135, 55, 185),
    "orange": (245, 135, 25),
    "pink": (245, 135, 195),
    "cyan": (35, 200, 215),
}
# A class is object colour x background colour: colours are visible in every patch, which a 2-layer
# ViT learns in a few hundred steps on a CPU. Shape and texture (which such a model does not learn
# at that budget) vary freely within a class and are left to the hardest zero-shot sets.
CLASS_COLORS = ("red", "green", "yellow", "purple", "orange", "pink")  # blue, cyan: zero-shot only
CLASS_BACKGROUNDS = ("white", "black", "gray", "blue")
TEXTURES = ("solid", "striped", "dotted", "checkered")
BACKGROUNDS = ("plain", "gradient", "noisy")
BACKGROUND_COLORS = {**COLORS, "gray": (128, 128, 128), "white": (235, 235, 235), "black": (30, 30, 30)}
SIZE_WORDS = {"small": (0.5, 0.6), "medium": (0.6, 0.72), "large": (0.72, 0.86)}

ZEROSHOT_SETS = ("shapes", "colors", "textures")
UNSEEN_COLORS = tuple(c for c in COLORS if c not in CLASS_COLORS)
_SUPERSAMPLE = 3


# ----------------------------------------------------------------------------- drawing
@dataclass
class Scene:
    """What one image shows; the caption is written from it."""

    shape: str
    color: str
    texture: str = "solid"
    background: str = "plain"
    bg_color: str = "gray"
    size_word: str = "medium"
    sketch: bool = False
    # filled in by _sample_pose
    radius: float = 0.0
    center: tuple = (0.0, 0.0)
    angle: float = 0.0
    position: str = "center"


def _unit_outlines(shape: str) -> list[tuple[np.ndarray, int]]:
    """Closed polygons (N x 2, radius about 1, y down) with fill value 255 or 0 (a hole)."""
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)

    def regular(n, start, radius=1.0):
        a = start + np.arange(n) * 2 * np.pi / n
        return radius * np.stack([np.cos(a), np.sin(a)], 1)

    if shape == "circle":
        return [(0.9 * circle, 255)]
    if shape == "ring":
        return [(circle, 255), (0.55 * circle, 0)]
    if shape == "square":
        return [(regular(4, np.pi / 4), 255)]
    if shape == "diamond":
        return [(regular(4, np.pi / 2) * np.array([0.6, 1.0]), 255)]
    if shape == "triangle":
        return [(regular(3, -np.pi / 2) + np.array([0.0, 0.2]), 255)]
    if shape == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [(np.stack([r * np.cos(a), r * np.sin(a)], 1), 255)]
    if shape == "cross":
        w = 0.32
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
               (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        return [(np.array(pts, dtype=float) * 0.95, 255)]
    if shape == "heart":
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return [(np.stack([x, y + 2.5], 1) / 16.5, 255)]
    raise ValueError(f"unknown shape {shape!r}")


def _densify(poly: np.ndarray, per_edge: int) -> np.ndarray:
    nxt = np.roll(poly, -1, axis=0)
    steps = np.arange(per_edge)[None, :, None] / per_edge
    return (poly[:, None, :] + (nxt - poly)[:, None, :] * steps).reshape(-1, 2)


def _mask(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the shape (or of its outline for sketches)."""
    big = size * _SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    c, s = math.cos(scene.angle), math.sin(scene.angle)
    rot = np.array([[c, -s], [s, c]])
    for poly, value in _unit_outlines(scene.shape):
        if scene.sketch:  # hand-drawn look: wobbly densified outline
            poly = _densify(poly, max(2, 48 // len(poly)))
            poly = poly + rng.normal(0, 0.035, poly.shape)
        pts = (poly @ rot.T) * scene.radius + np.array(scene.center)
        xy = [tuple(p) for p in (pts * _SUPERSAMPLE)]
        if scene.sketch:
            width = max(2, round(scene.radius * _SUPERSAMPLE * rng.uniform(0.12, 0.2)))
            draw.line(xy + [xy[0]], fill=255, width=width, joint="curve")
        else:
            draw.polygon(xy, fill=value)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32)[..., None] / 255.0


def _jitter_color(name: str, rng: np.random.Generator, palette=COLORS, sigma: float = 12.0) -> np.ndarray:
    return np.clip(np.array(palette[name], dtype=np.float32) + rng.normal(0, sigma, 3), 0, 255)


def _background(scene: Scene, size: int, rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    if scene.sketch:  # paper
        paper = np.full((size, size, 3), rng.uniform(225, 252), dtype=np.float32)
        return paper + rng.normal(0, 3, (size, size, 1)).astype(np.float32)
    base = _jitter_color(scene.bg_color, rng, BACKGROUND_COLORS, 10.0)
    base = 0.65 * base + 0.35 * 128.0  # muted, so the object stays the salient colour
    if scene.background == "plain":
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    if scene.background == "gradient":
        other = base * 0.45 if rng.random() < 0.5 else base + (255 - base) * 0.5
        a = rng.uniform(0, 2 * np.pi)
        proj = grid[0] * math.cos(a) + grid[1] * math.sin(a)
        t = ((proj - proj.min()) / (np.ptp(proj) + 1e-6))[..., None]
        return (base * (1 - t) + other * t).astype(np.float32)
    # mostly brightness noise, a little colour: a rainbow background would compete with the object
    coarse = rng.normal(0, 32, (5, 5, 1)) + rng.normal(0, 12, (5, 5, 3))
    coarse = (coarse + 128).clip(0, 255).astype(np.uint8)
    noise = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.float32) - 128
    return (base + noise).astype(np.float32)


def _fill(scene: Scene, size: int, rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    color = _jitter_color(scene.color, rng)
    if scene.sketch or scene.texture == "solid":
        return np.broadcast_to(color, (size, size, 3))
    # a second tone of the same hue, close enough that the silhouette stays the strongest edge
    second = color * 0.6 if rng.random() < 0.5 else color + (255 - color) * 0.4
    a = scene.angle + rng.uniform(-0.3, 0.3)
    u = grid[0] * math.cos(a) + grid[1] * math.sin(a)
    v = -grid[0] * math.sin(a) + grid[1] * math.cos(a)
    period = rng.uniform(6.0, 9.0) * size / 48  # wide enough to survive the student's resize to 32 px
    if scene.texture == "striped":
        p = (np.sin(2 * np.pi * u / period) > 0).astype(np.float32)
    elif scene.texture == "checkered":
        p = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    else:  # dotted
        du, dv = (u / period) % 1 - 0.5, (v / period) % 1 - 0.5
        p = (du * du + dv * dv < 0.07).astype(np.float32)
    p = p[..., None]
    return color * (1 - p) + second * p


def _sample_pose(scene: Scene, size: int, rng: np.random.Generator) -> None:
    lo, hi = SIZE_WORDS[scene.size_word]
    scene.radius = rng.uniform(lo, hi) * size / 2
    margin = scene.radius * 0.9
    cx, cy = rng.uniform(margin, size - margin, 2) if size - 2 * margin > 0 else (size / 2, size / 2)
    scene.center = (float(cx), float(cy))
    scene.angle = float(rng.uniform(-0.45, 0.45))
    col = ("left", "", "right")[min(2, int(3 * cx / size))]
    row = ("top", "", "bottom")[min(2, int(3 * cy / size))]
    scene.position = " ".join(w for w in (row, col) if w) or "center"


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws ``scene`` (pose sampled from ``rng``) as a uint8 array size x size x 3."""
    _sample_pose(scene, size, rng)
    grid = np.mgrid[0:size, 0:size][::-1].astype(np.float32) + 0.5  # (x, y)
    bg = _background(scene, size, rng, grid)
    mask = _mask(scene, size, rng)
    img = bg * (1 - mask) + _fill(scene, size, rng, grid) * mask
    img = img * rng.uniform(0.85, 1.12) + rng.normal(0, rng.uniform(1.0, 6.0), img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One of several phrasings of what ``scene`` shows."""
    shape, color, pos = scene.shape, scene.color, scene.position
    if scene.sketch:
        kind = ("a sketch", "a drawing", "an outline")[rng.integers(3)]
        return f"{kind} of {_a(color)} {shape}" + (f", {pos}" if rng.random() < 0.5 else "")
    tex, size = scene.texture, scene.size_word
    bg = {"plain": "plain {}", "gradient": "{} gradient", "noisy": "noisy {}"}[scene.background].format(scene.bg_color)
    forms = (
        f"{_a(size)} {color} {tex} {shape} on {_a(bg)} background, {pos}",
        f"a photo of {_a(color)} {shape}, {tex}, {pos}",
        f"a picture of {_a(size)} {color} {shape} on {bg}",
        f"{pos}: {_a(tex)} {color} {shape}",
        f"{_a(color)} {shape} on {_a(bg)} background",
        f"{_a(color)} shape: {_a(tex)} {shape}, {pos}",
    )
    return forms[rng.integers(len(forms))]


def scene_for(kind: str, rng: np.random.Generator, shape: str | None = None, color: str | None = None,
               texture: str | None = None, bg_color: str | None = None) -> Scene:
    """Samples the free factors of a scene; ``shape``/``color``/``texture`` fix the class when given."""
    if kind == "sketch":
        return Scene(shape=shape, color=color, sketch=True, size_word=str(rng.choice(list(SIZE_WORDS))))
    if kind in ("shapes", "textures"):  # coloured only with colours no classification label uses
        color = str(rng.choice(UNSEEN_COLORS))
    if kind == "classification":  # the class fixes both colours; keep the background recognisable
        return Scene(shape=str(rng.choice(SHAPES)), color=color, texture=str(rng.choice(TEXTURES)),
                     background="plain", bg_color=bg_color,
                     size_word=str(rng.choice(list(SIZE_WORDS))))
    shape = shape or str(rng.choice(SHAPES))
    color = color or str(rng.choice(list(COLORS)))
    bg_color = bg_color or str(rng.choice([c for c in BACKGROUND_COLORS if c != color]))
    return Scene(
        shape=shape,
        color=color,
        texture=texture or str(rng.choice(TEXTURES)),
        background=str(rng.choice(BACKGROUNDS)),
        bg_color=bg_color,
        size_word=str(rng.choice(list(SIZE_WORDS))),
    )


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=6)  # no tIME chunk: stable
    return buf.getvalue()


# ----------------------------------------------------------------------------- class vocabularies
def class_table(set_name: str) -> list[tuple[str, str | None, str | None, str | None, str | None]]:
    """(class_dir, shape, color, texture, background colour) in sorted class_dir order, i.e. the
    label order of an ImageFolder."""
    if set_name == "classification":
        rows = [(f"{c}_shape_on_a_{b}_background", None, c, None, b) for c in CLASS_COLORS for b in CLASS_BACKGROUNDS]
    elif set_name == "shapes":
        rows = [(s, s, None, None, None) for s in SHAPES]
    elif set_name == "colors":
        rows = [(c, None, c, None, None) for c in COLORS]
    elif set_name == "textures":
        rows = [(t, None, None, t, None) for t in TEXTURES]
    else:
        raise DataError(f"Unknown world set {set_name!r}; known: classification, {', '.join(ZEROSHOT_SETS)}.")
    return sorted(rows)


def class_names(set_name: str) -> list[str]:
    """Human-readable class names of a world set, in label order."""
    return [d.replace("_", " ") for d, *_ in class_table(set_name)]
