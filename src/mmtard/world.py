"""A small offline world of drawn shapes: captions, a 24-class ImageNet stand-in and zero-shot sets.

Everything a demo or a test needs without downloads: captioned images to pre-train tiny CLIPs,
a classification split to distil on, and three zero-shot sets under shifts of vocabulary and
style. Images are drawn with PIL/numpy from a per-image seed, so one seed gives byte-identical
files on every run and the images can be drawn in any order.

Layout written by :func:`generate_world`::

    world.json                                  seed, sizes, class names and prompt templates
    captions/captions.csv                       filepath,caption (paths relative to captions/)
    captions/images/<000000>.png
    captions/shards/shard-000000.tar            the same pairs as webdataset samples (png + txt)
    classification/{train,val}/<color>_shape_on_a_<background>_background/<000000>.png
    zeroshot/{shapes,colors,textures}/test/<class_dir>/<000000>.png
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mmtard.errors import DataError

_logger = logging.getLogger(__name__)

WORLD_VERSION = 1
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

SIZES = {  # images per class (train, val), captions, images per class of each zero-shot set
    "test": {"train": 10, "val": 4, "captions": 64, "shapes": 3, "colors": 3, "textures": 4},
    "quick": {"train": 40, "val": 10, "captions": 1200, "shapes": 15, "colors": 15, "textures": 30},
    "demo": {"train": 160, "val": 30, "captions": 3000, "shapes": 40, "colors": 40, "textures": 80},
}
TEMPLATES = {
    "classification": ["a photo of a {}.", "a picture of a {}.", "{}."],
    "shapes": ["a photo of a {}.", "a picture of a {}.", "a {} shape."],
    "colors": ["a photo of a {} shape.", "a picture of a {} shape.", "a {} shape."],
    "textures": ["a photo of a {} shape.", "a picture of a {} shape.", "a {} object."],
}
ZEROSHOT_SETS = ("shapes", "colors", "textures")
UNSEEN_COLORS = tuple(c for c in COLORS if c not in CLASS_COLORS)
_STREAMS = {"train": 1, "val": 2, "captions": 3, "shapes": 4, "colors": 5, "textures": 6, "sketch": 7}
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


def _scene_for(kind: str, rng: np.random.Generator, shape: str | None = None, color: str | None = None,
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


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=6)  # no tIME chunk: stable
    return buf.getvalue()


# ----------------------------------------------------------------------------- class vocabularies
def _class_table(set_name: str) -> list[tuple[str, str | None, str | None, str | None, str | None]]:
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
    return [d.replace("_", " ") for d, *_ in _class_table(set_name)]


# ----------------------------------------------------------------------------- writing
def _seed_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], index])


def _write_class_split(root: Path, set_name: str, stream: str, per_class: int, seed: int, size: int) -> int:
    index = 0
    for class_dir, shape, color, texture, bg_color in _class_table(set_name):
        folder = root / class_dir
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            rng = _seed_rng(seed, stream, index)
            scene = _scene_for(set_name, rng, shape, color, texture, bg_color)
            (folder / f"{k:06d}.png").write_bytes(_png(render(scene, size, rng)))
            index += 1
    return index


def _write_captions(root: Path, n: int, seed: int, size: int) -> None:
    import webdataset as wds

    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    rows = []
    with open(root / "shards" / "shard-000000.tar", "wb") as stream:
        writer = wds.TarWriter(stream, mtime=0.0, encoder=False, user="mmtard", group="mmtard")
        for i in range(n):
            rng = _seed_rng(seed, "captions", i)
            # one in ten is a sketch, so that "a sketch of ..." means something to a CLIP trained here
            if rng.random() < 0.1:
                scene = _scene_for("sketch", rng, str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))))
            else:
                scene = _scene_for("captions", rng)
            data = _png(render(scene, size, rng))
            text = caption(scene, rng)
            (root / "images" / f"{i:06d}.png").write_bytes(data)
            writer.write({"__key__": f"{i:06d}", "png": data, "txt": text.encode("utf-8")})
            rows.append((f"images/{i:06d}.png", text))
        writer.close()
    with open(root / "captions.csv", "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(["filepath", "caption"])
        out.writerows(rows)


#: written before the first file of a world and removed with world.json's writing: a world whose
#: generation was interrupted is known to be this module's and is replaced by the next one
_INCOMPLETE = ".world-incomplete"


def _prepare_out_dir(out: Path) -> None:
    owned = [out / d for d in ("captions", "classification", "zeroshot")]
    ours = (out / "world.json").is_file() or (out / _INCOMPLETE).is_file()
    if any(p.exists() for p in owned) and not ours:
        raise DataError(
            f"{out} holds captions/, classification/ or zeroshot/ but no world.json; refusing to overwrite."
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / _INCOMPLETE).write_text("")
    for p in owned:  # a previous world of another size would leave stale files behind
        if p.exists():
            shutil.rmtree(p)
    (out / "world.json").unlink(missing_ok=True)


def generate_world(out_dir: str | Path, seed: int = 0, size: str = "demo", image_size: int = 48) -> "WorldInfo":
    """Writes the world to ``out_dir`` (layout in the module docstring) and returns its description.

    The same ``seed``, ``size`` and ``image_size`` give byte-identical files. A previous world in
    ``out_dir`` is replaced; ``world.json`` is written last, so its presence marks a complete world.

    Args:
        out_dir: target folder (created).
        seed: seed of every image, caption and split.
        size: ``"test"`` (tiny), ``"quick"`` (a 2-minute demo) or ``"demo"`` (see ``SIZES``).
        image_size: side of the square images in pixels.
    """
    if size not in SIZES:
        raise DataError(f"World size must be one of {sorted(SIZES)}, got {size!r}.")
    if image_size < 16:
        raise DataError(f"World image_size must be at least 16, got {image_size}.")
    if seed < 0:
        raise DataError(f"World seed must be >= 0, got {seed}.")
    out = Path(out_dir)
    _prepare_out_dir(out)
    n = SIZES[size]
    counts = {}
    for split in ("train", "val"):
        folder = out / "classification" / split
        counts[split] = _write_class_split(folder, "classification", split, n[split], seed, image_size)
    for name in ZEROSHOT_SETS:
        counts[name] = _write_class_split(out / "zeroshot" / name / "test", name, name, n[name], seed, image_size)
    _write_captions(out / "captions", n["captions"], seed, image_size)
    counts["captions"] = n["captions"]
    meta = {
        "version": WORLD_VERSION,
        "seed": seed,
        "size": size,
        "image_size": image_size,
        "counts": counts,
        "classification": {"classnames": class_names("classification"), "templates": TEMPLATES["classification"]},
        "zeroshot": {s: {"classnames": class_names(s), "templates": TEMPLATES[s]} for s in ZEROSHOT_SETS},
        "captions": {"csv": "captions/captions.csv", "shards": ["captions/shards/shard-000000.tar"]},
    }
    (out / "world.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / _INCOMPLETE).unlink()
    return load_world(out)


# ----------------------------------------------------------------------------- reading
@dataclass
class WorldInfo:
    """A generated world on disk, with constructors for its datasets."""

    root: Path
    seed: int
    size: str
    image_size: int
    counts: dict
    classnames: list[str]
    templates: list[str]
    zeroshot: dict = field(default_factory=dict)  # set name -> {"classnames": [...], "templates": [...]}
    captions_csv: str = "captions/captions.csv"
    caption_shards: list[str] = field(default_factory=list)

    @property
    def zeroshot_names(self) -> list[str]:
        """Names of the zero-shot sets: ``["colors", "shapes", "textures"]``."""
        return sorted(self.zeroshot)

    def classification(
        self, split: str = "train", image_size: int | None = None, augment: bool = False, strict: bool = False
    ):
        """The 24-class ImageNet stand-in (``split`` is ``"train"`` or ``"val"``)."""
        from mmtard.data.base import check_classnames
        from mmtard.data.folders import ImageFolderDataset

        if split not in ("train", "val"):
            raise DataError(f"World classification split must be 'train' or 'val', got {split!r}.")
        ds = ImageFolderDataset(self.root / "classification" / split, image_size, augment, strict)
        check_classnames(self.classnames, ds.classnames, str(ds.root))
        ds.templates = list(self.templates)
        return ds

    def zeroshot_set(self, name: str, image_size: int | None = None, strict: bool = False):
        """One zero-shot set; its ``templates`` attribute holds the prompt templates of world.json."""
        from mmtard.data.base import check_classnames
        from mmtard.data.folders import ImageFolderDataset

        if name not in self.zeroshot:
            raise DataError(f"World at {self.root} has no zero-shot set {name!r}; it has {self.zeroshot_names}.")
        ds = ImageFolderDataset(self.root / "zeroshot" / name / "test", image_size, strict=strict)
        check_classnames(self.zeroshot[name]["classnames"], ds.classnames, str(ds.root))
        ds.templates = list(self.zeroshot[name]["templates"])
        return ds

    def captions(self, image_size: int | None = None, augment: bool = False, strict: bool = False):
        """Image-caption pairs read from ``captions/captions.csv``."""
        from mmtard.data.captions import CaptionCSVDataset

        return CaptionCSVDataset(self.root / self.captions_csv, image_size, augment, strict)

    def caption_shard_dataset(self, image_size: int | None = None, augment: bool = False, shuffle: int = 0):
        """The same pairs streamed from the webdataset shards."""
        from mmtard.data.shards import ShardDataset

        urls = [str(self.root / s) for s in self.caption_shards]
        return ShardDataset(urls, "txt", image_size, augment, shuffle=shuffle)


def load_world(out_dir: str | Path) -> WorldInfo:
    """Reads ``world.json`` of a generated world; raises DataError if it is missing or invalid."""
    root = Path(out_dir)
    path = root / "world.json"
    if not path.is_file():
        raise DataError(
            f"No world at {root}: {path} is missing. Create one with generate_world() or 'mmtard world --out {root}'."
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return WorldInfo(
            root=root,
            seed=int(meta["seed"]),
            size=str(meta["size"]),
            image_size=int(meta["image_size"]),
            counts=dict(meta["counts"]),
            classnames=list(meta["classification"]["classnames"]),
            templates=list(meta["classification"]["templates"]),
            zeroshot={
                k: {"classnames": list(v["classnames"]), "templates": list(v["templates"])}
                for k, v in meta["zeroshot"].items()
            },
            captions_csv=str(meta["captions"]["csv"]),
            caption_shards=list(meta["captions"]["shards"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"{path} is not a valid world description ({type(exc).__name__}: {exc}); regenerate the world."
        ) from exc


def main_generate(out_dir: str | Path, seed: int = 0, size: str = "demo", image_size: int = 48) -> dict:
    """Generates a world and returns a summary for the CLI: root, seed, size, counts and seconds."""
    start = time.perf_counter()
    world = generate_world(out_dir, seed=seed, size=size, image_size=image_size)
    seconds = time.perf_counter() - start
    _logger.info("World written to %s in %.1f s: %s", world.root, seconds, world.counts)
    return {
        "root": str(world.root),
        "seed": world.seed,
        "size": world.size,
        "image_size": world.image_size,
        "counts": dict(world.counts),
        "seconds": round(seconds, 2),
    }
