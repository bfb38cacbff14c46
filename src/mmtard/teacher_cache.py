"""The clean-teacher cache: image embeddings of clean, un-augmented training images, per sample id.

A frozen teacher's output on a fixed image never changes, so once a sample has been seen its clean
teacher's forward pass (a large ViT-L in the paper) is replaced by a read from a memory-mapped
file. Only valid when the training images are not augmented (the trainer checks this).

One pair of files per teacher and per machine (``teacher<i>-<weights>-node<n>-<samples>.f32`` and
``.mask``; ``<samples>`` a digest of the dataset's sample ids, so another dataset never reads these
rows, and ``<weights>`` one of the teacher's weights, so a teacher file replaced between two
sessions of a run never has the old teacher's rows read as its own):
every rank of a node reads and writes the same rows. Each epoch deals the samples out to the ranks
afresh, so with a cache per rank a rank would meet most samples for the first time in every one
of the first epochs (with 8 ranks, a per-rank cache is half full after 5 epochs); shared, the
cache is full after one epoch, and one copy sits on disk instead of one per rank. Nodes never
share: their page caches are not coherent, even on a shared file system.

A row is written before its mask byte, so a set mask means a written row. Rows are unit vectors;
when an existing cache is opened (a resumed run), a masked row whose norm is not 1 (the machine
went down between the two writes reaching the disk) is marked missing and computed again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from mmtard.errors import DataError
from mmtard.methods.base import TeacherEmbeddingCache

log = logging.getLogger(__name__)

#: a filled row is a unit vector; this far from norm 1 it is not a row that was fully written
_NORM_TOLERANCE = 1e-2
_CHECK_ROWS = 65536  # rows read at once when an existing cache is checked


def samples_digest(sample_ids: Sequence[str]) -> str:
    """A short digest of a dataset's sample ids, in order: the rows' meaning."""
    digest = hashlib.sha256()
    for sample_id in sample_ids:
        digest.update(sample_id.encode("utf-8", "surrogateescape"))
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def weights_digest(name: str, pretrained: str | None) -> str:
    """A short digest of where a teacher's weights come from: its architecture and weights source,
    and for a local file its size and modification time (a retrained teacher written to the same
    path changes them; reading the whole file would cost a ViT-L's worth of disk per start).
    ``v2``: OpenAI-derived teachers now run with QuickGELU, so rows written before are not theirs."""
    key = f"v2|{name}|{pretrained}"
    if pretrained and Path(pretrained).is_file():
        stat = Path(pretrained).stat()
        key += f"|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _create_once(path: Path, nbytes: int) -> None:
    """Create ``path`` as ``nbytes`` zero bytes unless it exists; safe when several ranks race:
    the file appears whole, through a hard link that fails if another rank made it first. On a
    file system without hard links, an exclusive create sized at once (a rank that sees it
    half-made waits, see :func:`_open`)."""
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.{os.uname().nodename}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.truncate(nbytes)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # no hard links here
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            pass
        else:
            os.ftruncate(fd, nbytes)
            os.close(fd)
    finally:
        tmp.unlink()


def _open(path: Path, dtype, shape: tuple[int, ...]) -> np.memmap:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    existed = path.exists()
    _create_once(path, nbytes)
    for _ in range(50):  # a file another rank created without hard links may be sized a moment later
        size = path.stat().st_size
        if size != 0:
            break
        time.sleep(0.1)
    if size == 0 and nbytes:
        raise DataError(f"clean-teacher cache {path} is still empty 5 s after it was created: the process "
                        f"that created it did not size it (it died?); delete {path} and start again")
    if size != nbytes:
        raise DataError(
            f"clean-teacher cache {path} has {size} bytes where {shape} rows of {np.dtype(dtype).name} "
            f"need {nbytes}: it was written with other teacher embeddings (another model width); delete "
            f"{path} (it is rebuilt) or train in a new run folder"
        )
    if existed:
        log.info("clean-teacher cache: reusing %s", path)
    return np.memmap(path, dtype=dtype, mode="r+", shape=shape)


class CleanTeacherCache(TeacherEmbeddingCache):
    """Clean-teacher embeddings of one dataset, one memory-mapped table per teacher, shared by the
    ranks of node ``node``; rows are filled on first sight and read afterwards."""

    def __init__(self, folder: str | Path, sample_ids: Sequence[str], node: int = 0,
                 teacher_weights: Sequence[str] = (), digest: str | None = None):
        """``teacher_weights``: per teacher index, a :func:`weights_digest` (indices without one
        are keyed by sample ids alone); ``digest``: :func:`samples_digest` of ``sample_ids`` when
        the caller has it already (a million ids take a while to hash)."""
        self.folder = Path(folder)
        self.teacher_weights = list(teacher_weights)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.num_samples = len(sample_ids)
        self.samples = digest or samples_digest(sample_ids)
        self.node = node
        self._tables: dict[int, tuple[np.memmap, np.memmap]] = {}
        self.hits = 0
        self.misses = 0
        self.invalid = 0  # masked rows found unwritten when the cache was opened
        self._warn_stale_files()

    def _warn_stale_files(self) -> None:
        """Cache files of another dataset or teacher (or of the layouts of earlier versions) are never
        read again; say how much disk they hold rather than leave them unnoticed."""
        current = tuple(f"teacher{i}-{w}-" for i, w in enumerate(self.teacher_weights))
        stale = [f for f in self.folder.glob("teacher*")
                 if f"-{self.samples}." not in f.name or (current and not f.name.startswith(current))]
        if stale:
            gib = sum(f.stat().st_size for f in stale) / 2**30
            log.warning("clean-teacher cache %s: %d files (%.2f GiB) belong to another dataset, teacher or an older "
                        "layout and are not used; delete them to free the space", self.folder, len(stale), gib)

    def _table(self, teacher_index: int, dim: int) -> tuple[np.memmap, np.memmap]:
        if teacher_index not in self._tables:
            weights = (f"-{self.teacher_weights[teacher_index]}" if teacher_index < len(self.teacher_weights)
                       else "")
            stem = self.folder / f"teacher{teacher_index}{weights}-node{self.node}-{self.samples}"
            values = _open(stem.with_suffix(".f32"), np.float32, (self.num_samples, dim))
            mask = _open(stem.with_suffix(".mask"), np.bool_, (self.num_samples,))
            self._unmask_unwritten(values, mask)
            self._tables[teacher_index] = (values, mask)
        return self._tables[teacher_index]

    def _unmask_unwritten(self, values: np.memmap, mask: np.memmap) -> None:
        for start in range(0, self.num_samples, _CHECK_ROWS):
            stop = min(start + _CHECK_ROWS, self.num_samples)
            filled = np.nonzero(mask[start:stop])[0]
            if filled.size == 0:
                continue
            norms = np.linalg.norm(values[start:stop][filled], axis=1)
            bad = filled[np.abs(norms - 1.0) > _NORM_TOLERANCE]
            if bad.size:
                mask[start + bad] = False
                self.invalid += int(bad.size)
        if self.invalid:
            log.warning("clean-teacher cache: %d rows were marked but not written; they are recomputed", self.invalid)

    @torch.no_grad()
    def lookup(self, teacher_index: int, model: nn.Module, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings of ``images`` (sample ids ``indices``), storing the misses.

        A micro-batch with any miss runs the teacher on all of it and keeps the misses' rows (the
        hits keep their stored rows): a compiled tower has its graph for the micro-batch's size,
        while the count of misses changes from batch to batch once the cache is nearly full (the
        second epoch: the first epoch's dropped last batch), and each new count would recompile
        the tower (compiled with static shapes, ``speed.compile_method``; steps of 7 s instead of
        0.2 s with a ViT-B-16 on an H200: benchmarks/RESULTS.md). Eager, the extra rows cost one
        teacher pass in each such batch, at most as many batches as the first epoch left out
        images (under a global batch), once per run."""
        ids = indices.detach().cpu().numpy()
        dim = model.text_weights.shape[0]
        values, mask = self._table(teacher_index, dim)
        missing = ~mask[ids]
        if missing.any():
            rows = torch.from_numpy(np.nonzero(missing)[0]).to(images.device)
            fresh = model.image_embed(images)[rows].float()
            values[ids[missing]] = fresh.cpu().numpy()
            mask[ids[missing]] = True  # after the row: a set mask means a written row
        self.hits += int((~missing).sum())
        self.misses += int(missing.sum())
        rows = torch.from_numpy(np.ascontiguousarray(values[ids]))
        if images.device.type == "cuda":
            # A copy from pageable memory waits for the whole stream first (a host-device sync per
            # step); from pinned memory it is queued like any kernel.
            return rows.pin_memory().to(images.device, non_blocking=True)
        return rows.to(images.device)

    def flush(self) -> None:
        for values, mask in self._tables.values():
            values.flush()
            mask.flush()
