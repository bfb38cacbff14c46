"""The catalogue of refusals: every kind of bad input the CLI can be given, each refused with exit
code 2 and one line on stderr that names the culprit, with no traceback unless ``--debug``.

Most cases fail while the config or the run folder is checked, in milliseconds; the ones that need
models or a training step run a single tiny step on the test world.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mmtard.cli import main
from mmtard.config import load_config, save_config
from mmtard.errors import ConfigError, DataError
from mmtard.models import ModelSpec, create_clip, export_open_clip
from test_trainer import tiny_overrides


def _refused(capsys, argv: list[str], *parts: str) -> str:
    """Run the CLI in-process; check exit code 2, exactly one error line naming ``parts``, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("mmtard ")]
    assert len(lines) == 1 and ": error: " in lines[0], err
    for part in parts:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("student: {name: mmtard-tiny-vit}\n")
    return path


def _distill(config_file, out, world_dir, *extra: str, steps: int = 1) -> list[str]:
    return ["-q", "distill", "--config", str(config_file), "--out", str(out),
            *tiny_overrides(world_dir, steps=steps), *extra]


# ----------------------------------------------------------------------------- the config
CONFIG_CASES = {
    "typo in a key": (["train.stpes=3"], ["unknown key 'stpes'", "Did you mean 'steps'?"]),
    "typo in a section": (["trian.steps=3"], ["unknown key 'trian'", "Did you mean 'train'?"]),
    "integer expected": (["train.steps=ten"], ["train.steps", "expected an integer", "'ten'"]),
    "boolean expected": (["train.lora=maybe"], ["train.lora", "expected true or false", "'maybe'"]),
    "number expected": (["train.lr=fast"], ["train.lr", "expected a finite number", "'fast'"]),
    "not a number": (["train.lr=nan"], ["train.lr", "expected a finite number", "'nan'"]),
    "negative learning rate": (["train.lr=-1e-5"], ["train.lr: -1e-05 must be >= 0"]),
    "negative weight decay": (["train.weight_decay=-1"], ["train.weight_decay: -1.0 must be >= 0"]),
    "log every 0 steps": (["train.log_every=0"], ["train.log_every: 0 must be >= 1"]),
    "checkpoint every 0 steps": (["train.ckpt_every=0"], ["train.ckpt_every: 0 must be >= 1"]),
    "image size 0": (["data.image_size=0"], ["data.image_size: 0 must be >= 1"]),
    "negative loader workers": (["data.num_workers=-1"], ["data.num_workers: -1 must be >= 0"]),
    "LoRA rank 0": (["train.lora=true", "train.lora_rank=0"], ["train.lora_rank: 0 must be >= 1"]),
    "LoRA dropout above 1": (["train.lora=true", "train.lora_dropout=2"],
                             ["train.lora_dropout: 2.0 must be in [0, 1)"]),
    "unknown compile mode": (["train.compile=true", "train.compile_mode=foo"], ["train.compile_mode: 'foo'",
                                                                               "reduce-overhead"]),
    "template without a class slot": (['data.templates=["a photo"]'],
                                      ["data.templates[0]: 'a photo' must have exactly one class slot {}",
                                       "it has none"]),
    "template with a named slot": (['data.templates=["a photo of a {c}"]'], ["data.templates[0]", "it has {c}"]),
    "template with two slots": (['data.templates=["{} and {}"]'], ["data.templates[0]", "it has {}, {}"]),
    "list expected": (["data.templates=a photo"], ["data.templates", "expected a list"]),
    "unknown method": (["method.name=mmtrad"], ["unknown method 'mmtrad'", "mmt_ard"]),
    "eps in 0-255 units": (["attack.eps=8"], ["attack.eps", "outside [0, 1]", "Did you mean 8/255?"]),
    "eps not a number": (["attack.eps=two"], ["attack.eps", "cannot read 'two'", "2/255"]),
    "eps divided by zero": (["attack.eps=2/0"], ["attack.eps", "cannot read '2/0'"]),
    "step size out of range": (["attack.step_size=1.5"], ["attack.step_size", "outside [0, 1]"]),
    "unknown precision": (["train.precision=fp16"], ["train.precision", "'fp16'", "bf16"]),
    "unknown recipe": (["method.recipe=fancy"], ["method.recipe", "'fancy'"]),
    "unknown teacher role": (["teachers.0.role=evil"], ["teachers[0].role", "'evil'"]),
    "negative teacher weight": (["teachers.0.weight=-1"], ["teachers[0].weight", "-1"]),
    "method without its teachers": (["teachers=[]"], ["mmt_ard", "teacher with role"]),
    "override without =": (["train.steps"], ["override 'train.steps'", "key=value"]),
    "override of a missing list item": (["teachers.5.role=clean"], ["teachers.5.role", "list of 2"]),
    "warm-up out of range": (["train.warmup_frac=1.5"], ["train.warmup_frac", "1.5"]),
    "micro-batch not dividing the batch": (["train.micro_batch=3"],
                                           ["train.micro_batch 3", "per-rank batch 8"]),
    "unknown data source": (["data.source=lmdb"], ["data.source", "'lmdb'"]),
    "empty data root": (["data.root="], ["data.root is empty"]),
    "missing world": (["data.root=/nonexistent/world"], ["No world at /nonexistent/world", "mmtard world"]),
    "missing image folder": (["data.source=imagefolder", "data.root=/nonexistent/images"],
                             ["Dataset folder /nonexistent/images does not exist", "Expected layout"]),
    "unknown architecture": (["student.name=ViT-B-33"], ["unknown open_clip model 'ViT-B-33'", "ViT-B-32"]),
    "unknown pretrained tag": (["student.pretrained=laion9b"], ["'laion9b'", "neither a file nor a pretrained tag"]),
    "missing teacher file": (["teachers.0.pretrained=/nonexistent/clean.safetensors"],
                             ["weight file not found: /nonexistent/clean.safetensors"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_refusals(case, config_file, world_dir, tmp_path, capsys):
    extra, parts = CONFIG_CASES[case]
    _refused(capsys, _distill(config_file, tmp_path / "run", world_dir, *extra), *parts)


def test_config_file_refusals(tmp_path, capsys):
    missing = tmp_path / "missing.yaml"
    _refused(capsys, ["distill", "--config", str(missing), "--out", str(tmp_path / "r")],
             f"config file not found: {missing}")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: [1, 2\n")
    _refused(capsys, ["distill", "--config", str(broken), "--out", str(tmp_path / "r")],
             str(broken), "not valid YAML", "line 3")
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n")
    _refused(capsys, ["distill", "--config", str(listed), "--out", str(tmp_path / "r")],
             str(listed), "top level must be a mapping")
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian: {steps: 3}\n")
    _refused(capsys, ["distill", "--config", str(typo), "--out", str(tmp_path / "r")],
             str(typo), "unknown key 'trian'", "Did you mean 'train'?")
    teacher_method = tmp_path / "teacher.yaml"
    teacher_method.write_text("method: {name: ard}\nteachers: [{name: mmtard-tiny-vit}]\n")
    _refused(capsys, ["train-teacher", "--config", str(teacher_method), "--out", str(tmp_path / "r")],
             "train-teacher trains with", "'ard'", "mmtard distill")
    merged = tmp_path / "merged.yaml"  # a merge key is no duplicate, and a key after it overrides it
    merged.write_text("student: {name: mmtard-tiny-vit}\nmethod: {name: tecoa}\nteachers: []\n"
                      "train:\n  <<: {steps: 3, lr: 0.5}\n  steps: 4\n")
    assert (load_config(merged).train.steps, load_config(merged).train.lr) == (4, 0.5)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train: {steps: 1, lr: 0.5}\ntrain: {steps: 2}\n")  # the first lr would vanish
    _refused(capsys, ["distill", "--config", str(twice), "--out", str(tmp_path / "r")],
             str(twice), "line 2", "the key 'train' is given twice")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train: {steps: 3}  # r\xe9glage\n".encode("latin-1"))
    _refused(capsys, ["distill", "--config", str(latin), "--out", str(tmp_path / "r")], str(latin), "not UTF-8")
    _refused(capsys, ["distill", "--config", str(typo), "--out", str(tmp_path / "r"), 'data.templates=["a {}", "b'],
             "override 'data.templates': cannot read")
    fine = tmp_path / "fine.yaml"
    fine.write_text("train: {steps: 3}\n")
    _refused(capsys, ["distill", "--config", str(fine), "--out", str(tmp_path / "r"), "train.lrr=1e-5"],
             "command line.train: unknown key 'lrr'", "Did you mean 'lr'?")  # not blamed on the file
    _refused(capsys, ["train-teacher", "--config", str(fine), "--out", str(tmp_path / "r"), "method.name=clean_ft",
                      "train.device=tpu"], "train.device: 'tpu' is not a device")
    _refused(capsys, ["train-teacher", "--config", str(fine), "--out", str(tmp_path / "r"), "method.name=clean_ft",
                      "train.device=meta"], "train.device: 'meta' is a meta device", "cpu or cuda")


def test_data_file_and_pattern_refusals(config_file, world_dir, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_bytes("z\xe8bre\n".encode("latin-1"))
    _refused(capsys, _distill(config_file, tmp_path / "run", world_dir, "data.source=shards",
                              f"data.root={tmp_path}/s-{{000..001}}.tar", f"data.classnames={names}"),
             "data.classnames", str(names), "not UTF-8")
    _refused(capsys, _distill(config_file, tmp_path / "run2", world_dir, "data.source=shards",
                              f"data.root={tmp_path}/s-{{000..001.tar"),
             "Cannot expand the shard pattern")


def test_global_options_may_follow_the_command(config_file, world_dir, tmp_path, capsys):
    """`mmtard distill --debug ...` as well as `mmtard --debug distill ...`; a data root that is a
    file is named as one."""
    args = _distill(config_file, tmp_path / "run", world_dir, "data.source=imagefolder", f"data.root={config_file}")
    args.remove("-q")
    _refused(capsys, args[:1] + ["-q"] + args[1:], f"Dataset folder {config_file} is a file, not a folder")
    with pytest.raises(DataError):
        main(args[:1] + ["--debug"] + args[1:])


def test_debug_lets_the_traceback_through(config_file, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'stpes'"):
        main(["--debug", "distill", "--config", str(config_file), "--out", str(tmp_path / "r"), "train.stpes=3"])


@pytest.mark.slow
def test_a_fresh_process_prints_exactly_one_line_or_the_traceback_with_debug(tmp_path):
    command = [sys.executable, "-m", "mmtard", "distill", "--config", str(tmp_path / "missing.yaml"),
               "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    plain = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    debug = subprocess.Popen(command[:3] + ["--debug"] + command[3:], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    _, err = plain.communicate(timeout=120)
    assert plain.returncode == 2
    assert err == f"mmtard distill: error: config file not found: {tmp_path / 'missing.yaml'}\n"
    _, err = debug.communicate(timeout=120)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in err and "ConfigError: config file not found" in err


# ----------------------------------------------------------------------------- the data
def _image_folder(world_dir, root, per_class: int = 4, classes: int = 2):
    """A small ImageFolder made of world images: ``classes`` x ``per_class`` PNG files."""
    source = world_dir / "classification" / "train"
    for name in sorted(os.listdir(source))[:classes]:
        (root / name).mkdir(parents=True)
        for image in sorted(os.listdir(source / name))[:per_class]:
            shutil.copy(source / name / image, root / name / image)
    return root


def test_a_global_batch_larger_than_the_dataset(config_file, world_dir, tmp_path, capsys):
    _refused(capsys, _distill(config_file, tmp_path / "run", world_dir, "train.global_batch=100000"),
             "train.global_batch: 100000 is more than the dataset's")


def test_empty_class_folder(config_file, world_dir, tmp_path, capsys):
    root = _image_folder(world_dir, tmp_path / "images")
    (root / "zebra").mkdir()
    _refused(capsys, _distill(config_file, tmp_path / "run", world_dir, "data.source=imagefolder",
                              f"data.root={root}"),
             f"Class folder {root / 'zebra'} has no image files")


@pytest.mark.parametrize("damage,workers", [("truncated", 0), ("truncated", 1), ("not an image", 0)])
def test_unreadable_image_with_strict_data(damage, workers, config_file, world_dir, tmp_path, capsys):
    root = _image_folder(world_dir, tmp_path / "images")  # 8 images: one step of 8 reads them all
    bad = sorted((root / sorted(os.listdir(root))[1]).iterdir())[2]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"this is not a PNG file")
    extra = ["data.source=imagefolder", f"data.root={root}", "data.strict=true", f"data.num_workers={workers}"]
    _refused(capsys, _distill(config_file, tmp_path / "run", world_dir, *extra),
             f"Cannot read image {bad}", "data.strict=false skips unreadable files")


def test_class_list_that_does_not_match_the_world(config_file, world_dir, tmp_path, capsys):
    world = tmp_path / "world"
    (world / "classification").mkdir(parents=True)
    os.symlink(world_dir / "classification" / "train", world / "classification" / "train")
    meta = json.loads((world_dir / "world.json").read_text())
    names = meta["classification"]["classnames"]
    names[0], names[1] = names[1], names[0]
    (world / "world.json").write_text(json.dumps(meta))
    _refused(capsys, _distill(config_file, tmp_path / "run", world_dir, f"data.root={world}"),
             f"Class names of {world / 'classification' / 'train'} differ at index 0",
             f"expected {names[0]!r}", f"got {names[1]!r}")


# ----------------------------------------------------------------------------- models
def test_teacher_weights_of_another_architecture(config_file, world_dir, tmp_path, capsys):
    import open_clip
    from safetensors.torch import save_file

    from mmtard.models import register_tiny_models

    register_tiny_models()
    weights = tmp_path / "tiny.safetensors"
    save_file(open_clip.create_model("mmtard-tiny-vit").state_dict(), str(weights))
    line = _refused(capsys, _distill(config_file, tmp_path / "run", world_dir, f"teachers.0.pretrained={weights}"),
                    str(weights), "does not match architecture 'mmtard-small-vit'", "in the file but")
    assert line.count("shape") == 1 and line.count("(") >= 2  # both shapes are shown


# ----------------------------------------------------------------------------- the run folder
def test_output_folder_under_a_file(config_file, world_dir, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    _refused(capsys, _distill(config_file, blocker / "run", world_dir),
             f"cannot write to output folder {blocker / 'run'}", "Not a directory")
    _refused(capsys, _distill(config_file, blocker, world_dir), f"output path {blocker} exists and is not a folder")
    _refused(capsys, ["world", "--out", str(blocker / "world"), "--size", "test"], str(blocker), "Not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a read-only mode")
def test_read_only_output_folder(config_file, world_dir, tmp_path, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        _refused(capsys, _distill(config_file, parent / "run", world_dir),
                 f"cannot write to output folder {parent / 'run'}", "Permission denied")
    finally:
        parent.chmod(0o700)


def test_run_folder_refusals(config_file, world_dir, tmp_path, capsys):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    _refused(capsys, _distill(config_file, stranger, world_dir), str(stranger), "not an mmtard run folder")

    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "student.safetensors").write_bytes(b"")
    _refused(capsys, _distill(config_file, finished, world_dir), str(finished), "finished run", "--force")
    for bad in ("train.lr=-1e-5", "train.ckpt_every=0", "data.num_workers=-1"):  # found before --force clears
        forced = _distill(config_file, finished, world_dir, bad)
        forced.insert(forced.index("distill") + 1, "--force")
        _refused(capsys, forced, bad.split("=")[0])
        assert (finished / "student.safetensors").exists()

    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    (other / "checkpoints" / "step_00000001.pt").write_bytes(b"")
    save_config(load_config(config_file, tiny_overrides(world_dir, **{"train.lr": 0.5})), other / "config.yaml")
    _refused(capsys, _distill(config_file, other, world_dir), str(other), "different config")
    (other / "config.yaml").unlink()
    _refused(capsys, _distill(config_file, other, world_dir), str(other), "checkpoints but no config.yaml")


def test_a_rank_started_without_torchrun_variables(config_file, world_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    _refused(capsys, _distill(config_file, tmp_path / "run", world_dir), "RANK is not set", "torchrun")
    monkeypatch.setenv("WORLD_SIZE", "two")
    _refused(capsys, _distill(config_file, tmp_path / "run", world_dir), "WORLD_SIZE='two'", "integer")


def test_damaged_checkpoint(config_file, world_dir, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_config(load_config(config_file, tiny_overrides(world_dir, steps=2)), run / "config.yaml")
    torch.save({"step": 1, "student": {"w": torch.zeros(1000)}}, run / "checkpoints" / "step_00000001.pt")
    data = (run / "checkpoints" / "step_00000001.pt").read_bytes()
    (run / "checkpoints" / "step_00000001.pt").write_bytes(data[: len(data) // 2])
    _refused(capsys, _distill(config_file, run, world_dir, steps=2),
             f"cannot read checkpoint {run / 'checkpoints' / 'step_00000001.pt'}", "Delete it")


def test_disk_full_while_writing_a_checkpoint(config_file, world_dir, tmp_path, capsys, monkeypatch):
    from mmtard.checkpoint import load_checkpoint

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2:
            f.write(b"\0" * 4096)  # part of the file made it to disk before the device filled up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    target = run / "checkpoints" / "step_00000002.pt"
    _refused(capsys, _distill(config_file, run, world_dir, steps=3),
             f"cannot write {target}", "No space left on device", "run the same command again")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.pt"]  # no temp file left
    assert load_checkpoint(run / "checkpoints" / "step_00000001.pt")["step"] == 1

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command resumes and finishes
    assert main(_distill(config_file, run, world_dir, steps=3)) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002.pt", "step_00000003.pt"]


# ----------------------------------------------------------------------------- eval and report
def test_eval_and_report_refusals(world_dir, tmp_path, capsys):
    out = str(tmp_path / "eval")
    base = ["eval", "--out", out]
    _refused(capsys, base + ["--model", "mmtard-tiny-vit", "--dataset", "imagenet"], "--dataset 'imagenet'",
             "NAME=ROOT")
    _refused(capsys, base + ["--model", "mmtard-tiny-vit", "--dataset", f"mnist={world_dir}"], "--dataset 'mnist'")
    _refused(capsys, base + ["--dataset", f"world={world_dir}"], "at least one --model or --run")
    _refused(capsys, base + ["--model", "mmtard-tiny-vit", "--dataset", f"world={world_dir}", "--attack", "fgsm"],
             "--attack 'fgsm'")
    _refused(capsys, base + ["--model", "a", "--model", "b", "--pretrained", "x.pt", "--dataset", f"world={world_dir}"],
             "one --pretrained")
    _refused(capsys, base + ["--run", str(tmp_path), "--dataset", f"world={world_dir}"], f"--run {tmp_path}",
             "finished run folder")
    _refused(capsys, base + ["--model", "mmtard-tiny-vit", "--dataset", "world=/nonexistent/world"],
             "No world at /nonexistent/world")
    # the second row's weights are checked before the first row's attack starts
    good = export_open_clip(create_clip(ModelSpec("mmtard-tiny-vit")), tmp_path / "good.safetensors")
    (tmp_path / "page.pt").write_text("<!doctype html>")
    rows = ["--model", "mmtard-tiny-vit", "--pretrained", str(good), "--name", "a",
            "--model", "mmtard-tiny-vit", "--pretrained", str(tmp_path / "page.pt"), "--name", "b"]
    _refused(capsys, base + rows + ["--dataset", f"world={world_dir}"], "page.pt", "neither a safetensors nor a torch")
    assert not (tmp_path / "eval" / "samples").exists(), "nothing was evaluated"
    damaged = tmp_path / "damaged-run"
    damaged.mkdir()
    (damaged / "student.safetensors").write_bytes(b"")
    for text, part in (("student: [unclosed", "not valid YAML"), ("train: {steps: 3}", "no student.name")):
        (damaged / "config.yaml").write_text(text)
        _refused(capsys, base + ["--run", str(damaged), "--dataset", f"world={world_dir}"],
                 str(damaged / "config.yaml"), part)
    _refused(capsys, ["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "rep")],
             f"report input {tmp_path / 'nothing'} does not exist")
    (tmp_path / "notes.yaml").write_text("a: 1\n")
    _refused(capsys, ["report", str(tmp_path / "notes.yaml"), "--out", str(tmp_path / "rep")],
             f"report input {tmp_path / 'notes.yaml'} is not a results.json file or a folder")
    assert not (tmp_path / "rep").exists(), "a refused report leaves no --out folder behind"


def test_runs_of_the_same_folder_name_are_told_apart_by_name(tmp_path):
    from argparse import Namespace

    from mmtard.cli import _eval_models

    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    for run in runs:
        run.mkdir(parents=True)
        (run / "config.yaml").write_text("student: {name: mmtard-tiny-vit}\n")
        (run / "student.safetensors").write_bytes(b"")
    args = Namespace(model=["mmtard-tiny-vit"], pretrained=[], run=[str(r) for r in runs], name=[])
    with pytest.raises(ConfigError, match="both be row 'run'; name them with --name"):
        _eval_models(args)
    args.name = ["random", "first", "second"]
    assert [m.row for m in _eval_models(args)] == ["random", "first", "second"]
    args.name = ["random", "first"]
    with pytest.raises(ConfigError, match=r"one per --model and then per --run \(3 in all\); got 2"):
        _eval_models(args)


def test_disk_full_while_writing_results_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    """results.json, config.yaml, run.json and report.md go through the same atomic write as the
    checkpoints: a failed write names the file, leaves no temporary file and keeps the old one."""
    from mmtard import checkpoint
    from mmtard.errors import MmtardError
    from mmtard.results import write_json_atomic

    target = tmp_path / "eval" / "results.json"
    write_json_atomic({"round": 1}, target)
    real_replace = checkpoint.durable_replace

    def full_disk(tmp, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "durable_replace", full_disk)
    with pytest.raises(MmtardError, match=f"cannot write {target}: No space left on device"):
        write_json_atomic({"round": 2}, target)
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]
    assert json.loads(target.read_text()) == {"round": 1}
    monkeypatch.setattr(checkpoint, "durable_replace", real_replace)
    write_json_atomic({"round": 2}, target)
    assert json.loads(target.read_text()) == {"round": 2}


def test_two_architectures_with_one_tag_get_rows_of_their_own():
    """``--model ViT-B-32 --pretrained openai --model ViT-L-14 --pretrained openai`` are two rows
    (the architecture joins the tag), not a refusal; a name given with --name stays as given."""
    from argparse import Namespace

    from mmtard.cli import _eval_models

    args = Namespace(model=["ViT-B-32", "ViT-L-14"], pretrained=["openai", "openai"], run=[], name=[])
    assert [m.row for m in _eval_models(args)] == ["ViT-B-32-openai", "ViT-L-14-openai"]
    args = Namespace(model=["ViT-B-32", "ViT-L-14"], pretrained=["openai", "laion2b_s32b_b82k"], run=[], name=[])
    assert [m.row for m in _eval_models(args)] == ["openai", "laion2b_s32b_b82k"]


def test_empty_model_settings_and_bad_counts_are_refused_by_key(world_dir):
    """An unset shell variable (``student.pretrained=$S``) must not train from random weights."""
    from mmtard.config import load_config

    base = [f"data.root={world_dir}"]
    with pytest.raises(ConfigError, match=r"student.pretrained: empty \(an unset variable\?\)"):
        load_config(None, base + ["student.pretrained="])
    with pytest.raises(ConfigError, match=r"teachers\[1\].pretrained: empty"):
        load_config(None, base + ["teachers=[{name: mmtard-small-vit, role: clean}, "
                                  "{name: mmtard-small-vit, role: robust, pretrained: ''}]"])
    with pytest.raises(ConfigError, match=r"student.name: missing or empty"):
        load_config(None, base + ["student.name="])
    with pytest.raises(ConfigError, match=r"teachers\[0\].name: missing or empty"):  # no default architecture
        load_config(None, base + ["teachers=[{role: clean}, {name: mmtard-small-vit, role: robust}]"])
    with pytest.raises(ConfigError, match=r"train.global_batch: 0 must be >= 1"):
        load_config(None, base + ["train.global_batch=0"])
    for key in ("kappa", "lambda_r", "mtard_eta_w"):  # a negative weight or rate turns a term around
        with pytest.raises(ConfigError, match=rf"method.{key}: -1.0 must be >= 0.0"):
            load_config(None, base + [f"method.{key}=-1"])


def test_settings_a_run_will_not_use_are_named(world_dir, caplog):
    from mmtard.config import load_config

    teachers = "teachers=[{name: mmtard-small-vit, role: clean}, {name: mmtard-small-vit, role: robust}]"
    with caplog.at_level("WARNING"):
        load_config(None, [f"data.root={world_dir}", "method.name=clean_ft", "train.compile_attack=true",
                           "train.compile_mode=reduce-overhead", "method.reference={name: mmtard-tiny-vit}", teachers])
    for key in ("teachers: method 'clean_ft' uses no teacher", "method.reference: method 'clean_ft'",
                "train.compile_attack: method 'clean_ft' runs no attack"):
        assert key in caplog.text, key
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_config(None, [f"data.root={world_dir}", "train.compile_mode=reduce-overhead", teachers])
    assert "train.compile_mode: applies with train.compile or train.compile_attack, both off" in caplog.text


def test_a_run_refused_while_it_is_built_leaves_no_new_folder(world_dir, tmp_path):
    """The folder a refused command made (config and lock only) goes; one holding anything else stays;
    the refusal names the config entry whose weights are missing."""
    from mmtard.config import load_config
    from mmtard.errors import MmtardError
    from mmtard.trainer import Trainer

    overrides = [f"data.root={world_dir}", "teachers=[{name: mmtard-small-vit, role: clean}, "
                 "{name: mmtard-small-vit, role: robust, pretrained: /nonexistent/teacher.safetensors}]"]
    with pytest.raises(MmtardError, match=r"teachers\[1\]: weight file not found: /nonexistent/teacher.safetensors"):
        Trainer(load_config(None, overrides), tmp_path / "new", show_progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "config.yaml").write_text("")  # an earlier run's: not this command's to remove
    with pytest.raises(MmtardError):
        Trainer(load_config(None, overrides), tmp_path / "kept", show_progress=False)
    assert (tmp_path / "kept").is_dir()
