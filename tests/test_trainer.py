"""The training loop and every method, on tiny models and the offline world."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmtard.cli import main
from mmtard.config import load_config
from mmtard.trainer import Trainer

TEACHERS = ("teachers=[{name: mmtard-small-vit, role: clean}, {name: mmtard-small-vit, role: robust}]")


def tiny_overrides(world_dir, method="mmt_ard", steps=2, **extra):
    items = {
        "data.root": str(world_dir), "method.name": method, "train.steps": steps, "train.global_batch": 8,
        "train.micro_batch": 4, "train.log_every": 1, "train.ckpt_every": 1, "attack.steps": 2,
        "train.lr": 1e-3, "train.warmup_frac": 0.0,
    }
    items.update(extra)
    return [TEACHERS] + [f"{k}={v}" for k, v in items.items()]


@pytest.mark.parametrize("method", ["mmt_ard", "ard", "mtard", "tecoa", "fare", "pmg_aft", "clean_ft"])
def test_every_method_runs_two_steps_through_the_cli(world_dir, tmp_path, method):
    command = "train-teacher" if method in ("tecoa", "fare", "pmg_aft", "clean_ft") else "distill"
    config = tmp_path / "c.yaml"
    config.write_text("student: {name: mmtard-tiny-vit}\n")
    out = tmp_path / "run"
    assert main(["-q", command, "--config", str(config), "--out", str(out), *tiny_overrides(world_dir, method)]) == 0
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    assert (out / "config.yaml").exists() and (out / "student.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001.pt", "step_00000002.pt"]


def test_paper_recipe_logs_every_term(world_dir, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(world_dir)), tmp_path / "run", show_progress=False)
    trainer.train()
    header = next(csv.reader(open(tmp_path / "run" / "metrics.csv")))
    for column in ("loss", "loss_robust", "loss_clean", "conf_robust", "conf_clean", "balance", "lr",
                   "images_per_s", "train_acc_clean", "train_acc_adv"):
        assert column in header


def test_finished_run_is_not_overwritten_without_force(world_dir, tmp_path):
    args = ["-q", "distill", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"),
            *tiny_overrides(world_dir, steps=1)]
    (tmp_path / "c.yaml").write_text("{}\n")
    assert main(args) == 0
    assert main(args) == 2
    assert main(args[:-1] + ["--force", args[-1]]) == 0


def test_teachers_get_no_gradient_and_stay_in_eval(world_dir, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(world_dir, steps=1)), tmp_path / "run", show_progress=False)
    trainer.method.train()
    assert trainer.student.training
    for teacher in trainer.method.teachers:
        assert not teacher.training
        assert not any(p.requires_grad for p in teacher.parameters())
    before = [p.clone() for t in trainer.method.teachers for p in t.parameters()]
    trainer.train()
    after = [p for t in trainer.method.teachers for p in t.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for t in trainer.method.teachers for p in t.parameters())
    # only the image tower of the student changed
    exported = load_file(str(tmp_path / "run" / "student.safetensors"))
    initial = trainer.method.teachers[0]  # unrelated model; compare student text tower to a fresh build instead
    del initial
    fresh = Trainer(load_config(None, tiny_overrides(world_dir, steps=1)), tmp_path / "fresh", show_progress=False)
    fresh_state = fresh.student.clip.state_dict()
    changed = {k for k, v in exported.items() if not torch.equal(v, fresh_state[k])}
    assert changed and all(k.startswith("visual.") for k in changed)


def test_lora_student_trains_adapters_only(world_dir, tmp_path):
    trainer = Trainer(load_config(None, tiny_overrides(world_dir, steps=2, **{"train.lora": "true"})),
                      tmp_path / "run", show_progress=False)
    base = {k: v.clone() for k, v in trainer.student.clip.visual.state_dict().items() if "lora_" not in k}
    trainer.train()
    now = trainer.student.clip.visual.state_dict()
    # peft's LoRA for nn.MultiheadAttention merges the adapters into the base weights for each
    # forward and subtracts them again, so the frozen base moves by float rounding only (~1e-8),
    # never by an optimiser step (which would be ~lr = 1e-3 here).
    assert max((now[k] - v).abs().max().item() for k, v in base.items()) < 1e-6
    lora_b = [v for k, v in now.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    exported = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert not any("lora" in k for k in exported)


class _Stop(Exception):
    pass


def _interrupt_after(overrides, run_dir, step: int, monkeypatch) -> None:
    """Train in ``run_dir`` until the checkpoint of ``step`` is written, then stop as a killed run would."""
    original = Trainer._save_checkpoint

    def save_then_stop(self):
        original(self)
        if self.step == step:
            raise _Stop

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "_save_checkpoint", save_then_stop)
        with pytest.raises(_Stop):
            Trainer(load_config(None, overrides), run_dir, show_progress=False).train()


def _assert_same_run(a, b) -> None:
    """Two finished runs ended with the same student and logged the same losses, bit for bit."""
    student_a, student_b = load_file(str(a / "student.safetensors")), load_file(str(b / "student.safetensors"))
    assert all(torch.equal(student_a[k], student_b[k]) for k in student_a)
    rows_a, rows_b = list(csv.DictReader(open(a / "metrics.csv"))), list(csv.DictReader(open(b / "metrics.csv")))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


@pytest.mark.parametrize("method", ["mmt_ard", "mtard"])  # mtard: its balancer state is checkpointed too
def test_resume_continues_the_same_trajectory(world_dir, tmp_path, monkeypatch, method):
    overrides = tiny_overrides(world_dir, method, steps=4)
    straight = Trainer(load_config(None, overrides), tmp_path / "a", show_progress=False)
    straight.train()

    _interrupt_after(overrides, tmp_path / "b", 2, monkeypatch)
    resumed = Trainer(load_config(None, overrides), tmp_path / "b", show_progress=False)
    assert resumed.resume_from is not None
    resumed.train()
    _assert_same_run(tmp_path / "a", tmp_path / "b")


def test_augmented_resume_with_workers_continues_the_same_trajectory(world_dir, tmp_path, monkeypatch):
    """With augmentation each sample's crop is drawn from (seed, epoch, index): an uninterrupted
    run without workers and a run with 2 workers killed after step 2 and resumed end identical."""
    base = tiny_overrides(world_dir, steps=4, **{"data.augment": "true"})
    straight = Trainer(load_config(None, base), tmp_path / "a", show_progress=False)
    straight.train()

    workers = tiny_overrides(world_dir, steps=4, **{"data.augment": "true", "data.num_workers": 2})
    _interrupt_after(workers, tmp_path / "b", 2, monkeypatch)
    Trainer(load_config(None, workers), tmp_path / "b", show_progress=False).train()
    _assert_same_run(tmp_path / "a", tmp_path / "b")


def test_augmentation_is_seeded_per_sample_and_leaves_the_global_stream(world_dir):
    from mmtard.data.base import SeededSamples
    from mmtard.world import load_world

    world = load_world(world_dir).classification("train", augment=True)
    epoch1, epoch2 = SeededSamples(world, 0, 1), SeededSamples(world, 0, 2)
    torch.manual_seed(3)
    state = torch.get_rng_state()
    first = epoch1[5][0]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(epoch1[5][0], first)
    assert not torch.equal(epoch2[5][0], first)  # another epoch, another crop


def test_clean_teacher_cache_gives_the_same_loss(world_dir, tmp_path):
    def loss_of(cache: bool, folder):
        overrides = tiny_overrides(world_dir, steps=1, **{"train.clean_teacher_cache": str(cache).lower()})
        trainer = Trainer(load_config(None, overrides), folder, show_progress=False)
        images, labels, indices = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=6)))
        results = []
        for _ in range(2):  # with the cache, the second pass reads the teacher embeddings from disk
            torch.manual_seed(1)
            results.append(trainer.method(images, labels, indices)["loss"].detach())
        return results, trainer.method.clean_cache

    with_cache, cache = loss_of(True, tmp_path / "a")
    without_cache, no_cache = loss_of(False, tmp_path / "b")
    assert no_cache is None and cache.hits == 6 and cache.misses == 6
    for a, b in zip(with_cache, without_cache):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nan_loss_stops_with_step_and_term(world_dir, tmp_path, monkeypatch):
    from mmtard import losses
    from mmtard.trainer import DivergenceError

    calls = {"n": 0}
    real = losses.mmt_ard_paper_loss

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 4:  # steps 1-2 are fine (2 micro-batches each), step 3 diverges
            terms["loss_robust"] = terms["loss_robust"] * float("nan")
            loss = loss * float("nan")
        return loss, terms

    monkeypatch.setattr(losses, "mmt_ard_paper_loss", poisoned)
    trainer = Trainer(load_config(None, tiny_overrides(world_dir, steps=5)), tmp_path / "run", show_progress=False)
    with pytest.raises(DivergenceError, match=r"step 3.*loss_robust"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == "step_00000002.pt"


def test_global_batch_not_divisible_by_world_size():
    from mmtard.errors import ConfigError
    from mmtard.trainer import BatchPlan

    with pytest.raises(ConfigError, match="nearest valid values: 8 or 12"):
        BatchPlan.from_config(10, None, 4)
    plan = BatchPlan.from_config(512, 64, 8)
    assert (plan.micro_batch, plan.accumulation) == (64, 1)
    assert BatchPlan.from_config(512, 16, 8).accumulation == 4


@pytest.mark.slow
def test_mmt_ard_loss_falls_over_50_steps(world_dir, tmp_path):
    overrides = tiny_overrides(world_dir, steps=50, **{"train.log_every": 10, "train.ckpt_every": 50,
                                                      "train.micro_batch": 8})
    Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False).train()
    losses_logged = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv"))]
    assert losses_logged[-1] < 0.7 * losses_logged[0]


def test_three_and_one_teachers(world_dir, tmp_path):
    """N teachers: two clean teachers with their own weights and one robust; ARD with a single one."""
    three = ("teachers=[{name: mmtard-small-vit, role: clean, weight: 2.0}, "
             "{name: mmtard-tiny-vit, role: clean, weight: 1.0}, {name: mmtard-small-vit, role: robust}]")
    trainer = Trainer(load_config(None, tiny_overrides(world_dir, steps=1) + [three]), tmp_path / "a",
                      show_progress=False)
    assert [t.role for t in trainer.method.teacher_list] == ["clean", "clean", "robust"]
    trainer.train()
    one = "teachers=[{name: mmtard-small-vit, role: robust}]"
    Trainer(load_config(None, tiny_overrides(world_dir, "ard", steps=1) + [one]), tmp_path / "b",
            show_progress=False).train()
    assert (tmp_path / "a" / "student.safetensors").exists() and (tmp_path / "b" / "student.safetensors").exists()


@pytest.mark.slow
def test_one_step_of_the_paper_architectures_on_cpu(world_dir, tmp_path, monkeypatch):
    """ViT-B-32 student (full and LoRA) with two ViT-L-14 teachers at 224 px, random weights, batch 2:
    nothing in the loop may only work for tiny models."""
    import mmtard.trainer

    paper_teachers = ("teachers=[{name: ViT-L-14, role: clean}, {name: ViT-L-14, role: robust}]")
    built = {}
    real_build = mmtard.trainer.build_teachers

    def build_once(*args):  # the two ViT-L-14 teachers are the slow part: build them for both runs once
        if "teachers" not in built:
            built["teachers"] = real_build(*args)
        return built["teachers"]

    monkeypatch.setattr(mmtard.trainer, "build_teachers", build_once)
    for lora in ("false", "true"):
        overrides = tiny_overrides(world_dir, steps=1, **{
            "student.name": "ViT-B-32", "train.global_batch": 2, "train.micro_batch": 2, "attack.steps": 1,
            "data.image_size": 224, "train.lora": lora, "train.clean_teacher_cache": "false"}) + [paper_teachers]
        trainer = Trainer(load_config(None, overrides), tmp_path / f"lora-{lora}", show_progress=False)
        assert trainer.student.image_size == (224, 224)
        assert all(t.model.image_size == (224, 224) for t in trainer.method.teacher_list)
        trainer.train()
        rows = list(csv.DictReader(open(tmp_path / f"lora-{lora}" / "metrics.csv")))
        assert len(rows) == 1 and torch.isfinite(torch.tensor(float(rows[0]["loss"])))
        del trainer


def test_confidence_auto_follows_the_recipe():
    from mmtard.config import MethodConfig
    from mmtard.methods.mmt_ard import MMTARD

    def kind(**cfg):
        method = MMTARD.__new__(MMTARD)
        method.__dict__["cfg"] = MethodConfig(**cfg)
        return method.confidence_kind

    assert kind(recipe="release") == "cosine" and kind(recipe="paper") == "probability"
    assert kind(recipe="release", confidence="probability") == "probability"


def test_mtard_balancer_moves_once_per_optimiser_step(world_dir, tmp_path):
    overrides = tiny_overrides(world_dir, "mtard", steps=3)  # global 8 = micro 4 x accumulation 2
    trainer = Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False)
    trainer.train()
    assert trainer.method.balancer.steps == 3


def test_clean_stream_off_attacks_with_the_robust_teacher_only(world_dir, tmp_path, monkeypatch):
    from mmtard.methods import distill

    trainer = Trainer(load_config(None, tiny_overrides(world_dir, steps=1, **{"method.use_clean": "false"})),
                      tmp_path / "run", show_progress=False)
    roles = []
    real = distill.clean_teacher_outputs

    def spy(method, role, *args):
        roles.append(role)
        return real(method, role, *args)

    monkeypatch.setattr("mmtard.methods.mmt_ard.clean_teacher_outputs", spy)
    images, labels, indices = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=4)))
    out = trainer.method(images, labels, indices)
    assert roles == ["robust"] and "loss_clean" not in out and out["logits_clean"] is None


def test_logged_learning_rate_is_the_one_each_step_used(world_dir, tmp_path):
    """Warm-up 2 of 4 steps, base lr 1e-3: the steps use 5e-4, 1e-3, 1e-3, 5e-4 (cosine half-way)."""
    from mmtard.trainer import cosine_lr

    assert [cosine_lr(s, 4, 2) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]
    overrides = tiny_overrides(world_dir, steps=4, **{"train.warmup_frac": 0.5, "attack.steps": 0})
    Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False).train()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


def test_images_per_s_leaves_out_checkpoint_writing(world_dir, tmp_path, monkeypatch):
    """A checkpoint taking 1 s more (a slow disk) shows in ``elapsed_s`` (wall time) but not in
    the next row's ``images_per_s`` (training speed)."""
    import time

    write = Trainer._write_checkpoint

    def slow_write(self, streams):
        time.sleep(1.0)
        write(self, streams)

    monkeypatch.setattr(Trainer, "_write_checkpoint", slow_write)
    overrides = tiny_overrides(world_dir, steps=2, **{"attack.steps": 0})
    Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False).train()
    first, second = csv.DictReader(open(tmp_path / "run" / "metrics.csv"))  # a checkpoint after step 1
    wall = float(second["elapsed_s"]) - float(first["elapsed_s"])
    training = 8 / float(second["images_per_s"])  # global batch 8
    assert wall - training >= 1.0  # the write's extra second (and its own time) left out of the speed


def test_robust_stream_off_runs_no_attack_and_needs_no_robust_teacher(world_dir, tmp_path, monkeypatch):
    from mmtard.methods.base import Method

    calls = []
    real = Method.attack
    monkeypatch.setattr(Method, "attack", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    clean_only = "teachers=[{name: mmtard-small-vit, role: clean}]"
    overrides = tiny_overrides(world_dir, steps=1, **{"method.use_robust": "false"})[1:] + [clean_only]
    trainer = Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False)
    trainer.train()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert calls == [] and torch.isfinite(torch.tensor(float(rows[0]["loss"])))


def test_release_recipe_refuses_ablation_switches(world_dir):
    from mmtard.errors import ConfigError

    for switch in ("use_balance", "use_confidence", "use_clean"):
        with pytest.raises(ConfigError, match=f"method.{switch}: recipe 'release' has no ablation switches"):
            load_config(None, tiny_overrides(world_dir, **{"method.recipe": "release", f"method.{switch}": "false"}))


def test_a_micro_batch_too_small_for_the_sigmoid_balance_is_warned(world_dir, tmp_path, caplog):
    """The paper recipe's balance z-scores confidences over each micro-batch: at 4 images it is noise."""
    with caplog.at_level("WARNING"):
        Trainer(load_config(None, tiny_overrides(world_dir, **{"method.recipe": "paper"})), tmp_path / "paper",
                show_progress=False)
    assert "method.use_balance: the sigmoid balance standardises confidences over each micro-batch, here 4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        Trainer(load_config(None, tiny_overrides(world_dir, **{"method.recipe": "paper", "method.use_balance": "false"})),
                tmp_path / "off", show_progress=False)
    assert "sigmoid balance" not in caplog.text


def test_changing_the_length_on_resume_is_warned(world_dir, tmp_path, monkeypatch, caplog):
    _interrupt_after(tiny_overrides(world_dir, steps=2), tmp_path / "run", 1, monkeypatch)
    with caplog.at_level("WARNING"):
        Trainer(load_config(None, tiny_overrides(world_dir, steps=3)), tmp_path / "run", show_progress=False)
    assert "train.steps changed from 2 to 3 on resume" in caplog.text


def test_changing_the_length_on_resume_follows_the_new_schedule_from_the_next_step(world_dir, tmp_path, monkeypatch):
    from mmtard.trainer import cosine_lr

    _interrupt_after(tiny_overrides(world_dir, steps=4, **{"attack.steps": 0}), tmp_path / "run", 2, monkeypatch)
    Trainer(load_config(None, tiny_overrides(world_dir, steps=8, **{"attack.steps": 0})), tmp_path / "run",
            show_progress=False).train()
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(r["lr"]) for r in rows[2:]] == pytest.approx([1e-3 * cosine_lr(s, 8, 0) for s in range(2, 8)])


def test_a_resume_logs_the_rows_of_an_uninterrupted_run_when_checkpoints_fall_between_logs(
        world_dir, tmp_path, monkeypatch):
    """Logs every 2 steps, checkpoints every 3: a row at every checkpoint as well, so no logged mean
    spans the checkpoint a run is resumed from."""
    overrides = tiny_overrides(world_dir, steps=4, **{"train.log_every": 2, "train.ckpt_every": 3, "attack.steps": 0})
    Trainer(load_config(None, overrides), tmp_path / "a", show_progress=False).train()
    _interrupt_after(overrides, tmp_path / "b", 3, monkeypatch)
    Trainer(load_config(None, overrides), tmp_path / "b", show_progress=False).train()
    _assert_same_run(tmp_path / "a", tmp_path / "b")
    assert [r["step"] for r in csv.DictReader(open(tmp_path / "b" / "metrics.csv"))] == ["2", "3", "4"]


def test_force_with_a_config_that_fails_to_build_deletes_nothing(world_dir, tmp_path):
    from mmtard.errors import MmtardError

    run = tmp_path / "run"
    Trainer(load_config(None, tiny_overrides(world_dir, steps=1)), run, show_progress=False).train()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    bad = tiny_overrides(world_dir, steps=1)[1:] + [
        "teachers=[{name: mmtard-small-vit, role: clean, pretrained: /nonexistent/teacher.safetensors}, "
        "{name: mmtard-small-vit, role: robust}]"]
    with pytest.raises(MmtardError, match="/nonexistent/teacher.safetensors"):
        Trainer(load_config(None, bad), run, force=True, show_progress=False)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # the finished run is whole


def test_a_fresh_start_drops_the_cache_a_run_killed_before_its_first_checkpoint_left(world_dir, tmp_path,
                                                                                     monkeypatch):
    """Cache rows are keyed by sample, not by teacher: rows an earlier config's teacher wrote must not
    be read by a new run in the same folder; a resumed run keeps its own."""
    run = tmp_path / "run"
    _interrupt_after(tiny_overrides(world_dir, steps=2), run, 1, monkeypatch)
    cache = run / "cache" / "clean_teacher"
    own = sorted(cache.iterdir())
    assert own
    Trainer(load_config(None, tiny_overrides(world_dir, steps=2)), run, show_progress=False)  # resumes
    assert sorted(cache.iterdir()) == own
    for checkpoint in (run / "checkpoints").iterdir():  # now as if killed before its first checkpoint
        checkpoint.unlink()
    trainer = Trainer(load_config(None, tiny_overrides(world_dir, steps=2)), run, show_progress=False)
    assert trainer.resume_from is None and not any(cache.glob("teacher*"))


def test_a_force_killed_while_deleting_checkpoints_leaves_none_to_resume(world_dir, tmp_path, monkeypatch):
    """--force with config B over a run of config A, killed while the old checkpoints are deleted:
    A's command must not then resume one of them (config.yaml still says A)."""
    import shutil

    from mmtard import runs

    a = tiny_overrides(world_dir, steps=3, **{"attack.steps": 0, "train.ckpt_every": 1})
    b = a + ["train.lr=0.002"]
    _interrupt_after(a, tmp_path / "run", 2, monkeypatch)
    rmtree = shutil.rmtree

    def killed_inside(path, *args, **kwargs):
        if Path(path).name == ".checkpoints.deleting":
            raise KeyboardInterrupt
        return rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runs.shutil, "rmtree", killed_inside)
        with pytest.raises(KeyboardInterrupt):
            Trainer(load_config(None, b), tmp_path / "run", force=True, show_progress=False)
    trainer = Trainer(load_config(None, a), tmp_path / "run", show_progress=False)
    assert trainer.resume_from is None and not (tmp_path / "run" / ".checkpoints.deleting").exists()


def test_a_second_run_in_a_folder_that_is_training_is_refused(world_dir, tmp_path):
    """Two processes in one DIR (a requeued job whose first copy still runs) would overwrite each
    other's checkpoints; the second is refused, naming the first, and the folder is free again once
    the first ends. Locks of one process's separate opens conflict as two processes' do."""
    import os

    from mmtard.errors import MmtardError

    overrides = tiny_overrides(world_dir, steps=1, **{"attack.steps": 0})
    first = Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False)
    with pytest.raises(MmtardError, match=f"run is in use by another mmtard run \\(pid {os.getpid()} on "):
        Trainer(load_config(None, overrides), tmp_path / "run", force=True, show_progress=False)
    assert (tmp_path / "run" / "config.yaml").exists(), "the refused --force deleted nothing"
    first.train()
    Trainer(load_config(None, overrides), tmp_path / "run", force=True, show_progress=False).train()


def test_resuming_over_changed_training_data_is_refused(world_dir, tmp_path, monkeypatch):
    """A checkpoint's data position counts into one listing of the samples; over another (an image
    removed between the sessions) it would silently train on other images."""
    import shutil

    from mmtard.errors import DataError

    world = tmp_path / "world"
    shutil.copytree(world_dir, world)
    overrides = tiny_overrides(world, steps=2, **{"attack.steps": 0})
    _interrupt_after(overrides, tmp_path / "run", 1, monkeypatch)
    sorted((world / "classification" / "train").rglob("*.png"))[0].unlink()
    with pytest.raises(DataError, match=r"changed since .*step_00000001.pt was written \(240 samples, listing \w+, "
                                        r"class names (\w+) then; 239, \w+, \1 now\)"):
        Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False).train()
    # the same images under other class names (the heads were built from the old ones)
    from mmtard import checkpoint as ckpt

    shutil.rmtree(world)
    shutil.copytree(world_dir, world)
    (_, path), = ckpt.list_checkpoints(tmp_path / "run")
    state = ckpt.load_checkpoint(path)
    state["data"]["classes"] = "0123456789ab"
    ckpt.atomic_save(state, path)
    with pytest.raises(DataError, match=r"class names 0123456789ab then; 240, \w+, \w+ now"):
        Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False).train()
    del state["data"]["classes"]  # as an earlier version wrote it: what it lacks is not compared
    ckpt.atomic_save(state, path)
    Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False).train()


def test_a_run_killed_while_it_sets_up_leaves_a_folder_the_same_command_takes_up(world_dir, tmp_path, monkeypatch):
    """Building a Trainer writes into DIR (the clean-teacher cache) before its first step; a kill
    then, or while --force clears an old run, must leave DIR marked as a run folder, not a folder
    of unknown files that every later command refuses."""
    overrides = tiny_overrides(world_dir, steps=1, **{"attack.steps": 0})
    run = tmp_path / "run"
    Trainer(load_config(None, overrides), run, show_progress=False)  # killed before train()
    assert (run / "cache" / "clean_teacher").is_dir() and (run / "config.yaml").is_file()
    Trainer(load_config(None, overrides), run, show_progress=False).train()
    assert (run / "student.safetensors").is_file()

    def killed_while_clearing(path, *args, **kwargs):
        if Path(path).name == "run.json":
            raise KeyboardInterrupt
        return unlink(path, *args, **kwargs)

    unlink = Path.unlink
    monkeypatch.setattr(Path, "unlink", killed_while_clearing)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_config(None, overrides), run, force=True, show_progress=False)
    monkeypatch.undo()
    assert not (run / "checkpoints").exists() and (run / "config.yaml").is_file()
    Trainer(load_config(None, overrides), run, show_progress=False).train()
    assert (run / "student.safetensors").is_file()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_share_one_stream_of_micro_batches_over_epochs(world):
    """n = 26 samples, micro-batch 2, global batch 2 x world: epochs of whole global batches, dealt
    out to the ranks, interleave into the single process's stream (same global batch, accumulation
    `world`) epoch after epoch, and a rank restarted at any position continues its own stream."""
    from mmtard.distributed import DistEnv
    from mmtard.trainer import epoch_indices, stream_start

    n, micro, seed, epochs = 26, 2, 3, 4
    global_batch = micro * world

    def stream(env, micro=micro):
        samples = [i for e in range(epochs) for i in epoch_indices(n, e, seed, env, micro, global_batch)]
        return [samples[k:k + micro] for k in range(0, len(samples), micro)]

    single = stream(DistEnv())
    assert len(single) == epochs * (n // global_batch) * world
    ranks = [stream(DistEnv(rank=r, world_size=world)) for r in range(world)]
    assert [ranks[g % world][g // world] for g in range(len(single))] == single
    for rank, blocks in enumerate(ranks):
        env = DistEnv(rank=rank, world_size=world)
        for position in range(len(blocks)):
            epoch, offset = stream_start(position, n, env, micro, global_batch)
            assert epoch_indices(n, epoch, seed, env, micro, global_batch)[offset * micro:][:micro] == blocks[position]
    # one process taking whole global batches as its micro-batch sees the same images in every step
    whole = stream(DistEnv(), micro=global_batch)
    assert [sorted(sum(single[s * world:(s + 1) * world], [])) for s in range(len(whole))] == [sorted(b) for b in whole]


def test_grad_clip_zero_turns_clipping_off(world_dir, tmp_path):
    """0 means no clipping: torch's clip_grad_norm_ with max_norm 0 would zero every gradient, and
    without weight decay the step would then move nothing."""
    overrides = tiny_overrides(world_dir, steps=1, **{"train.grad_clip": 0, "train.weight_decay": 0,
                                                      "attack.steps": 0})
    trainer = Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False)
    before = [p.detach().clone() for p in trainer.trainable]
    trainer.train()
    assert max(float((p.detach() - b).abs().max()) for p, b in zip(trainer.trainable, before)) > 1e-4
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert float(rows[0]["grad_norm"]) > 0


@pytest.mark.parametrize("recipe", ["paper", "release"])
def test_ard_recipes_distil_from_the_robust_teacher_on_adversarial_or_clean_images(world_dir, tmp_path, recipe):
    """``paper`` (METHOD.md §5): KL(z_R(x_adv) || z_S(x_adv)); ``release`` (the release's
    single-teacher script, the original ARD): KL(z_R(x) || z_S(x_adv)), with no teacher pass on x_adv."""
    from mmtard.losses import kl_per_sample

    overrides = tiny_overrides(world_dir, "ard", steps=1, **{"method.recipe": recipe, "train.precision": "fp32",
                                                            "train.clean_teacher_cache": "false"})
    trainer = Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False)
    (_, robust), = trainer.method.teachers_of("robust")
    seen = []
    embed = robust.model.image_embed
    robust.model.image_embed = lambda x: seen.append(x.detach().clone()) or embed(x)
    images, labels, indices = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=4)))
    trainer.method.train()
    out = trainer.method(images, labels, indices)
    assert torch.equal(seen[0], images) and len(seen) == (1 if recipe == "release" else 2)
    if recipe == "paper":
        assert not torch.equal(seen[1], images)  # the adversarial images
    with torch.no_grad():
        target = robust.model.logits(images if recipe == "release" else seen[1])
    expected = kl_per_sample(target, out["logits_adv"]).mean()
    torch.testing.assert_close(out["loss"], expected, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_an_older_model_forward_is_not_resumed(world_dir, tmp_path, monkeypatch):
    """A run checkpointed when OpenAI-derived weights ran with GELU would change its model half-way."""
    from mmtard import checkpoint as ckpt
    from mmtard.errors import MmtardError

    overrides = tiny_overrides(world_dir, steps=3)
    _interrupt_after(overrides, tmp_path / "run", 1, monkeypatch)
    (_, path), = ckpt.list_checkpoints(tmp_path / "run")
    state = ckpt.load_checkpoint(path)
    del state["forward"]  # as written before the field existed
    ckpt.atomic_save(state, path)
    with pytest.raises(MmtardError, match="written by an older mmtard, before model-forward version 2"):
        Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False).train()


def test_a_checkpoint_missing_part_of_its_state_is_named(world_dir, tmp_path, monkeypatch):
    from mmtard import checkpoint as ckpt
    from mmtard.errors import MmtardError

    overrides = tiny_overrides(world_dir, steps=3, **{"attack.steps": 0})
    _interrupt_after(overrides, tmp_path / "run", 1, monkeypatch)
    (_, path), = ckpt.list_checkpoints(tmp_path / "run")
    state = ckpt.load_checkpoint(path)
    del state["position"], state["rng"]  # a checkpoint someone trimmed by hand
    ckpt.atomic_save(state, path)
    with pytest.raises(MmtardError, match=r"step_00000001.pt lacks position, rng, so the run cannot continue"):
        Trainer(load_config(None, overrides), tmp_path / "run", show_progress=False).train()


def test_resuming_drops_what_killed_writers_left_and_keeps_other_files(world_dir, tmp_path, monkeypatch):
    """A writer killed mid-write leaves a full-size temporary file; on a tight disk it would make
    every retry fail. The next run (holding the folder's lock) deletes them; a user's files stay."""
    from mmtard.checkpoint import checkpoint_dir, rng_state

    run = tmp_path / "run"
    _interrupt_after(tiny_overrides(world_dir, steps=2), run, 1, monkeypatch)
    left = [checkpoint_dir(run) / ".step_00000002.pt.4242.tmp", run / ".metrics.csv.4242.tmp",
            run / "student.safetensors.tmp"]
    for path in left:
        path.write_bytes(b"x" * 1000)
    (run / "notes.tmp").write_text("mine")
    Trainer(load_config(None, tiny_overrides(world_dir, steps=2)), run, show_progress=False)
    assert not any(path.exists() for path in left) and (run / "notes.tmp").read_text() == "mine"
    assert "cuda" not in rng_state(cuda=False)  # a CPU run never asks CUDA for its generator


def test_a_checkpoint_without_mtards_balancer_is_refused_with_its_name(world_dir, tmp_path, monkeypatch):
    """Resumed from scratch, MTARD's temperatures and weights would silently differ from the
    uninterrupted run's: the checkpoint is refused, by name."""
    from mmtard.checkpoint import atomic_save, latest_checkpoint, load_checkpoint
    from mmtard.errors import MmtardError

    run = tmp_path / "run"
    _interrupt_after(tiny_overrides(world_dir, method="mtard", steps=2), run, 1, monkeypatch)
    path = latest_checkpoint(run)
    state = load_checkpoint(path)
    del state["method"]["mtard_balancer"]
    atomic_save(state, path)
    trainer = Trainer(load_config(None, tiny_overrides(world_dir, method="mtard", steps=2)), run, show_progress=False)
    with pytest.raises(MmtardError, match=r"step_00000001.pt: the method's state cannot be restored: no 'mtard_balancer'"):
        trainer.train()


def test_metrics_are_made_durable_before_each_checkpoint(world_dir, tmp_path, monkeypatch):
    from mmtard.metrics import MetricsWriter

    events = []
    original_flush, original_save = MetricsWriter.flush, Trainer._write_checkpoint
    monkeypatch.setattr(MetricsWriter, "flush", lambda self: events.append("flush") or original_flush(self))
    monkeypatch.setattr(Trainer, "_write_checkpoint",
                        lambda self, streams: events.append("checkpoint") or original_save(self, streams))
    Trainer(load_config(None, tiny_overrides(world_dir, steps=2)), tmp_path / "run", show_progress=False).train()
    assert events and events[:2] == ["checkpoint", "flush"] and events.count("flush") == events.count("checkpoint")
