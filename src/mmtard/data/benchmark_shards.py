"""clip-benchmark's webdataset form of the zero-shot suite (its ``wds/...`` datasets).

The release evaluated the suite from these shards (``wds/vtab/eurosat`` and the like, as published
on the Hugging Face hub under ``clip-benchmark/wds_*``), whose splits differ from torchvision's
for some sets. A downloaded one is a folder holding ``classnames.txt`` (one name per label),
usually ``zeroshot_classification_templates.txt`` (one template per line, class slot ``{c}``) and
``<split>/{0..n-1}.tar`` shards (``<split>/nshards.txt`` says n) of samples with an image
(webp, png or jpg) and a ``.cls`` label. It is read here by random access
(:class:`mmtard.data.shard_index.IndexedShardDataset`, strict: an incomplete sample or unreadable
image stops the evaluation, as in clip-benchmark), so evaluation records, subsets and resume work
as with folders.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from mmtard.data.base import read_classnames
from mmtard.data.shard_index import IndexedShardDataset
from mmtard.data.zeroshot_suite import template_slot, zeroshot_templates
from mmtard.errors import DataError

log = logging.getLogger(__name__)

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
TYPE_FILE = "dataset_type.txt"


def is_benchmark_shard_folder(root: str | Path, split: str = "test") -> bool:
    """Whether ``root`` looks like a downloaded clip-benchmark webdataset set."""
    root = Path(root)
    return (root / split / "nshards.txt").is_file() or any((root / split).glob("*.tar"))


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc


def _shard_order(path: Path) -> tuple:
    """``2.tar`` before ``10.tar``: clip-benchmark numbers its shards without padding."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem))


def _shards(root: Path, split: str) -> list[Path]:
    count_file = root / split / "nshards.txt"
    if not count_file.is_file():
        return sorted((root / split).glob("*.tar"), key=_shard_order)
    text = count_file.read_text(encoding="utf-8", errors="replace").strip()
    if not text.isdigit():
        raise DataError(f"{count_file}: expected the number of shards, found {text[:40]!r}")
    shards = [root / split / f"{i}.tar" for i in range(int(text))]  # clip-benchmark reads exactly these
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise DataError(f"{count_file} says {len(shards)} shards, but {missing[0]} is missing from {root / split}")
    return shards


def _classnames(root: Path) -> list[str]:
    path = root / CLASSNAMES_FILE
    if not path.is_file():
        raise DataError(f"{root} holds clip-benchmark shards but no {CLASSNAMES_FILE} (one class name per label)")
    return read_classnames(path)  # as clip-benchmark: line i is label i


def _templates(name: str, root: Path) -> list[str]:
    path = root / TEMPLATES_FILE
    if not path.is_file():
        log.info("%s: no %s; clip-benchmark's own templates for %r are used", root, TEMPLATES_FILE, name)
        return zeroshot_templates(name)
    templates = [template_slot(line.strip()) for line in _text(path).splitlines() if line.strip()]
    if not templates:
        raise DataError(f"{path} holds no template")
    for template in templates:
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as exc:
            raise DataError(f"{path}: template {template!r} is not a format with one class slot {{c}}") from exc
        if "{}" not in template:
            raise DataError(f"{path}: template {template!r} lacks the class slot {{c}}")
    return templates


def benchmark_shard_set(name: str, root: str | Path, image_size: int | None,
                        split: str = "test") -> tuple[IndexedShardDataset, list[str], list[str]]:
    """The dataset, class names and templates of one clip-benchmark webdataset set."""
    root = Path(root)
    kind = _text(root / TYPE_FILE).strip().lower() if (root / TYPE_FILE).is_file() else "classification"
    if kind != "classification":
        raise DataError(f"{root}: a {kind!r} set ({TYPE_FILE}); zero-shot evaluation reads classification sets only")
    shards = _shards(root, split)
    if not shards:
        raise DataError(f"Zero-shot dataset {name!r}: no {split}/*.tar shards in {root}")
    classnames, templates = _classnames(root), _templates(name, root)
    dataset = IndexedShardDataset([str(s) for s in shards], image_size=image_size, strict=True, classnames=classnames)
    dataset.image_size = image_size  # recorded per set by the evaluation (None: native size)
    return dataset, classnames, templates
