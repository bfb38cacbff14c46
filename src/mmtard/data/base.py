"""The map-style dataset every file-based source builds on, and small shared helpers.

Contract (other modules rely on it): ``dataset[i]`` is ``(image, target, i)`` where image is a
float32 tensor 3xHxW in [0, 1], target is an int label or a caption string, and ``i`` is the index
of the sample actually returned. Attributes: ``sample_ids`` (stable string id per index),
``root``; classification sets also have ``classnames`` (index = label).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mmtard.data.images import ImageTransform, SkipLog, corrupt_error, image_size_of, load_image
from mmtard.errors import DataError


def check_classnames(expected: Sequence[str], actual: Sequence[str], where: str) -> None:
    """Raises DataError naming the first index where two class lists differ.

    Args:
        expected: class names the caller relies on (e.g. those of the text head).
        actual: class names the dataset provides.
        where: what is being checked, for the message (e.g. a dataset root).
    """
    for idx, (exp, act) in enumerate(zip(expected, actual)):
        if exp != act:
            raise DataError(
                f"Class names of {where} differ at index {idx}: expected {exp!r}, got {act!r}."
            )
    if len(expected) != len(actual):
        idx = min(len(expected), len(actual))
        exp = expected[idx] if idx < len(expected) else "<none>"
        act = actual[idx] if idx < len(actual) else "<none>"
        raise DataError(
            f"Class names of {where} differ at index {idx}: expected {exp!r}, got {act!r} "
            f"({len(expected)} expected, {len(actual)} found)."
        )


def read_classnames(path: str | Path, error: type[Exception] = DataError, key: str = "") -> list[str]:
    """A class-names file: one name per line, line i naming label i. Blank lines may only end the
    file: one in the middle would shift every later label onto the wrong name. ``error`` and
    ``key`` (e.g. ``ConfigError`` and ``"data.classnames: "``) say where the file was named."""
    try:
        # utf-8-sig: a byte-order mark is not part of the first name
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8-sig").splitlines()]
    except OSError as exc:
        raise error(f"{key}cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{key}{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise error(f"{key}{path} holds no class name (one per line expected)")
    if "" in lines:
        raise error(f"{key}{path} line {lines.index('') + 1} is blank; every label from 0 up needs a name, "
                    "one per line")
    return lines


def subsample_indices(n_total: int, n: int, seed: int) -> list[int]:
    """A sorted, seeded choice of ``n`` distinct indices out of ``range(n_total)``.

    ``n >= n_total`` returns every index. The same arguments give the same list on every
    platform (Python's Mersenne twister, independent of numpy and torch).
    """
    if n_total < 0 or n < 0:
        raise ValueError(f"n_total and n must be non-negative, got {n_total} and {n}")
    if n >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), n))


def first_readable(index: int, n: int, load: Callable[[int], Any], failure: str) -> tuple[Any, int]:
    """The sample at ``index`` or, when it cannot be read (``load`` returns None), the next readable
    one, with the index it really came from: a bad file is replaced, never a crash mid-epoch."""
    if not -n <= index < n:
        raise IndexError(f"index {index} out of range for {n} samples")
    index %= n
    for offset in range(n):
        i = (index + offset) % n
        item = load(i)
        if item is not None:
            return item, i
    raise DataError(f"{failure} ({n} tried).")


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s augmentation in ``epoch``: a function of the three alone,
    hashed (numpy's SeedSequence), so distinct triples do not collide the way an affine mix does."""
    words = np.random.SeedSequence([seed % 2**63, epoch, index]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


class SeededSamples(Dataset):
    """One epoch of ``dataset`` whose sample ``i`` draws its random augmentation from
    :func:`augmentation_seed` ``(seed, epoch, i)``.

    Without it, augmentation draws from each DataLoader worker's stream, which depends on how many
    workers there are and where the loader was started, so a resumed run (or another
    ``num_workers``) would crop differently from an uninterrupted one. The seed is derived where
    the sample is read (in the workers), not for the whole epoch up front. The CPU torch RNG of the
    reading process is restored afterwards (with ``num_workers=0`` that is the trainer's own); the
    GPU's is never touched.
    """

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        # CPU generator only: torch.manual_seed would also reseed the GPU's, which fork_rng(devices=[])
        # does not restore (and augmentation runs on the CPU).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(augmentation_seed(self.seed, self.epoch, index))
            return self.dataset[index]


class ImageListDataset(Dataset):
    """Images listed as files with one target each.

    Unreadable files: with ``strict=False`` the sample is replaced by the next readable index
    (wrapping around) and counted in :attr:`skip_log`; with ``strict=True`` a DataError names
    the file. With ``image_size=None`` every image must have the size of the first one; a file of
    another size raises a DataError naming it, in both modes, because that is a setup error.

    Args:
        root: folder the dataset was read from.
        files: absolute image paths, in the stable order that defines the indices.
        targets: one int label or caption per file.
        sample_ids: stable string id per file (e.g. the path relative to ``root``).
        image_size: None keeps native size; an int resizes the shorter side and centre-crops.
        augment: random resized crop + horizontal flip (training only).
        strict: raise on unreadable files instead of skipping them.
    """

    def __init__(
        self,
        root: Path,
        files: Sequence[Path],
        targets: Sequence,
        sample_ids: Sequence[str],
        image_size: int | None = None,
        augment: bool = False,
        strict: bool = False,
    ):
        if len(files) != len(targets) or len(files) != len(sample_ids):
            raise ValueError("files, targets and sample_ids must have the same length")
        self.root = Path(root)
        self.files = [str(f) for f in files]  # str, not Path: several times smaller for ImageNet-sized lists
        self.targets = list(targets)
        self.sample_ids = list(sample_ids)
        self.image_size = image_size
        self.augment = augment
        self.strict = strict
        self.transform = ImageTransform(image_size, augment)
        self.skip_log = SkipLog()
        self._native_size = self._first_readable_size() if image_size is None else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, object, int]:
        img, i = first_readable(index, len(self.files), self._try_load, f"No readable image in {self.root}")
        return self.transform(img), self.targets[i], i

    def pop_skipped(self) -> tuple[int, list[str]]:
        """Number and paths of files skipped since the last call, then resets them."""
        return self.skip_log.pop()

    def _try_load(self, i: int):
        path = self.files[i]
        try:
            img = load_image(path)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            if self.strict:
                raise corrupt_error(path, exc) from exc
            self.skip_log.record(path, f"{type(exc).__name__}: {exc}")
            return None
        if self._native_size is not None and img.size != self._native_size:
            raise DataError(
                f"Image {path} is {img.size[0]}x{img.size[1]} but the images of {self.root} are "
                f"{self._native_size[0]}x{self._native_size[1]}; with image_size=None all images must "
                "have the same size. Pass an image_size to resize them."
            )
        return img

    def _first_readable_size(self) -> tuple[int, int] | None:
        for path in self.files[:32]:
            size = image_size_of(path)
            if size is not None:
                return size
        return None

    def verify_sizes(self) -> None:
        """Reads every header now and raises a DataError naming the first file of another size."""
        for path in self.files:
            size = image_size_of(path)
            if size is not None and self._native_size is not None and size != self._native_size:
                raise DataError(
                    f"Image {path} is {size[0]}x{size[1]} but the first image of {self.root} is "
                    f"{self._native_size[0]}x{self._native_size[1]}; pass an image_size to resize."
                )


def require_dir(path: Path, layout: str) -> Path:
    """Returns ``path`` if it is a folder, else raises a DataError showing ``layout``."""
    path = Path(path)
    if not path.is_dir():
        problem = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(f"Dataset folder {path} {problem}. Expected layout: {layout}")
    return path
