"""clip-benchmark's webdataset form of the zero-shot suite (its ``wds/...`` datasets).

The release evaluated the suite from these shards (``wds/vtab/eurosat`` and the like, as published
on the Hugging Face hub under ``clip-benchmark/wds_*``), whose splits differ from torchvision's
for some sets. A downloaded one is a folder holding ``classnames.txt`` (one name per label),
usually ``zeroshot_classification_templates.txt`` (one template per line, class slot ``{c}``) and
``<split>/{0..n-1}.tar`` shards (``<split>/nshards.txt`` says n) of samples with an image
(webp, png or jpg) and a ``.cls`` label. It is read here by random
access (:class:`mmtard.data.shard_index.IndexedShardDataset`), so evaluation records, subsets and
resume work as with folders.
"""

from __future__ import annotations

import re
from pathlib import Path

from mmtard.data.shard_index import IndexedShardDataset
from mmtard.data.zeroshot_suite import template_slot, zeroshot_templates
from mmtard.errors import DataError

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def is_benchmark_shard_folder(root: str | Path, split: str = "test") -> bool:
    """Whether ``root`` looks like a downloaded clip-benchmark webdataset set."""
    root = Path(root)
    return (root / CLASSNAMES_FILE).is_file() and any((root / split).glob("*.tar"))


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def _shard_order(path: Path) -> tuple:
    """``2.tar`` before ``10.tar``: clip-benchmark numbers its shards without padding."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem))


def benchmark_shard_set(name: str, root: str | Path, image_size: int | None,
                        split: str = "test") -> tuple[IndexedShardDataset, list[str], list[str]]:
    """The dataset, class names and templates of one clip-benchmark webdataset set."""
    root = Path(root)
    count_file = root / split / "nshards.txt"
    if count_file.is_file():  # clip-benchmark reads exactly {0..n-1}.tar
        text = count_file.read_text(encoding="utf-8", errors="replace").strip()
        if not text.isdigit():
            raise DataError(f"{count_file}: expected the number of shards, found {text[:40]!r}")
        shards = [root / split / f"{i}.tar" for i in range(int(text))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise DataError(f"{count_file} says {len(shards)} shards, but {missing[0]} is missing from {root / split}")
    else:
        shards = sorted((root / split).glob("*.tar"), key=_shard_order)
    if not shards:
        raise DataError(f"Zero-shot dataset {name!r}: no {split}/*.tar shards in {root}")
    classnames = _lines(root / CLASSNAMES_FILE)
    templates_file = root / TEMPLATES_FILE
    templates = ([template_slot(t) for t in _lines(templates_file)] if templates_file.is_file()
                 else zeroshot_templates(name))
    if not templates or any("{}" not in t for t in templates):
        raise DataError(f"{templates_file}: every template needs the class slot {{c}}")
    dataset = IndexedShardDataset([str(s) for s in shards], image_size=image_size, classnames=classnames)
    return dataset, classnames, templates
