"""What evaluation runs on: :class:`DatasetEntry` and the builders of the sets of METHOD.md §8.

An entry pairs a dataset yielding ``(image in [0, 1], label, index)`` with the zero-shot head's
class names and templates. ImageNet (the RobustBench 5 000-image list) and the offline world's
classification split are of kind ``classification`` (the training distribution) and stay out of
the zero-shot average; the clip-benchmark suite and the world's zero-shot sets are ``zeroshot``.

Every set is read strictly: an image that cannot be read stops the evaluation with an error
naming the file (as torchvision's folders and clip-benchmark's shards do), where training reads
the next readable image instead: a replaced image would be counted twice in the accuracy. The
set's records were written on the unreadable file, so once it is fixed they are refused as
records of other images (the message says which file to delete); other sets' records stay.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from torch.utils.data import Dataset

from mmtard.errors import ConfigError, DataError


@dataclass
class DatasetEntry:
    """One evaluation set: images with labels, and the zero-shot head's class names and templates.

    ``kind`` is ``zeroshot`` or ``classification``; only zero-shot sets enter the average.
    """

    name: str
    dataset: Dataset
    classnames: list[str]
    templates: list[str]
    kind: str = "zeroshot"
    meta: dict = field(default_factory=dict)


def world_datasets(
    world_dir: str | Path, sets: Sequence[str] | None = None, image_size: int | None = None
) -> list[DatasetEntry]:
    """The offline world's sets: ``world`` (classification val split) and ``world-<set>`` for each
    zero-shot set (``world-colors``, ``world-shapes``, ``world-sketch``).

    Args:
        world_dir: a folder written by :func:`mmtard.world.generate_world`.
        sets: names to keep (e.g. ``["world", "world-shapes"]``); None keeps all.
        image_size: None keeps the world's native size.
    """
    from mmtard.world import load_world

    world = load_world(world_dir)
    names = ["world"] + [f"world-{s}" for s in world.zeroshot_names]
    if sets is not None:
        unknown = sorted(set(sets) - set(names))
        if unknown:
            raise DataError(f"world at {world_dir} has no set {unknown}; it has {names}")
        names = [n for n in names if n in sets]
    out = []
    for name in names:
        if name == "world":
            ds = world.classification("val", image_size=image_size, strict=True)
            out.append(DatasetEntry(name, ds, list(world.classnames), list(world.templates), "classification"))
        else:
            short = name[len("world-"):]
            ds = world.zeroshot_set(short, image_size=image_size, strict=True)
            info = world.zeroshot[short]
            out.append(DatasetEntry(name, ds, list(info["classnames"]), list(info["templates"])))
    return out


def imagenet_dataset(
    root: str | Path, list_file: str | Path | None = None, full_val: bool = False, image_size: int | None = 224
) -> DatasetEntry:
    """ImageNet validation as a zero-shot set with the 80 OpenAI templates.

    By default the fixed 5 000-image RobustBench subset (METHOD.md §8); ``full_val`` reads the
    whole ``val/`` folder. ImageNet is the training distribution, so it is of kind
    ``classification`` and stays out of the zero-shot average.
    """
    from mmtard.data import imagenet_folder, imagenet_val_subset
    from mmtard.zeroshot import imagenet_templates

    if full_val:
        ds = imagenet_folder(root, "val", image_size=image_size, strict=True)
    else:
        ds = imagenet_val_subset(root, list_file=list_file, image_size=image_size, strict=True)
    if len(ds.classnames) != 1000:  # labels and head would cover the folders present: not ImageNet accuracy
        raise DataError(
            f"imagenet: {root} has {len(ds.classnames)} <wnid> class folders under val/, not 1000, so labels and "
            "the zero-shot head would cover only those. Keep all 1000 val/<wnid>/ folders (for the RobustBench "
            "subset, folders holding none of its images may be empty)."
        )
    return DatasetEntry("imagenet", ds, list(ds.classnames), imagenet_templates(), "classification")


#: suite sets attacked at their native size (METHOD.md §8: the model's own resize is part of the
#: model, so eps is measured in the original pixel space). The release's CLIP_benchmark (RobustVLM's
#: fork) does this for CIFAR and STL-10 only; EuroSAT (64 px) and PCAM (96 px) go through CLIP's
#: resize to 224 first there, so they do here too, or their robust accuracy would not be comparable.
NATIVE_SIZE_SETS = frozenset({"cifar10", "cifar100", "stl10"})


def suite_image_size(name: str, variable_size: int = 224) -> int | None:
    """None (native size) for sets of one image size; ``variable_size`` (shorter-side resize and
    centre crop, as CLIP's preprocessing) for sets whose images differ in size and must be made
    equal to be batched."""
    return None if name in NATIVE_SIZE_SETS else variable_size


def _suite_root(root: str | Path, name: str) -> str | Path:
    """``root`` for the set ``name``: its template filled in, or its sub-folder."""
    if "{" not in str(root) and "}" not in str(root):
        return Path(root) / name
    try:
        fields = [(f, conv, spec) for _, f, spec, conv in string.Formatter().parse(str(root)) if f is not None]
    except ValueError as exc:  # an unmatched brace
        fields, error = None, exc
    if fields is None or any(f not in ("name", "dataset") or conv or spec for f, conv, spec in fields):
        detail = f"; {error}" if fields is None else ""
        raise ConfigError(f"suite dataset root {str(root)!r}: a template may hold only {{name}} (or {{dataset}}), "
                          f"each in single braces, with no attribute, index, conversion or format{detail}")
    return str(root).format(name=name, dataset=name)


def suite_datasets(names: Sequence[str], root: str | Path, image_size: int | None | str = "auto",
                   variable_size: int = 224) -> list[DatasetEntry]:
    """Sets of the clip-benchmark zero-shot suite.

    ``root`` is either a template holding ``{name}`` (as clip-benchmark's ``--dataset_root``) or a
    folder holding one sub-folder per dataset name. ``image_size="auto"``: native size where a set
    has one (:data:`NATIVE_SIZE_SETS`), ``variable_size`` elsewhere (:func:`suite_image_size`;
    the evaluated model's input size, as CLIP's preprocessing resizes to it). A set's folder
    may also be clip-benchmark's webdataset download (``classnames.txt`` and ``test/*.tar``, as the
    release used): its own class names and templates then come with it.
    """
    from mmtard.data import build_zeroshot_dataset
    from mmtard.data.benchmark_shards import benchmark_shard_set, is_benchmark_shard_folder
    from mmtard.zeroshot import suite_classnames

    out = []
    for name in names:
        where = _suite_root(root, name)
        size = suite_image_size(name, variable_size) if image_size == "auto" else image_size
        if is_benchmark_shard_folder(where):
            ds, classnames, templates = benchmark_shard_set(name, where, size)
            out.append(DatasetEntry(name, ds, classnames, templates))
            continue
        ds = build_zeroshot_dataset(name, where, image_size=size, strict=True)
        classnames = suite_classnames(name) or list(ds.classnames)
        out.append(DatasetEntry(name, ds, classnames, list(ds.templates)))
    return out
