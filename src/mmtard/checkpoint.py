"""Checkpoints that survive a kill at any instant, and load without unpickling code.

A checkpoint is one ``.pt`` file holding only tensors and plain Python values (so
``torch.load(weights_only=True)`` reads it): trainable weights, optimiser, scheduler, step, data
position, RNG states and the resolved config. It is written to a temporary file, flushed, fsynced
and renamed, so a reader only ever sees a whole file; old checkpoints are pruned afterwards.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, Iterator

import numpy as np
import torch

from mmtard.errors import MmtardError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d+)\.pt$")
_TMP_SUFFIX = ".tmp"


def durable_replace(tmp: str | Path, path: str | Path) -> None:
    """Rename the finished ``tmp`` over ``path`` so that after a crash of the machine (not only of
    the process) ``path`` holds the old file or the whole new one: the data reach the disk before
    the rename does, and the rename itself is made durable."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        directory = os.open(Path(path).parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:  # some network and FUSE file systems cannot fsync a folder; the file is in place
        log.debug("cannot fsync the folder of %s: %s", path, exc)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """``write(handle)`` to a temporary file, then an atomic, fsynced rename over ``path``.

    A failed write (disk full, quota, permissions) removes the temporary file, leaves any previous
    file at ``path`` untouched and raises an MmtardError naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            write(handle)
        durable_replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise MmtardError(f"cannot write {path}: {exc.strerror or exc}; any previous file there is "
                              "intact. Free space (or fix the folder) and run the same command again") from exc
        raise
    return path


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(text: str, path: str | Path) -> Path:
    """UTF-8 text through :func:`atomic_write`."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (made if missing) while the block runs:
    for read-modify-write steps that several processes may take on one file (two evaluations into
    one folder, runs that build the same shard index). Released when the process dies."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def lock_without_waiting(path: str | Path, unguarded: str) -> IO[str] | None:
    """Open ``path`` (made if missing) and take an exclusive advisory lock on it without waiting:
    the open file, whose closing (or the process's end) releases the lock; None when another
    process holds it. On a file system without locks, a warning that nothing guards
    ``unguarded``, and the file unlocked: the work goes on. For a process's hold on a run or a
    record for as long as it works on it (:func:`exclusive_lock` waits instead)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError as exc:
        log.warning("cannot lock %s (%s): nothing stops %s", path, exc, unguarded)
    return handle


def unused_name(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``... whichever does not exist yet: where a damaged file is
    kept aside without replacing one kept earlier."""
    return next(c for c in (path.with_name(f"{path.name}.{n}") if n else path for n in itertools.count())
                if not c.exists())


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``step_<step>.pt``, then prune to the newest ``keep`` and drop temporary files that a
    killed writer left behind (only the process that holds the run writes here)."""
    path = atomic_save(state, checkpoint_dir(run_dir) / f"step_{step:08d}.pt")
    for _, old in list_checkpoints(run_dir)[:-max(keep, 1)]:
        old.unlink(missing_ok=True)
    for stale in checkpoint_dir(run_dir).glob(f".step_*{_TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
    return path


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in ``run_dir`` and its
    checkpoint folder (``.<name>.<pid>.tmp`` of :func:`atomic_save` and of the student's export;
    ``student.safetensors.tmp`` of earlier versions); only the process holding the run's lock may
    call this. Returns what it deleted."""
    run_dir = Path(run_dir)
    stale = [p for folder in (run_dir, checkpoint_dir(run_dir)) if folder.is_dir()
             for p in folder.iterdir() if p.is_file() and p.name.endswith(_TMP_SUFFIX)
             and (p.name.startswith(".") or p.name == f"student.safetensors{_TMP_SUFFIX}")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with ``weights_only=True``: never runs code from the file.

    A file that would need arbitrary unpickling is refused (unpickling can execute any code); a
    damaged file is refused with the advice to delete it and resume from the one before.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MmtardError(
            f"refusing to load checkpoint {path}: it needs arbitrary unpickling, which can execute code "
            f"(torch.load weights_only=True rejected it: {unpickling_reason(exc)}). If you trust the file, convert "
            "it once: state = torch.load(path, weights_only=False), keep only tensors and plain Python "
            "values, and torch.save it again; otherwise delete it"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - zip, EOF and OS errors alike mean "not readable"
        raise MmtardError(
            f"cannot read checkpoint {path}: {first_line(exc)}. Delete it to resume from the previous "
            "checkpoint, if any"
        ) from exc
    if not isinstance(state, dict) or "step" not in state:
        raise MmtardError(f"{path} is not an mmtard checkpoint (no 'step' entry)")
    return state


def first_line(exc: BaseException) -> str:
    """The first sentence of an error message (torch's zip errors go on for a paragraph)."""
    lines = str(exc).strip().splitlines()
    return lines[0].split(". ", 1)[0].rstrip(".") if lines else type(exc).__name__


def unpickling_reason(exc: BaseException) -> str:
    """The one informative sentence of torch's multi-paragraph weights_only refusal, e.g.
    ``Unsupported global: GLOBAL io.open was not an allowed global by default``."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    text = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". Please", 1)[0].rstrip(".") if lines else type(exc).__name__


def rng_state(cuda: bool | None = None) -> dict:
    """Every generator a run draws from, in a weights_only-loadable form; the current CUDA
    device's only where the run is on CUDA (``cuda``; default: where CUDA is initialised), so a
    CPU run never creates a CUDA context."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if cuda is None:
        cuda = torch.cuda.is_initialized()
    if cuda and torch.cuda.is_available():
        # the current device's stream only: a rank draws on its own GPU, and a list of every visible
        # GPU's state could not be restored where fewer GPUs are visible (another rank layout)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, cuda: bool | None = None) -> None:
    """Restore :func:`rng_state`'s generators; the CUDA one only where the run is on CUDA (``cuda``;
    default: where CUDA is initialised)."""
    python = state["python"]
    random.setstate((state["python_version"], tuple(python[:-1]), python[-1]))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if cuda is None:
        cuda = torch.cuda.is_initialized()
    if cuda and "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # checkpoints of earlier versions: one state per visible GPU
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)
