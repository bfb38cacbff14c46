"""Class-per-folder datasets: any ImageFolder and the ImageNet train/val layout."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from mmtard.data.base import ImageListDataset, require_dir
from mmtard.data.images import is_image_file
from mmtard.errors import DataError

_logger = logging.getLogger(__name__)

_WNID = re.compile(r"^n\d{8}$")
IMAGEFOLDER_LAYOUT = "<root>/<class_name>/<image>.(png|jpg|jpeg|bmp|webp|tif), one folder per class"
IMAGENET_LAYOUT = "<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (e.g. <root>/val/n01440764/...)"


def is_wnid(name: str) -> bool:
    """Whether ``name`` looks like an ImageNet WordNet id (``n`` + 8 digits)."""
    return bool(_WNID.match(name))


@lru_cache(maxsize=1)
def _open_clip_imagenet_classnames() -> tuple[str, ...]:
    module = sys.modules.get("open_clip.zero_shot_metadata")
    if module is None:
        # Importing the open_clip package costs seconds (it builds its model registry); the name list
        # is a plain module with no imports, so load that file alone when open_clip is not loaded yet.
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("open_clip_torch is not installed; it provides the ImageNet class names.")
        path = Path(spec.submodule_search_locations[0]) / "zero_shot_metadata.py"
        file_spec = importlib.util.spec_from_file_location("_mmtard_open_clip_zero_shot_metadata", path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    return tuple(module.IMAGENET_CLASSNAMES)


def imagenet_classnames() -> list[str]:
    """The 1000 human-readable ImageNet class names of open_clip, in standard (sorted-wnid) order."""
    return list(_open_clip_imagenet_classnames())


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k wnids in standard order (timm's table; timm comes with open_clip)."""
    from timm.data import ImageNetInfo

    return tuple(ImageNetInfo().label_names())


def check_imagenet_wnids(wnids: Sequence[str], where: str | Path) -> None:
    """Raise a DataError unless ``wnids`` are exactly ImageNet-1k's: 1000 wnid-like folders that
    include a stray one (and lack a real class) would shift every later label by one."""
    expected = imagenet_wnids()
    if list(wnids) == list(expected):
        return
    if sorted(wnids) == sorted(expected):
        raise DataError(f"{where}: the 1000 ImageNet wnids are given out of ImageNet's (sorted) order, so labels would "
                        "not match the class names")
    unknown, absent = sorted(set(wnids) - set(expected)), sorted(set(expected) - set(wnids))
    raise DataError(f"{where}: the class folders are not ImageNet-1k's 1000 wnids (not ImageNet-1k: "
                    f"{', '.join(unknown[:5]) or 'none'}; missing: {', '.join(absent[:5]) or 'none'}), so labels "
                    "would not follow ImageNet's order. Remove the extra folders and restore the missing ones; "
                    "for another set of 1000 classes, read it as an image folder (data.source=imagefolder) "
                    "with its own class names.")


def folder_classnames(class_dirs: Sequence[str]) -> list[str]:
    """Human-readable names for sorted class folder names.

    ImageNet-1k wnids (all 1000, or a subset such as ImageNet-100) map to open_clip's ImageNet
    class names. Other names have underscores replaced by spaces. Wnids outside ImageNet-1k (an
    ImageNet-21k subset) keep the wnids themselves (there is no wnid -> name table for those);
    pass explicit class names (``data.classnames``) in that case.
    """
    if class_dirs and all(is_wnid(d) for d in class_dirs):
        position = {w: i for i, w in enumerate(imagenet_wnids())}  # timm read only for wnid folders
        if all(d in position for d in class_dirs):
            names = imagenet_classnames()
            return [names[position[d]] for d in class_dirs]
        _logger.warning(
            "%d wnid folders, some outside ImageNet-1k: class names stay wnids; set data.classnames to name them.",
            len(class_dirs),
        )
        return list(class_dirs)
    return [d.replace("_", " ") for d in class_dirs]


def scan_class_folders(root: Path, layout: str = IMAGEFOLDER_LAYOUT) -> tuple[list[str], list[list[Path]]]:
    """Sorted class folder names and, per class, its sorted image files (searched recursively).

    Raises DataError if ``root`` is missing, has no class folders, or a class folder has no image.
    """
    root = require_dir(root, layout)
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not class_dirs:
        raise DataError(f"No class folders in {root}. Expected layout: {layout}")
    files_per_class = []
    for name in class_dirs:
        files = []
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            files.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_file(f))
        if not files:
            raise DataError(f"Class folder {root / name} has no image files. Expected layout: {layout}")
        files_per_class.append(sorted(files))
    return class_dirs, files_per_class


class ImageFolderDataset(ImageListDataset):
    """``root/<class>/*.<image>``; label = index of the class folder in sorted order.

    ``dataset[i]`` is ``(image, label, i)`` with image a float32 tensor 3xHxW in [0, 1];
    ``sample_ids`` are paths relative to ``root`` (POSIX separators).

    Args:
        root: the folder holding one sub-folder per class.
        image_size: None keeps native size (all images must share it); an int resizes the shorter
            side (bicubic) and centre-crops.
        augment: random resized crop + horizontal flip.
        strict: raise on unreadable files instead of replacing them by the next readable one.
        classnames: names to use instead of those derived from the folder names (same length).
        layout: description of the expected layout, used in error messages.
        classnames_file: the file ``classnames`` came from, named in error messages.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int | None = None,
        augment: bool = False,
        strict: bool = False,
        classnames: Sequence[str] | None = None,
        layout: str = IMAGEFOLDER_LAYOUT,
        classnames_file: str | Path | None = None,
    ):
        root = Path(root)
        class_dirs, files_per_class = scan_class_folders(root, layout)
        if classnames is not None and len(classnames) != len(class_dirs):
            named = f" in {classnames_file}" if classnames_file else ""
            raise DataError(
                f"{root} has {len(class_dirs)} class folders but {len(classnames)} class names were given{named}."
            )
        files, labels = [], []
        for label, class_files in enumerate(files_per_class):
            files.extend(class_files)
            labels.extend([label] * len(class_files))
        sample_ids = [f.relative_to(root).as_posix() for f in files]
        super().__init__(root, files, labels, sample_ids, image_size, augment, strict)
        self.class_dirs = class_dirs
        self.classnames = list(classnames) if classnames is not None else folder_classnames(class_dirs)


def imagenet_folder(
    root: str | Path,
    split: str = "val",
    image_size: int | None = 224,
    augment: bool = False,
    strict: bool = False,
) -> ImageFolderDataset:
    """ImageNet in its usual layout ``root/{train,val}/<wnid>/*.JPEG``.

    Labels follow the sorted wnids, which is the standard ImageNet order when all 1000 are
    present; class names then come from open_clip's ``IMAGENET_CLASSNAMES``.

    Args:
        root: the ImageNet root holding ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        image_size: ImageNet images differ in size, so None only works on pre-resized copies.
        augment: random resized crop + horizontal flip.
        strict: raise on unreadable files instead of skipping them.
    """
    if split not in ("train", "val"):
        raise DataError(f"ImageNet split must be 'train' or 'val', got {split!r}.")
    require_dir(Path(root), IMAGENET_LAYOUT)
    ds = ImageFolderDataset(Path(root) / split, image_size, augment, strict, layout=IMAGENET_LAYOUT)
    if len(ds.class_dirs) == 1000:  # a stray folder in place of a class would shift every later label
        check_imagenet_wnids(ds.class_dirs, ds.root)
    else:  # a subset (ImageNet-100): its labels count its own folders, named from ImageNet's table
        unknown = sorted(set(ds.class_dirs) - set(imagenet_wnids()))
        if unknown:
            raise DataError(f"{ds.root}: {len(unknown)} class folders are not ImageNet-1k wnids "
                            f"({', '.join(unknown[:5])}); remove them, or read the folder as "
                            "data.source=imagefolder with data.classnames")
        _logger.info("%s: %d of ImageNet-1k's 1000 classes; labels 0..%d follow their sorted wnids",
                     ds.root, len(ds.class_dirs), len(ds.class_dirs) - 1)
    return ds
