"""Webdataset classification shards read by random access, as a map-style dataset for training.

The streaming reader (:class:`mmtard.data.shards.ShardDataset`) suits pre-training on captions;
training cannot use it: the trainer deals every epoch out by sample index (the same order on any
number of ranks, resume at the exact sample, the clean-teacher cache keyed by index), and a
stream has no index. An uncompressed tar is a sequence of 512-byte headers each followed by its
file's bytes, so one pass over the headers gives every member's offset and size, and a sample can
then be read with one ``os.pread`` at any position, like a file in a folder.

The index (per sample: shard, offset and size of the image, label, key) is built once and kept
under ``index_dir`` keyed by the shards' paths, sizes and modification times, so a changed shard
gives a new index. Samples follow webdataset's grouping: members whose names share everything up
to the first dot of the base name form one sample; it needs an image (``IMAGE_KEYS``) and a
``.cls`` member (an integer label).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from mmtard.checkpoint import atomic_write, exclusive_lock, first_line
from mmtard.data.base import first_readable
from mmtard.data.images import ImageTransform, SkipLog, corrupt_error, decode_image_bytes
from mmtard.data.shards import IMAGE_KEYS, expand_shards
from mmtard.errors import DataError, MmtardError

log = logging.getLogger(__name__)

_INDEX_VERSION = 2
#: what training reads: classification shards (caption shards, .txt, are pre-training's)
CLASS_SHARD_LAYOUT = ("tar files named by a brace pattern, e.g. 'shards/train-{000000..000009}.tar', each sample "
                      "a key with .jpg/.png plus .cls (an integer label); caption shards (.txt) are for pre-training")
#: shard files a process keeps open at once (ImageNet comes in hundreds of shards, and every
#: DataLoader worker would otherwise hold them all against the descriptor limit)
OPEN_SHARDS = 16


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's key/extension split: the key runs to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def _scan_shard(path: str, strict: bool) -> tuple[list[tuple[int, int, int, str]], list[str]]:
    """(image offset, image size, label, key) per complete sample of one shard, and the problems."""
    if os.path.getsize(path) == 0:
        raise DataError(f"Shard {path} is empty (0 bytes). Expected {CLASS_SHARD_LAYOUT}.")
    samples, problems = [], []
    try:
        tar = tarfile.open(path, mode="r:")  # "r:" refuses compressed tars: they have no random access
    except tarfile.ReadError as exc:
        raise DataError(f"Shard {path} is not an uncompressed tar ({exc}); shards are read by random access, "
                        f"which needs plain .tar files. Expected {CLASS_SHARD_LAYOUT}.") from exc
    with tar:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_name(member.name)
                groups.setdefault(key, {})[ext] = member
        except tarfile.TarError as exc:
            raise DataError(f"Shard {path} cannot be read to its end ({exc}): truncated or damaged; "
                            "rewrite it or leave it out of data.root") from exc
        for key, members in groups.items():
            image = next((members[e] for e in IMAGE_KEYS if e in members), None)
            problem = None
            if image is None:
                problem = f"no image ({', '.join(IMAGE_KEYS)}) member"
            elif "cls" not in members:
                problem = "no .cls member"
            else:
                text = tar.extractfile(members["cls"]).read().decode("utf-8", "replace").strip()
                label = int(text) if text.isascii() and text.isdigit() else None
                if label is None:
                    problem = f".cls holds {text[:40]!r}, not a label (an integer >= 0)"
            if problem is not None:
                if strict:
                    raise DataError(f"Shard {path}, sample {key}: {problem}. Expected {CLASS_SHARD_LAYOUT}.")
                problems.append(f"{path}:{key}: {problem}")
                continue
            samples.append((image.offset_data, image.size, label, key))
    return samples, problems


def _fingerprint(urls: Sequence[str], strict: bool) -> str:
    """Index version, strictness (a lenient index leaves out what a strict one refuses), and each
    shard's path, size, modification time, change time and inode: a shard copied over with its
    size and modification time kept (``cp -p``, ``rsync -t``) still gets a new change time (which
    no copy can set) or inode, so it is scanned again rather than read at stale offsets."""
    digest = hashlib.sha256(f"v{_INDEX_VERSION}|strict={strict}".encode())
    for url in urls:
        stat = os.stat(url)
        digest.update(f"{os.path.abspath(url)}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|"
                      f"{stat.st_ino}\n".encode())
    return digest.hexdigest()[:24]


def build_index(urls: Sequence[str], strict: bool = False, index_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """The sample index of ``urls`` (local, uncompressed tars), read from ``index_dir`` when a
    matching one is there; written there (atomically) after a scan, which one process does while
    the others wait.

    Returns arrays of one entry per sample: ``shard`` (position in ``urls``), ``offset`` and
    ``size`` of the image bytes, ``label``, ``key``; and ``skipped``, the number of incomplete
    samples left out.
    """
    if index_dir is None:
        return _scan(urls, strict)
    kept = Path(index_dir) / f"shard-index-{_fingerprint(urls, strict)}.npz"
    kept.parent.mkdir(parents=True, exist_ok=True)
    # One process scans, the others (ranks, concurrent runs) wait on the lock and then read its
    # file: a lock, not a collective, so a long scan cannot trip a process-group timeout.
    with exclusive_lock(kept.with_suffix(".lock")):
        index = _read_index(kept)
        if index is not None:
            if int(index["skipped"]):
                log.warning("%d incomplete samples are left out of the shards' index (%s)",
                            int(index["skipped"]), kept)
            return index
        index = _scan(urls, strict)
        try:
            atomic_write(kept, lambda handle: np.savez(handle, **index))
        except MmtardError as exc:  # the index only saves the next start a scan
            log.warning("shard index not kept (%s); the shards are scanned again next time", exc)
        return index


def _read_index(path: Path) -> dict[str, np.ndarray] | None:
    """A kept index, or None when there is none or it cannot be read (damaged: scanned again)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            index = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - a damaged zip, a cut file: all mean "scan again"
        log.warning("shard index %s is unreadable (%s); scanning the shards again", path, first_line(exc))
        return None
    return index


def _scan(urls: Sequence[str], strict: bool) -> dict[str, np.ndarray]:
    """One pass over every shard's headers (see :func:`build_index` for the arrays)."""
    shard, offset, size, label, keys = [], [], [], [], []
    problems: list[str] = []
    for s, url in enumerate(urls):
        samples, bad = _scan_shard(url, strict)
        problems += bad
        for off, n, lab, key in samples:
            shard.append(s)
            offset.append(off)
            size.append(n)
            label.append(lab)
            keys.append(key)
    if problems:
        log.warning("%d incomplete samples left out of the shards' index, e.g. %s", len(problems), problems[0])
    return {"shard": np.asarray(shard, np.int32), "offset": np.asarray(offset, np.int64),
            "size": np.asarray(size, np.int64), "label": np.asarray(label, np.int64),
            "key": np.asarray(keys, dtype=np.str_), "skipped": np.asarray(len(problems), np.int64)}


def shard_classnames(num_classes: int, classnames: Sequence[str] | None, where: str) -> list[str]:
    """The class names of classification shards: given (one per label), or ImageNet's for 1 000."""
    if classnames is not None:
        if len(classnames) < num_classes:
            raise DataError(f"{where}: labels go up to {num_classes - 1} but only {len(classnames)} "
                            "class names were given")
        return list(classnames)
    if num_classes == 1000:
        from mmtard.data.folders import imagenet_classnames

        return imagenet_classnames()
    raise DataError(f"{where}: {num_classes} classes and no class names; set data.classnames to a text file "
                    "with one class name per line, in label order")


class IndexedShardDataset(Dataset):
    """``dataset[i]`` is ``(image, label, i)`` over local webdataset classification shards.

    Contract of :mod:`mmtard.data.base`: unreadable images are replaced by the next readable
    sample (counted in ``skip_log``) unless ``strict``; ``sample_ids`` are ``<shard name>:<key>``.

    Args:
        urls: shard paths or brace patterns (``::`` separates several); local files only.
        image_size: None keeps native size; an int resizes the shorter side and centre-crops.
        augment: random resized crop + horizontal flip.
        strict: raise on an incomplete sample or unreadable image instead of skipping it.
        classnames: one name per label; ImageNet's when None and there are 1 000 classes.
        index_dir: folder where the index is kept between runs (None: scan every time).
    """

    def __init__(self, urls: str | Sequence[str], image_size: int | None = None, augment: bool = False,
                 strict: bool = False, classnames: Sequence[str] | None = None,
                 index_dir: str | Path | None = None):
        self.urls = expand_shards(urls)
        remote = [u for u in self.urls if "://" in u or u.startswith("pipe:")]
        if remote:
            raise DataError(f"Shard {remote[0]} is not a local file: training reads shards by random access; "
                            "copy them to a local or mounted disk first")
        index = build_index(self.urls, strict, index_dir)
        if len(index["label"]) == 0:
            raise DataError(f"No complete sample (image + .cls) in {self.urls[0]} and the other shards. "
                            f"Expected {CLASS_SHARD_LAYOUT}.")
        self._shard, self._offset, self._size = index["shard"], index["offset"], index["size"]
        self._keys = index["key"]
        self._names = [Path(u).name for u in self.urls]
        self.targets = index["label"]  # numpy, not a list: no per-item objects copied into workers
        self.root = Path(self.urls[0]).parent
        self.classnames = shard_classnames(int(self.targets.max()) + 1, classnames, str(self.root))
        self.strict = strict
        self.transform = ImageTransform(image_size, augment)
        self.skip_log = SkipLog()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def sample_ids(self) -> _SampleIds:
        return _SampleIds(self._names, self._shard, self._keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        img, i = first_readable(index, len(self), self._try_load, f"No readable image in the shards of {self.root}")
        return self.transform(img), int(self.targets[i]), i

    def pop_skipped(self) -> tuple[int, list[str]]:
        """Number and ids of samples skipped since the last call, then resets them."""
        return self.skip_log.pop()

    def digest_mark(self, i: int, kind: str) -> str:
        """What :func:`mmtard.dataset_digest.dataset_digest` records of sample ``i``: its shard's
        path, size and modification time and its place there (``files``), or its bytes
        (``bytes``). A shard re-downloaded or relabelled in place keeps every sample id; this does
        not. An unreadable shard enters as its error."""
        try:
            if kind == "bytes":
                return hashlib.sha256(self._read(i)).hexdigest()
            path = self.urls[int(self._shard[i])]
            stat = os.stat(path)
            return f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}:{int(self._offset[i])}"
        except (OSError, DataError) as exc:  # DataError: the shard shrank under its index
            return f"unreadable:{getattr(exc, 'errno', None) or type(exc).__name__}"

    def _descriptor(self, shard: int) -> int:
        """An open descriptor of ``shard``; at most :data:`OPEN_SHARDS` per process, least recently
        used closed first. Descriptors are per process: a DataLoader worker opens its own."""
        if self._pid != os.getpid():
            self._fds, self._pid = OrderedDict(), os.getpid()
        if shard in self._fds:
            self._fds.move_to_end(shard)
            return self._fds[shard]
        if len(self._fds) >= OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        self._fds[shard] = os.open(self.urls[shard], os.O_RDONLY)
        return self._fds[shard]

    def _read(self, i: int) -> bytes:
        """The image bytes of sample ``i``. I/O errors propagate: they are not a bad image."""
        s, size = int(self._shard[i]), int(self._size[i])
        data = os.pread(self._descriptor(s), size, int(self._offset[i]))
        if len(data) != size:
            raise DataError(f"Shard {self.urls[s]} ends before sample {self._keys[i]}'s {size} bytes: "
                            "it changed or was truncated after it was indexed")
        return data

    def _try_load(self, i: int) -> Image.Image | None:
        data = self._read(i)
        try:
            return decode_image_bytes(data)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for undecodable bytes
            sid = self.sample_ids[i]
            if self.strict:
                raise corrupt_error(sid, exc) from exc
            self.skip_log.record(sid, f"{type(exc).__name__}: {exc}")
            return None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()  # descriptors do not travel to worker processes
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) != os.getpid():
            return  # a forked copy: the descriptors belong to the parent
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


class _SampleIds(Sequence):
    """``<shard name>:<key>`` per index, made on access (a list would hold a string per sample)."""

    def __init__(self, names: list[str], shard: np.ndarray, keys: np.ndarray):
        self._names, self._shard, self._keys = names, shard, keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return f"{self._names[int(self._shard[i])]}:{self._keys[i]}"
