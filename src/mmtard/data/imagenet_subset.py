"""The fixed 5 000-image ImageNet validation subset of RobustBench (METHOD.md section 8)."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from mmtard.data.base import ImageListDataset, require_dir
from mmtard.data.folders import IMAGENET_LAYOUT, check_imagenet_wnids, imagenet_classnames, is_wnid
from mmtard.errors import DataError

SUBSET_LIST_NAME = "imagenet_5000_val_subset.txt"


def packaged_subset_list() -> Path:
    """Path of the packaged RobustBench list (see ``resources/ATTRIBUTION.md``)."""
    return Path(str(resources.files("mmtard") / "resources" / SUBSET_LIST_NAME))


def read_subset_list(list_file: str | Path) -> list[str]:
    """Non-empty lines of a ``wnid/file`` list, stripped, in file order."""
    path = Path(list_file)
    if not path.is_file():
        raise DataError(f"Subset list {path} does not exist (one 'wnid/ILSVRC2012_val_XXXXXXXX.JPEG' a line).")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    entries = [ln for ln in lines if ln]
    if not entries:
        raise DataError(f"Subset list {path} is empty.")
    return entries


def imagenet_val_subset(
    root: str | Path,
    list_file: str | Path | None = None,
    image_size: int | None = 224,
    strict: bool = False,
    wnids: list[str] | None = None,
) -> ImageListDataset:
    """The RobustBench ImageNet validation subset, in the list's order.

    Labels are the index of each wnid in the standard ImageNet order. That order is the sorted
    wnids of the val folder when it holds all 1000 classes (class names then come from open_clip's
    ``IMAGENET_CLASSNAMES``). A partial val folder (as in tests) gives labels in the sorted wnids
    present and the wnids as class names, unless ``wnids`` supplies the full ordered list.

    Args:
        root: the ImageNet root holding ``val/<wnid>/``, or the val folder itself.
        list_file: the ``wnid/file`` list; defaults to the packaged 5 000-image list.
        image_size: shorter side resize + centre crop; None keeps the native size.
        strict: raise on unreadable files instead of skipping them.
        wnids: the ordered wnids that define labels, overriding the folder scan.
    """
    root = require_dir(Path(root), IMAGENET_LAYOUT)
    val_dir = root / "val" if (root / "val").is_dir() else root
    entries = read_subset_list(list_file if list_file is not None else packaged_subset_list())
    if wnids is None:
        wnids = sorted(e.name for e in os.scandir(val_dir) if e.is_dir() and is_wnid(e.name))
        if not wnids:
            raise DataError(f"No <wnid> class folders in {val_dir}. Expected layout: {IMAGENET_LAYOUT}")
    label_of = {w: i for i, w in enumerate(wnids)}
    files, labels = [], []
    missing = []
    for entry in entries:
        wnid = entry.split("/", 1)[0]
        if wnid not in label_of:
            raise DataError(f"Subset entry {entry!r} names wnid {wnid} which is not a class folder of {val_dir}.")
        path = val_dir / entry
        if not path.is_file():
            missing.append(path)
        files.append(path)
        labels.append(label_of[wnid])
    if missing:
        raise DataError(
            f"{len(missing)} of {len(entries)} images of the subset list are missing under {val_dir}; "
            f"first missing: {missing[0]}. Expected layout: {IMAGENET_LAYOUT}"
        )
    ds = ImageListDataset(val_dir, files, labels, list(entries), image_size, False, strict)
    if len(wnids) == 1000:
        check_imagenet_wnids(wnids, val_dir)
    ds.classnames = imagenet_classnames() if len(wnids) == 1000 else list(wnids)
    ds.wnids = list(wnids)
    return ds
