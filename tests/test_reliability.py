"""No silent divergence, and no code execution from a file: gradients that go non-finite stop the
run before another checkpoint is written; a pickle that runs code on load is refused, as a
checkpoint and as a teacher's weights, and never runs."""

from __future__ import annotations

import builtins
import pickle

import pytest
import torch

from mmtard import checkpoint as ckpt
from mmtard.cli import main
from mmtard.config import load_config, save_config
from mmtard.errors import MmtardError
from mmtard.trainer import DivergenceError, Trainer
from test_trainer import tiny_overrides


def test_non_finite_gradients_stop_the_run_and_keep_the_last_good_checkpoint(world_dir, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(load_config(None, tiny_overrides(world_dir, steps=5)), run, show_progress=False)
    weight = next(p for p in trainer.student.clip.visual.parameters() if p.requires_grad)
    # The loss stays finite; only the gradient of one student weight blows up, during step 3.
    weight.register_hook(lambda grad: grad * float("inf") if trainer.step == 2 else grad)

    with pytest.raises(DivergenceError) as caught:
        trainer.train()
    message = str(caught.value)
    assert "by step 3" in message and "non-finite gradients" in message
    assert "loss" not in message.split("non-finite", 1)[1].split(".", 1)[0]  # the loss terms were fine
    assert message.endswith(str(run / "checkpoints" / "step_00000002.pt"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.pt", "step_00000002.pt"]
    assert not (run / "student.safetensors").exists()
    kept = ckpt.load_checkpoint(run / "checkpoints" / "step_00000002.pt")
    assert kept["step"] == 2 and all(torch.isfinite(v).all() for v in kept["student"].values())


class _WritesMarker:
    """Unpickling this object opens (creates) a file: stands for any code a pickle can run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def _plant(path, marker, fmt):
    payload = {"step": 1, "student": _WritesMarker(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)


def _prove_the_payload_is_live(path, marker, fmt):
    """The planted file really runs code under a plain unpickler (else the test proves nothing)."""
    assert not marker.exists()
    if fmt == "torch":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_a_planted_checkpoint_that_runs_code_is_refused_and_never_run(world_dir, tmp_path, capsys, fmt):
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    overrides = tiny_overrides(world_dir, steps=3)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    run.mkdir()
    save_config(load_config(config, overrides), run / "config.yaml")  # so that DIR is resumed
    planted = run / "checkpoints" / "step_00000002.pt"
    _plant(planted, marker, fmt)

    assert main(["-q", "distill", "--config", str(config), "--out", str(run), *overrides]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    line = err.strip().splitlines()[-1]
    assert line.startswith("mmtard distill: error: refusing to load checkpoint") and "Traceback" not in err
    for part in (str(planted), "arbitrary unpickling", "can execute code", "weights_only=True",
                 "If you trust the file, convert it once", "torch.load(path, weights_only=False)"):
        assert part in line
    with pytest.raises(MmtardError, match="refusing to load checkpoint"):
        ckpt.load_checkpoint(planted)
    assert not marker.exists()
    _prove_the_payload_is_live(planted, marker, fmt)


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
def test_a_teacher_file_that_runs_code_is_refused_and_never_run(world_dir, tmp_path, capsys, fmt):
    marker, weights = tmp_path / "PWNED", tmp_path / "teacher.pt"
    _plant(weights, marker, fmt)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    overrides = tiny_overrides(world_dir, steps=1, **{"teachers.0.pretrained": str(weights)})

    assert main(["-q", "distill", "--config", str(config), "--out", str(tmp_path / "run"), *overrides]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    line = err.strip().splitlines()[-1]
    assert line.startswith("mmtard distill: error: teachers[0]: refusing to load") and "Traceback" not in err
    for part in (str(weights), "arbitrary unpickling", "can execute code", "If you trust the file, convert it",
                 "safetensors"):
        assert part in line
    _prove_the_payload_is_live(weights, marker, fmt)


def test_disk_full_during_export_is_a_clean_error(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from mmtard.errors import ModelError
    from mmtard.models import ModelSpec, create_clip, export_open_clip

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ModelError, match="cannot write .*student.safetensors.*No space left"):
        export_open_clip(create_clip(ModelSpec("mmtard-tiny-vit")), tmp_path / "student.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_run_saved_before_a_config_key_existed_still_resumes(tmp_path):
    """A config written by an earlier version lacks keys added since; they compare as their
    defaults, and the speed switches may change on resume. A real change is still refused, and a
    key this version does not know is named."""
    import yaml

    from mmtard.config import Config, to_dict
    from mmtard.runs import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    ckpt.save_checkpoint(run, 5, {"x": 1})

    def saved_as(edit):
        old = to_dict(Config())
        edit(old)
        (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))

    saved_as(lambda d: [d["data"].pop("classnames"), d["train"].pop("patch_embed"), d["train"].pop("attention"),
                        d["train"].pop("last_block"), d["train"].pop("teacher_attention")])
    assert prepare_run_dir(run, Config(), force=False).name == "step_00000005.pt"
    faster = Config()
    faster.train.compile, faster.train.attention, faster.train.last_block = True, "math", "class_token"
    faster.train.teacher_attention = "split"
    assert prepare_run_dir(run, faster, force=False) is not None
    other = Config()
    other.train.lr, other.attack.steps = 1e-3, 3
    with pytest.raises(MmtardError, match=r"different config .*attack.steps: 10 -> 3, train.lr: 2e-05 -> 0.001\)"):
        prepare_run_dir(run, other, force=False)
    many = Config()
    many.train.lr, many.train.weight_decay, many.train.seed = 1e-3, 0.5, 7
    many.attack.steps, many.attack.momentum, many.method.kappa, many.method.lambda_r = 3, 0.5, 2.0, 3.0
    with pytest.raises(MmtardError, match=r"train.lr: 2e-05 -> 0.001 and 2 more\)"):
        prepare_run_dir(run, many, force=False)
    saved_as(lambda d: d["train"].update(retired_key=1))
    with pytest.raises(MmtardError, match="retired_key"):
        prepare_run_dir(run, Config(), force=False)
    (run / "config.yaml").write_text("")
    with pytest.raises(MmtardError, match="empty or not a mapping"):
        prepare_run_dir(run, Config(), force=False)


def test_metrics_file_widens_for_new_terms_and_survives_a_damaged_row(tmp_path, caplog):
    import csv

    from mmtard.metrics import MetricsWriter

    def rows():
        with open(tmp_path / "metrics.csv", newline="") as handle:
            return list(csv.DictReader(handle))

    first = MetricsWriter(tmp_path, tensorboard=False)
    first.write(1, {"loss": 2.0})
    first.write(2, {"loss": 1.5})
    resumed = MetricsWriter(tmp_path, resume_step=2, tensorboard=False)  # e.g. a newer version logs more
    resumed.write(3, {"loss": 1.0, "lr": 0.1})
    assert rows() == [{"step": "1", "loss": "2.0", "lr": ""}, {"step": "2", "loss": "1.5", "lr": ""},
                      {"step": "3", "loss": "1.0", "lr": "0.1"}]
    with open(tmp_path / "metrics.csv", "a") as handle:  # a row the machine's crash cut short
        handle.write("\x00\x00\n4,0.5,0.1\n")
    with caplog.at_level("WARNING"):
        MetricsWriter(tmp_path, resume_step=4, tensorboard=False).write(5, {"loss": 0.4, "lr": 0.1})
    assert "line 5 is damaged" in caplog.text and (tmp_path / "metrics.csv.damaged").exists()
    assert [r["step"] for r in rows()] == ["1", "2", "3", "5"]
    for n, damage in enumerate((b"\xff\xfe6,0.3,0.1\n", b"6,0.\xff3,0.1\n"), start=1):  # a damaged sector
        with open(tmp_path / "metrics.csv", "ab") as handle:
            handle.write(damage)
        MetricsWriter(tmp_path, resume_step=9, tensorboard=False)
        assert [r["step"] for r in rows()] == ["1", "2", "3", "5"]
        assert (tmp_path / f"metrics.csv.damaged.{n}").read_bytes().endswith(damage), "kept as it was"
    for cut in ("6,0.3", "6,0.3,0.1,7", "3,0.3,0.1"):  # fields lost or extra, or a step cut to an earlier one
        with open(tmp_path / "metrics.csv", "a") as handle:
            handle.write(cut + "\n")
        MetricsWriter(tmp_path, resume_step=9, tensorboard=False)
        assert [r["step"] for r in rows()] == ["1", "2", "3", "5"], cut
    MetricsWriter(tmp_path, resume_step=0, tensorboard=False).write(1, {"acc": 9.0})  # nothing kept: a fresh header
    assert rows() == [{"step": "1", "acc": "9.0"}]


def test_finished_student_and_records_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    """``student.safetensors`` marks a finished run: after a power cut it must be the whole file or
    absent, so its data are fsynced before the rename and the rename is fsynced after (same for
    evaluation records)."""
    import os

    from mmtard import checkpoint
    from mmtard.models import ModelSpec, create_clip, export_open_clip
    from mmtard.results import write_json_atomic

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: calls.append(("fsync", os.path.basename(
        os.readlink(f"/proc/self/fd/{fd}")))) or real_fsync(fd))
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: calls.append(("replace", os.path.basename(b)))
                        or real_replace(a, b))
    export_open_clip(create_clip(ModelSpec("mmtard-tiny-vit")), tmp_path / "student.safetensors")
    assert calls == [("fsync", f".student.safetensors.{os.getpid()}.tmp"), ("replace", "student.safetensors"),
                     ("fsync", tmp_path.name)]
    calls.clear()
    write_json_atomic({"a": 1}, tmp_path / "record.json")
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"] and calls[1] == ("replace", "record.json")
