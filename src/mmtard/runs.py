"""Run folders: what makes DIR resumable, finished, or someone else's.

A run folder holds ``config.yaml`` (written first of all, so that whatever a kill leaves is in a
folder marked as a run), ``run.json`` (versions, git commit, batch plan), ``metrics.csv``,
``tensorboard/``, ``checkpoints/`` and, once finished, ``student.safetensors``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import yaml

from mmtard.checkpoint import atomic_write_text, latest_checkpoint, lock_without_waiting
from mmtard.config import Config, from_dict, save_config, to_dict
from mmtard.errors import ConfigError, MmtardError

log = logging.getLogger(__name__)

FINISHED_MARKER = "student.safetensors"
#: may change between a run and its resumption: length, logging, loading and the speed switches
#: (same mathematics; a run saved before a switch existed lacks its key)
_IGNORED_ON_COMPARE = {("train", "steps"), ("train", "log_every"), ("train", "ckpt_every"),
                       ("train", "keep_checkpoints"), ("data", "num_workers"),
                       ("train", "compile"), ("train", "compile_mode"), ("train", "compile_attack"),
                       ("train", "patch_embed"), ("train", "last_block"),
                       ("train", "attention"), ("train", "teacher_attention")}


def _comparable(config: dict) -> dict:
    """The part of a config that must not change between a run and its resumption."""
    return {section: {k: v for k, v in values.items() if (section, k) not in _IGNORED_ON_COMPARE}
            if isinstance(values, dict) else values for section, values in config.items()}


def _differences(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf where two config dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{key}.{i}")]
    return [] if old == new else [(key, old, new)]


def prepare_run_dir(run_dir: Path, config: Config, force: bool, is_main: bool = True) -> Path | None:
    """Create DIR or decide how to continue in it; returns the checkpoint to resume from, if any.

    A finished run is not overwritten without ``force``; a run with checkpoints resumes only with
    the same config (except its length, logging cadence and speed switches); a folder holding
    something that is not an mmtard run is refused. Nothing is deleted here: with ``force``, or
    when a run starts afresh over the remains of one killed before its first checkpoint,
    :func:`start_fresh` clears DIR once the new run's models and data have been built.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise MmtardError(f"output path {run_dir} exists and is not a folder")
    if not force:
        if (run_dir / FINISHED_MARKER).exists():
            raise MmtardError(f"{run_dir} holds a finished run ({FINISHED_MARKER}); pass --force to overwrite it")
        last = latest_checkpoint(run_dir)
        if last is not None:
            _check_same_config(run_dir, config, is_main)
            return last
    saved, checkpoints = run_dir / "config.yaml", run_dir / "checkpoints"
    if run_dir.exists() and any(run_dir.iterdir()) and not (saved.exists() or checkpoints.exists()):
        raise MmtardError(f"{run_dir} is not empty and is not an mmtard run folder; choose another --out")
    if is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MmtardError(f"cannot write to output folder {run_dir}: {exc.strerror or exc}") from exc
        if saved.exists():  # an earlier run's config stays until start_fresh: a bad new config deletes nothing
            _probe_writable(run_dir)
        else:  # first of all, so that whatever a kill leaves behind is in a folder marked as a run
            save_config(config, saved)
    return None


def remove_unused_run_dir(run_dir: Path) -> None:
    """Remove DIR when it holds only what :func:`prepare_run_dir` and :class:`RunLock` put there
    (the config and the lock): a run refused while it was built leaves no folder behind. Anything
    else in DIR keeps it."""
    ours = {"config.yaml", ".lock"}
    try:
        if not all(p.name in ours and p.is_file() for p in run_dir.iterdir()):
            return
        for name in ours:
            (run_dir / name).unlink(missing_ok=True)
        run_dir.rmdir()
    except OSError as exc:  # the refusal the user is about to see matters more than this
        log.debug("could not remove %s: %s", run_dir, exc)


def _probe_writable(run_dir: Path) -> None:
    probe = run_dir / ".write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise MmtardError(f"cannot write to output folder {run_dir}: {exc.strerror or exc}") from exc


class RunLock:
    """Rank 0's exclusive hold on DIR while a run builds and trains there: a second process on the
    same folder (a requeued job whose first copy still runs, the same command typed twice) is
    refused, where the two would overwrite each other's checkpoints and metrics. An advisory lock
    on ``DIR/.lock``, released when the run ends or its process dies; on a file system without
    locks the run goes on unguarded."""

    def __init__(self, run_dir: Path):
        self._handle = lock_without_waiting(run_dir / ".lock", "a second run in the same folder")
        if self._handle is None:
            holder = (run_dir / ".lock").read_text().strip() or "another process"
            raise MmtardError(f"{run_dir} is in use by another mmtard run ({holder}); two runs in one folder would "
                              "overwrite each other's checkpoints. Wait for it to end or stop it, or use another "
                              "--out")
        self._handle.truncate(0)
        self._handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._handle.flush()

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops the lock
            self._handle = None


def _check_same_config(run_dir: Path, config: Config, is_main: bool) -> None:
    """Refuse to resume the checkpoints in DIR with another config than the one they were made with."""
    saved = run_dir / "config.yaml"
    if not saved.exists():  # written before the first checkpoint: someone removed it
        raise MmtardError(f"{run_dir} has checkpoints but no config.yaml, so it cannot be resumed safely; "
                          "use another --out or --force")
    try:
        previous = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as exc:
        raise MmtardError(f"{saved} is not valid YAML, so {run_dir} cannot be resumed safely; "
                          "repair it or use another --out") from exc
    if not isinstance(previous, dict) or not previous:
        raise MmtardError(f"{saved} is empty or not a mapping, so {run_dir} cannot be resumed safely; "
                          "repair it or use another --out")
    # Defaults filled in: a run saved before a key existed compares as that key's default. This
    # holds as long as every new key's default keeps the earlier behaviour (true of all so far).
    try:
        previous = to_dict(from_dict(type(config), previous))
    except ConfigError as exc:
        raise MmtardError(f"{saved} cannot be read by this version ({exc}), so {run_dir} cannot be resumed "
                          "safely; use another --out or --force") from exc
    old, new = _comparable(previous), _comparable(to_dict(config))
    if old != new:
        differences = _differences(old, new)
        changed = ", ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in differences[:5])
        if len(differences) > 5:
            changed += f" and {len(differences) - 5} more"
        raise MmtardError(f"{run_dir} holds a run with a different config ({saved}; {changed}); use another "
                          "--out or --force")
    before = (previous.get("train") or {}).get("steps")
    if before is not None and before != config.train.steps and is_main:
        log.warning("%s: train.steps changed from %s to %s on resume; the warm-up and cosine schedule "
                    "follow the new length from the resumed step on, so the learning rate jumps",
                    run_dir, before, config.train.steps)


def start_fresh(run_dir: Path, config: Config, force: bool) -> None:
    """Before a run that does not resume: with ``force`` clear DIR's earlier run; without, drop what
    a run killed before its first checkpoint left that the new run would read as its own (the
    clean-teacher cache, keyed by sample, not by teacher or config). Called once the new run's
    config has built its models and data, so that a bad config deletes nothing. The new config
    replaces the old one in place, never after a gap: a kill at any point leaves DIR a run folder
    that the same command takes up again."""
    doomed = run_dir / ".checkpoints.deleting"
    if force:
        # out of sight in one rename first: a kill inside the deletion must not leave an older
        # checkpoint that a later run without --force would resume with the old config
        if (run_dir / "checkpoints").exists():
            if doomed.exists():  # left by a kill in an earlier clearing
                shutil.rmtree(doomed, ignore_errors=True)
            os.replace(run_dir / "checkpoints", doomed)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        for name in (FINISHED_MARKER, "metrics.csv", "run.json"):
            (run_dir / name).unlink(missing_ok=True)
    for name in (doomed.name, "cache"):  # what a kill in an earlier clearing left, and the cache
        shutil.rmtree(run_dir / name, ignore_errors=True)
    save_config(config, run_dir / "config.yaml")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info() -> dict:
    import open_clip
    import torch

    import mmtard

    return {
        "mmtard": mmtard.__version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_run_info(run_dir: Path, world_size: int, plan) -> None:
    info = {**environment_info(), "world_size": world_size, "micro_batch": plan.micro_batch,
            "accumulation": plan.accumulation, "pid": os.getpid()}
    atomic_write_text(json.dumps(info, indent=2), run_dir / "run.json")
