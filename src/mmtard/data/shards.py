"""Webdataset tar shards: image + class (``cls``) or image + caption (``txt``).

Streams are split by node (torch.distributed rank) and then by DataLoader worker, so give at
least ``world_size * num_workers`` shards for every process to see data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import webdataset as wds
from torch.utils.data import IterableDataset

from mmtard.data.images import ImageTransform, SkipLog, corrupt_error, decode_image_bytes
from mmtard.errors import DataError

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
SHARD_LAYOUT = (
    "tar files named by a brace pattern, e.g. 'shards/train-{000000..000009}.tar', each sample a key with "
    ".jpg/.png plus .cls or .txt"
)


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Expands brace patterns (``a-{000..009}.tar``; ``::`` separates several patterns).

    Local paths must exist; ``pipe:``/``http(s):`` URLs are passed through unchecked.
    """
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    expanded: list[str] = []
    for pattern in patterns:
        for part in str(pattern).split("::"):
            try:
                expanded.extend(wds.shardlists.expand_urls(part))
            except ValueError as exc:  # e.g. unbalanced braces
                raise DataError(f"Cannot expand the shard pattern {part!r}: {exc}. Expected {SHARD_LAYOUT}.") from exc
    if not expanded:
        raise DataError(f"No shards given. Expected {SHARD_LAYOUT}.")
    for url in expanded:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise DataError(f"Shard {url} does not exist. Expected {SHARD_LAYOUT}.")
    return expanded


class ShardDataset(IterableDataset):
    """Iterates ``(image, target, key)`` over webdataset shards.

    The third element is the sample's ``__key__`` (a string), its stable sample id: shards have no
    global integer index. Target is an int for ``target="cls"`` and a str for ``target="txt"``.

    Args:
        urls: shard paths or brace patterns.
        target: ``"cls"`` (class label) or ``"txt"`` (caption).
        image_size: None keeps native size; an int resizes the shorter side and centre-crops.
        augment: random resized crop + horizontal flip.
        strict: raise on an unreadable sample instead of skipping it (counted in ``skip_log``).
        shuffle: sample shuffle buffer size (0: keep shard order; shards are then also in order).
        classnames: optional class names (index = label) for classification shards.
        seed: the shuffles' seed; None lets webdataset seed them from the process id and the
            time, so the order then differs between runs (training reads shards by random access
            instead: :class:`mmtard.data.shard_index.IndexedShardDataset`).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        target: str = "cls",
        image_size: int | None = None,
        augment: bool = False,
        strict: bool = False,
        shuffle: int = 0,
        classnames: Sequence[str] | None = None,
        seed: int | None = None,
    ):
        if target not in ("cls", "txt"):
            raise DataError(f"Shard target must be 'cls' or 'txt', got {target!r}.")
        self.urls = expand_shards(urls)
        self.root = Path(self.urls[0]).parent
        self.target = target
        self.image_size = image_size
        self.strict = strict
        self.shuffle = shuffle
        self.seed = seed
        self.transform = ImageTransform(image_size, augment)
        self.skip_log = SkipLog()
        if classnames is not None:
            self.classnames = list(classnames)

    def pop_skipped(self) -> tuple[int, list[str]]:
        """Number and ids (``shard:key``) of samples skipped since the last call, then resets them."""
        return self.skip_log.pop()

    def __iter__(self) -> Iterator:
        # Split first, then shuffle each worker's own share: a shard list shuffled before the split
        # is shuffled differently in every worker (webdataset seeds it per process), so the workers'
        # slices would overlap, reading some shards twice and others never.
        stages = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker]
        if self.shuffle:
            stages.append(wds.shuffle(len(self.urls), seed=self.seed))
        stages.append(wds.tarfile_to_samples(handler=self._on_tar_error))
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle, seed=self.seed))
        stages.append(self._decode)
        return iter(wds.DataPipeline(*stages))

    def _on_tar_error(self, exc: Exception) -> bool:
        if self.strict:
            raise DataError(f"Cannot read shard data: {exc}") from exc
        self.skip_log.record("<tar>", str(exc))
        return True  # keep going with the next sample/shard

    def _decode(self, samples: Iterator[dict]) -> Iterator:
        for sample in samples:
            sid = f"{sample.get('__url__', '?')}:{sample['__key__']}"
            try:
                img_key = next((k for k in IMAGE_KEYS if k in sample), None)
                if img_key is None:
                    raise DataError(f"sample has no image ({', '.join(IMAGE_KEYS)}) entry")
                if self.target not in sample:
                    raise DataError(f"sample has no .{self.target} entry")
                image = self.transform(decode_image_bytes(sample[img_key]))
                raw = sample[self.target].decode("utf-8").strip()
                target = int(raw) if self.target == "cls" else raw
            except Exception as exc:  # noqa: BLE001 - any broken sample is skipped or reported
                if self.strict:
                    raise corrupt_error(sid, exc) from exc
                self.skip_log.record(sid, f"{type(exc).__name__}: {exc}")
                continue
            yield image, target, sample["__key__"]
