"""torchrun on CPU: two gloo processes against one, through the real launcher and CLI.

The runs go through ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m mmtard ...``
(``--standalone`` picks a free rendezvous port) and are compared with a single process. One
distributed training run serves two tests: its rank 1 dies after the step-2 checkpoint and the
run is launched again, so it checks the dead-rank path, resumption and equivalence at once.

Stated tolerance for training: with the same global batch and seed, 2 ranks x micro-batch 4 and one
process x micro-batch 4 x accumulation 2 see the same micro-batches (epoch_indices deals them
round-robin), draw the same attack noise (seeded per global micro-batch) and average the same two
gradients, so losses and weights agree to atol 1e-6 / rtol 1e-5 (float reduction order is the only
possible difference; on CPU they come out bitwise equal). Evaluation must match exactly.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmtard.autoattack import AttackSpec
from mmtard.checkpoint import list_checkpoints, load_checkpoint
from mmtard.cli import main
from mmtard.config import load_config
from mmtard.eval_sets import world_datasets
from mmtard.evaluate import ModelEntry, run_eval
from mmtard.models import ModelSpec, create_clip, export_open_clip
from mmtard.trainer import Trainer
from test_trainer import tiny_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 4
TOLERANCE = dict(atol=1e-6, rtol=1e-5)
# Rank 1 dies right after the step-2 checkpoint, as a crashed or pre-empted worker would.
_DIE_AFTER_STEP_2 = """
import os, sys
from mmtard import trainer
from mmtard.cli import main

save = trainer.Trainer._save_checkpoint

def save_then_die(self):
    save(self)
    if self.step == 2 and self.env.rank == 1:
        os._exit(17)

trainer.Trainer._save_checkpoint = save_then_die
sys.exit(main(sys.argv[1:]))
"""


# Rank 1 lists one training image fewer, as a rank reading a folder that changed mid-launch would.
_ONE_IMAGE_FEWER_ON_RANK_1 = """
import os, sys
from mmtard import trainer
from mmtard.cli import main

build = trainer.build_dataset

def one_image_fewer_on_rank_1(config):
    dataset = build(config)
    if os.environ["RANK"] == "1":
        for listing in (dataset.files, dataset.targets, dataset.sample_ids):
            listing.pop()
    return dataset

trainer.build_dataset = one_image_fewer_on_rank_1
sys.exit(main(sys.argv[1:]))
"""


def _torchrun(*args: str, script: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "mmtard"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target,
               "-q", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMTARD_DIST_TIMEOUT": "60"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=Path(__file__).resolve().parents[1])


def _distill(world_dir, tmp_path: Path, out: Path, script: Path | None = None, **extra) -> subprocess.CompletedProcess:
    config = tmp_path / "c.yaml"
    config.write_text("student: {name: mmtard-tiny-vit}\n")
    overrides = tiny_overrides(world_dir, steps=STEPS, **extra)
    return _torchrun("distill", "--config", str(config), "--out", str(out), *overrides, script=script)


def _losses(run: Path) -> list[float]:
    return [float(row["loss"]) for row in csv.DictReader(open(run / "metrics.csv"))]


@pytest.fixture(scope="module")
def relaunched_run(world_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-rank run whose rank 1 dies after the step-2 checkpoint, then launched again to the end."""
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "die.py"
    script.write_text(_DIE_AFTER_STEP_2)
    died = _distill(world_dir, tmp, tmp / "run", script=script)
    assert [step for step, _ in list_checkpoints(tmp / "run")] == [1, 2]
    resumed = _distill(world_dir, tmp, tmp / "run")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return tmp / "run", died


def test_a_dead_rank_stops_the_others_and_relaunching_resumes(relaunched_run):
    run, died = relaunched_run
    assert died.returncode != 0, "torchrun reports the failed worker"
    assert "exitcode  : 17" in died.stderr
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1)), "rows after the checkpoint are logged once"
    assert (run / "student.safetensors").exists()


def test_two_ranks_match_one_process_with_accumulation(relaunched_run, world_dir, tmp_path):
    """Global batch 8: 2 ranks x micro 4 there, 1 process x micro 4 x accumulation 2 here. The
    distributed run was interrupted at step 2 and resumed, which must not show either."""
    run, _ = relaunched_run
    config = load_config(None, tiny_overrides(world_dir, steps=STEPS))
    single = Trainer(config, tmp_path / "single", show_progress=False)
    assert (single.plan.micro_batch, single.plan.accumulation) == (4, 2)
    single.train()
    info = json.loads((run / "run.json").read_text())
    assert (info["world_size"], info["micro_batch"], info["accumulation"]) == (2, 4, 1)

    ddp_losses, single_losses = _losses(run), _losses(tmp_path / "single")
    assert len(ddp_losses) == STEPS
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), **TOLERANCE)
    a = load_file(str(run / "student.safetensors"))
    b = load_file(str(tmp_path / "single" / "student.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **TOLERANCE)
    # rank 0 wrote the checkpoints, with both ranks' RNG streams; the two ranks of this one node
    # shared one clean-teacher cache
    state = load_checkpoint(list_checkpoints(run)[-1][1])
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    cache = sorted(p.name for p in (run / "cache" / "clean_teacher").iterdir())
    # teacher<i>-<weights digest>-node<n>-<samples digest>
    assert [(name.split("-")[0], name.split("-")[2]) for name in cache] == [("teacher0", "node0")] * 2
    assert [name.rsplit(".", 1)[1] for name in cache] == ["f32", "mask"]


def test_global_batch_not_divisible_by_world_size_is_refused(world_dir, tmp_path, monkeypatch, capsys):
    # what torchrun sets for rank 0 of 2; the batch is checked before joining the process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "c.yaml").write_text("student: {name: mmtard-tiny-vit}\n")
    out = tmp_path / "run"
    code = main(["-q", "distill", "--config", str(tmp_path / "c.yaml"), "--out", str(out),
                 *tiny_overrides(world_dir, **{"train.global_batch": 9})])
    assert code == 2
    assert ("train.global_batch 9 is not divisible by the world size 2; nearest valid values: 8 or 10"
            in capsys.readouterr().err)
    assert not out.exists(), "refused before touching the run folder"


def test_distributed_evaluation_gives_the_single_process_numbers(world_dir, tmp_path):
    weights = export_open_clip(create_clip(ModelSpec("mmtard-tiny-vit")), tmp_path / "tiny.safetensors")
    # 20 samples in batches of 4: five batches, so the second round leaves rank 1 idle
    args = ["--model", "mmtard-tiny-vit", "--pretrained", str(weights), "--name", "tiny",
            "--dataset", f"world-shapes={world_dir}", "--dataset", f"world-colors={world_dir}",
            "--attack", "pgd", "--iterations", "3", "--eps", "1/255,4/255", "--n-samples", "20",
            "--batch-size", "4", "--seed", "3"]
    done = _torchrun("eval", *args, "--out", str(tmp_path / "ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results written") == 1, "only rank 0 reports"

    single = run_eval([ModelEntry("tiny", "mmtard-tiny-vit", str(weights))],
                      world_datasets(world_dir, sets=["world-shapes", "world-colors"]), ["1/255", "4/255"],
                      AttackSpec(name="pgd", iterations=3), n_samples=20, batch_size=4, seed=3,
                      out_dir=tmp_path / "single", progress=False)
    ddp = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert ddp["models"] == json.loads(json.dumps(single["models"]))
    for name in ("world-shapes", "world-colors"):
        a = json.loads((tmp_path / "ddp" / "samples" / "tiny" / f"{name}.json").read_text())
        b = json.loads((tmp_path / "single" / "samples" / "tiny" / f"{name}.json").read_text())
        for key in ("indices", "sample_ids", "labels", "clean", "robust", "messages"):
            assert a[key] == b[key], key
        assert all(v is not None for v in a["clean"])


def test_two_ranks_with_accumulation_match_one_process(world_dir, tmp_path):
    """2 ranks x micro 2 x accumulation 2 (DDP's no_sync on the first micro-batch of each step)
    against 1 process x micro 2 x accumulation 4: the same global batches, the same student."""
    extra = {"train.micro_batch": 2, "train.ckpt_every": 100}
    proc = _distill(world_dir, tmp_path, tmp_path / "ddp", **extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert (info["world_size"], info["micro_batch"], info["accumulation"]) == (2, 2, 2)
    single = Trainer(load_config(None, tiny_overrides(world_dir, steps=STEPS, **extra)), tmp_path / "single",
                     show_progress=False)
    assert (single.plan.micro_batch, single.plan.accumulation) == (2, 4)
    single.train()
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "ddp")), torch.tensor(_losses(tmp_path / "single")),
                               **TOLERANCE)
    # Four gradients summed in another order (two per rank, then all-reduced) differ in the last
    # bits; Adam divides by sqrt(v), which magnifies that for near-zero gradients, so the weights
    # are compared to well under one lr (1e-3) step, not to rounding: a wrong accumulation scale
    # or a skipped synchronisation moves them by whole steps.
    a = load_file(str(tmp_path / "ddp" / "student.safetensors"))
    b = load_file(str(tmp_path / "single" / "student.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=1e-4)


_NAN_ON_RANK_1 = """
import os, sys
from mmtard import losses
from mmtard.cli import main

real = losses.mmt_ard_paper_loss
calls = {"n": 0}

def poisoned(*args, **kwargs):
    loss, terms = real(*args, **kwargs)
    calls["n"] += 1
    if os.environ.get("RANK") == "1" and calls["n"] > 1:  # a logged term only, on one rank only
        terms["loss_robust"] = terms["loss_robust"] * float("nan")
    return loss, terms

losses.mmt_ard_paper_loss = poisoned
sys.exit(main(sys.argv[1:]))
"""


def test_a_non_finite_value_on_one_rank_stops_every_rank(world_dir, tmp_path):
    script = tmp_path / "nan.py"
    script.write_text(_NAN_ON_RANK_1)
    proc = _distill(world_dir, tmp_path, tmp_path / "run", script=script)
    assert proc.returncode != 0
    assert proc.stderr.count("training diverged by step 2: non-finite loss_robust") == 2, proc.stderr[-3000:]


def test_only_a_lost_peer_is_reported_as_one(monkeypatch):
    """A peer's death or silence becomes one readable refusal; a local backend failure (NCCL out of
    memory, a bad tensor) keeps its own error, since rerunning would fail the same way."""
    from torch import distributed as dist

    from mmtard import distributed
    from mmtard.distributed import DistEnv, RankLostError, lost_ranks_reported

    monkeypatch.setattr(distributed, "current_env", lambda: DistEnv(rank=1, world_size=2))
    lost = [RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]"),
            RuntimeError("Timed out waiting 600000ms for recv operation to complete"),
            dist.DistNetworkError("failed to recv, got 0 bytes")]
    for exc in lost:
        with pytest.raises(RankLostError, match="rank 1: another rank died"):
            with lost_ranks_reported("run the same command again"):
                raise exc
    local = [RuntimeError("gloo: invalid tensor size 3 != 4"),
             dist.DistBackendError("NCCL error in ProcessGroupNCCL.cpp:1970, unhandled cuda error, "
                                   "Cuda failure 'out of memory'")]
    for exc in local:
        with pytest.raises(type(exc)) as raised:
            with lost_ranks_reported("run the same command again"):
                raise exc
        assert raised.value is exc


def test_ranks_that_list_different_data_are_refused(world_dir, tmp_path):
    script = tmp_path / "fewer.py"
    script.write_text(_ONE_IMAGE_FEWER_ON_RANK_1)
    run = _distill(world_dir, tmp_path, tmp_path / "run", script=script)
    assert run.returncode != 0
    assert "the ranks see different training data" in run.stderr and "rank 1: 239 samples" in run.stderr, \
        run.stderr[-3000:]
    assert not list_checkpoints(tmp_path / "run")



# Rank 0's disk fills while it writes the step-2 checkpoint (distill) or the evaluation record after
# the first round of batches (eval); the error is the one a real full disk gives.
_DISK_FULL_ON_RANK_0 = """
import errno, os, sys
from mmtard import checkpoint, evaluate
from mmtard.cli import main

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

save, write_record = checkpoint.save_checkpoint, evaluate.write_json_atomic

def disk_full_at_step_2(run_dir, step, state, **kwargs):
    if step == 2 and os.environ["RANK"] == "0":
        checkpoint.durable_replace = no_space
    return save(run_dir, step, state, **kwargs)

def disk_full_after_a_round(record, path):
    if os.environ["RANK"] == "0" and any(v is not None for v in record.get("clean", [])):
        checkpoint.durable_replace = no_space
    return write_record(record, path)

checkpoint.save_checkpoint, evaluate.write_json_atomic = disk_full_at_step_2, disk_full_after_a_round
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", ["distill", "eval"])
def test_a_failed_write_on_rank_0_stops_every_rank_with_its_reason(command, world_dir, tmp_path):
    """Launched without torchrun's agent (as a cluster launcher that sets RANK and WORLD_SIZE
    itself): no one stops rank 1 when rank 0 fails, so rank 1 must learn rank 0's reason from rank
    0. Before, it blamed a lost peer: at once over gloo, which sees rank 0's socket close, and only
    after the process-group timeout over NCCL."""
    import socket

    script = tmp_path / "full.py"
    script.write_text(_DISK_FULL_ON_RANK_0)
    if command == "distill":
        (tmp_path / "c.yaml").write_text("student: {name: mmtard-tiny-vit}\n")
        args = ["--config", str(tmp_path / "c.yaml"), *tiny_overrides(world_dir, steps=STEPS)]
    else:
        weights = export_open_clip(create_clip(ModelSpec("mmtard-tiny-vit")), tmp_path / "tiny.safetensors")
        args = ["--model", "mmtard-tiny-vit", "--pretrained", str(weights), "--dataset", f"world-shapes={world_dir}",
                "--attack", "pgd", "--iterations", "1", "--n-samples", "20", "--batch-size", "4"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MMTARD_DIST_TIMEOUT": "120", "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, str(script), "-q", command, "--out", str(tmp_path / "out"), *args],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
             for r in range(2)]
    outputs = [rank.communicate(timeout=100) for rank in ranks]  # the 120 s timeout must not be needed
    written = "step_00000002.pt" if command == "distill" else "world-shapes.json"
    for rank, (_, err) in zip(ranks, outputs):
        assert rank.returncode == 2, err[-3000:]
        assert f"{written}: No space left on device; any previous file there is intact" in err, err[-3000:]
    if command == "distill":
        assert [step for step, _ in list_checkpoints(tmp_path / "out")] == [1]
