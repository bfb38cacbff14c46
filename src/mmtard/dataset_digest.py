"""Which images an evaluation record was computed on, beyond their names.

An evaluation record names its samples by path relative to the dataset root, so a dataset
regenerated or replaced in place (another world seed, re-extracted files, a stray class folder
that shifts the labels) keeps every name; resuming into such a record would mix verdicts on two
sets of images. A record therefore keeps two digests of the files it evaluated, each with their
labels: one of their sizes and modification times, cheap to recompute on every resume, and one of
their bytes, read again only when the first differs (files copied or touched, same images).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

#: the two digests of a record's ``data`` block: file sizes and mtimes, then file contents
KINDS = ("files", "bytes")


def evaluated_files(dataset) -> tuple[Sequence, Sequence] | None:
    """(image paths, labels) of a dataset read from image files, by index; None for the others
    (streamed webdataset shards, in-memory sets, torchvision sets kept in a few binary files).
    Indexed shards mark each sample themselves (``digest_mark``); torchvision's array sets are
    digested from their arrays (:func:`in_memory_arrays`)."""
    files, targets = getattr(dataset, "files", None), getattr(dataset, "targets", None)
    if files is not None and targets is not None:  # mmtard's folder, list and CSV datasets
        return files, targets
    samples = getattr(getattr(dataset, "inner", None), "samples", None)  # a wrapped torchvision ImageFolder
    if isinstance(samples, list) and samples and len(samples) == len(dataset) and isinstance(samples[0], tuple):
        return [s[0] for s in samples], [s[1] for s in samples]
    return None


def in_memory_arrays(dataset) -> tuple[np.ndarray, Sequence] | None:
    """(images, labels) of a torchvision set that holds its images as one array read from a few
    binary files (CIFAR-10/100: ``data`` and ``targets``; STL-10: ``data`` and ``labels``), itself
    or wrapped (``inner``); None for the others."""
    inner = getattr(dataset, "inner", dataset)
    images = getattr(inner, "data", None)
    labels = getattr(inner, "targets", None)
    if labels is None:
        labels = getattr(inner, "labels", None)
    if isinstance(images, np.ndarray) and labels is not None and len(images) == len(labels) == len(dataset):
        return images, labels
    return None


def _file_mark(path: Path, kind: str) -> str:
    """One image file's mark: its size and modification time, or its bytes' hash; an unreadable
    file enters as its error (the loader skips it and the record notes it)."""
    try:
        if kind == "bytes":
            return hashlib.sha256(path.read_bytes()).hexdigest()
        stat = path.stat()
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    except OSError as exc:
        return f"unreadable:{exc.errno}"


def _sample_marks(dataset, kind: str) -> tuple[Callable[[int], bytes], Sequence] | None:
    """(mark of sample i, labels) for the kinds of dataset a record can digest; None for others."""
    marker = getattr(dataset, "digest_mark", None)  # shards: one file holds many samples
    if marker is not None:
        return (lambda i: marker(i, kind).encode()), dataset.targets
    arrays = in_memory_arrays(dataset)
    if arrays is not None:  # the images themselves are at hand: both kinds digest their bytes
        images, labels = arrays
        return (lambda i: images[i].tobytes()), labels
    listed = evaluated_files(dataset)
    if listed is not None:
        files, targets = listed
        return (lambda i: _file_mark(Path(files[i]), kind).encode()), targets
    return None


def dataset_digest(dataset, indices: Sequence[int], kind: str) -> str | None:
    """Digest of the samples at ``indices`` and their labels: ``kind`` ``files`` hashes file sizes
    and modification times, ``bytes`` the contents (for indexed shards, each sample's own bytes
    and its shard's size and time, from the dataset's ``digest_mark``; for torchvision's array
    sets, the images' bytes either way). None for a dataset of none of these kinds; an unreadable
    file never stops an evaluation."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    marks = _sample_marks(dataset, kind)
    if marks is None:
        return None
    mark, labels = marks
    digest = hashlib.sha256()
    for i in indices:
        digest.update(mark(i) + f"|{labels[i]}\0".encode())
    return digest.hexdigest()[:16]


def same_data(stored: dict | None, current: Callable[[str], str | None]) -> bool:
    """Whether a record's ``data`` block (None: written before digests, or a dataset without
    files) still describes the dataset whose digests ``current(kind)`` computes, lazily: the bytes
    are read only when the sizes and modification times differ."""
    if stored is None:
        return True
    if stored.get("files") == current("files"):
        return True
    return stored.get("bytes") is not None and stored.get("bytes") == current("bytes")
