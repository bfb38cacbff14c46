"""A small offline world of drawn shapes: captions, a 24-class ImageNet stand-in and zero-shot sets.

Everything a demo or a test needs without downloads: captioned images to pre-train tiny CLIPs,
a classification split to distil on, and three zero-shot sets under shifts of vocabulary and
style. Images are drawn (:mod:`mmtard.world_drawing`) from a per-image seed, so one seed gives
byte-identical files on every run and the images can be drawn in any order.

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
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmtard.errors import DataError
from mmtard.world_drawing import (COLORS, SHAPES, ZEROSHOT_SETS, caption, class_names, class_table, png_bytes, render,
                                  scene_for)

_logger = logging.getLogger(__name__)

WORLD_VERSION = 1
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
_STREAMS = {"train": 1, "val": 2, "captions": 3, "shapes": 4, "colors": 5, "textures": 6, "sketch": 7}


# ----------------------------------------------------------------------------- writing
def _seed_rng(seed: int, stream: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAMS[stream], index])


def _write_class_split(root: Path, set_name: str, stream: str, per_class: int, seed: int, size: int) -> int:
    index = 0
    for class_dir, shape, color, texture, bg_color in class_table(set_name):
        folder = root / class_dir
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            rng = _seed_rng(seed, stream, index)
            scene = scene_for(set_name, rng, shape, color, texture, bg_color)
            (folder / f"{k:06d}.png").write_bytes(png_bytes(render(scene, size, rng)))
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
                scene = scene_for("sketch", rng, str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))))
            else:
                scene = scene_for("captions", rng)
            data = png_bytes(render(scene, size, rng))
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
