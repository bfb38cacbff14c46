"""Kill anywhere, resume exactly: SIGKILL a CPU distillation at three points, rerun the same CLI
command each time, and get the bitwise-same student as an uninterrupted run.

The interrupted runs are children forked from the test process, each running ``mmtard.cli.main``
with the command line a user would type (forking skips the ~8 s of imports per run that a fresh
interpreter pays); the kill points are patched into the child only, so the library carries no
test hook. The uninterrupted reference is a genuine ``python -m mmtard distill`` subprocess, so
the comparison also spans two unrelated processes.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_trainer import TEACHERS

STEPS = 6


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm_kill(point: str, step: int) -> None:
    """Make this (child) process SIGKILL itself at ``point`` of ``step``.

    mid_step:    while the step is half done (one micro-batch's gradients accumulated)
    after_ckpt:  right after the checkpoint of the step is written
    ckpt_write:  during the checkpoint write of the step, with half of the temporary file on disk
    """
    from mmtard import checkpoint
    from mmtard.trainer import Trainer

    if point == "mid_step":
        train_step = Trainer._train_step

        def half_then_die(batches):
            yield next(batches)
            _die()

        def train_step_hook(self, batches, bad):
            return train_step(self, half_then_die(batches) if self.step + 1 == step else batches, bad)

        Trainer._train_step = train_step_hook
    elif point == "after_ckpt":
        save_checkpoint = checkpoint.save_checkpoint

        def save_then_die(run_dir, at, state, keep=2):
            path = save_checkpoint(run_dir, at, state, keep=keep)
            if at == step:
                _die()
            return path

        checkpoint.save_checkpoint = save_then_die
    elif point == "ckpt_write":
        torch_save = torch.save

        def half_save_then_die(obj, f, *args, **kwargs):
            if not (isinstance(obj, dict) and obj.get("step") == step):
                return torch_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            torch_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()

        torch.save = half_save_then_die
    else:
        raise ValueError(point)


def _child(argv: list[str], kill_at: tuple[str, int] | None) -> None:
    from mmtard.cli import main

    if kill_at is not None:
        _arm_kill(*kill_at)
    sys.exit(main(argv))


def _run_forked(argv: list[str], kill_at: tuple[str, int] | None = None) -> int:
    process = multiprocessing.get_context("fork").Process(target=_child, args=(argv, kill_at))
    process.start()
    process.join(timeout=120)
    if process.exitcode is None:
        process.kill()
        pytest.fail(f"{argv} did not finish in 120 s")
    return process.exitcode


def _argv(world_dir, config, out) -> list[str]:
    overrides = {
        "data.root": world_dir, "train.steps": STEPS, "train.global_batch": 8, "train.micro_batch": 4,
        "train.log_every": 1, "train.ckpt_every": 1, "train.keep_checkpoints": 2, "attack.steps": 1,
        "train.lr": 1e-3, "train.warmup_frac": 0.0, "train.precision": "fp32", "train.device": "cpu",
        "train.seed": 3,
    }
    return ["-q", "distill", "--config", str(config), "--out", str(out), TEACHERS,
            *(f"{k}={v}" for k, v in overrides.items())]


def _bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal would call -0.0 and 0.0 equal)."""
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(
        x.contiguous().view(-1).view(torch.uint8), y.contiguous().view(-1).view(torch.uint8))


def _checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _losses(out):
    return [(r["step"], r["loss"]) for r in csv.DictReader(open(out / "metrics.csv"))]


@pytest.mark.slow
def test_sigkill_at_three_points_then_resume_gives_the_same_student(world_dir, tmp_path):
    start = time.perf_counter()
    config = tmp_path / "c.yaml"
    config.write_text("student: {name: mmtard-tiny-vit}\n")
    killed, straight = tmp_path / "killed", tmp_path / "straight"

    # The uninterrupted reference: a fresh interpreter, alongside the interrupted chain.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    reference = subprocess.Popen([sys.executable, "-m", "mmtard", *_argv(world_dir, config, straight)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        argv = _argv(world_dir, config, killed)
        assert _run_forked(argv, ("mid_step", 2)) == -signal.SIGKILL
        assert _checkpoints(killed) == ["step_00000001.pt"]

        assert _run_forked(argv, ("after_ckpt", 3)) == -signal.SIGKILL
        assert _checkpoints(killed) == ["step_00000002.pt", "step_00000003.pt"]

        assert _run_forked(argv, ("ckpt_write", 5)) == -signal.SIGKILL
        stale, *whole = _checkpoints(killed)  # "." sorts first
        assert whole == ["step_00000003.pt", "step_00000004.pt"]
        assert stale.startswith(".step_00000005.pt.") and stale.endswith(".tmp")

        assert _run_forked(argv) == 0
    finally:
        _, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err

    # The half-written temporary file is gone, and pruning kept the newest two checkpoints.
    assert _checkpoints(killed) == ["step_00000005.pt", "step_00000006.pt"]
    a = load_file(str(straight / "student.safetensors"))
    b = load_file(str(killed / "student.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not _bitwise_equal(a[k], b[k])]
    assert not different, f"student tensors differ after kills: {different[:5]}"
    assert _losses(straight) == _losses(killed) and len(_losses(killed)) == STEPS
    print(f"kill/resume test: {time.perf_counter() - start:.1f} s")
