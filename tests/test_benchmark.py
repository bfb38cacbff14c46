"""The throughput benchmark runs end to end on tiny models and prints every field (not speed)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_throughput.py"


def _benchmark(name: str, monkeypatch):
    """A benchmark script as a module, to run its main() in this process (no second start-up of
    torch, as a subprocess would pay); its folder on the path, as when run as a script."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_benchmark_prints_every_field(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MMTARD_CACHE_DIR=str(tmp_path / "cache"))
    args = [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
            "--ref-steps", "1", "--pgd-steps", "2", "--eval", "--eval-n", "4", "--eval-iterations", "2",
            "--check", "--profile", "--attention", "math", "--patch-embed", "matmul", "--last-block", "class_token",
            "--teacher-attention", "split"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            _, name, *fields = line.split()
            results[name] = dict(f.split("=", 1) for f in fields)
    assert "failed" not in " ".join(results), proc.stdout
    for name in ("reference", "mmtard_eager_nocache", "mmtard_eager_cache"):
        for key in ("images_per_s", "s_per_step", "peak_mem_GiB"):
            assert key in results[name], (name, key)
        assert float(results[name]["images_per_s"]) > 0
    for name in ("mmtard_eager_nocache", "mmtard_eager_cache"):
        for key in ("ratio_b_over_a", "gflop_per_image", "fraction_of_peak"):
            assert key in results[name], (name, key)
    assert float(results["flops_nocache"]["gflop_per_step"]) > float(results["flops_cache"]["gflop_per_step"]) > 0
    assert float(results["autoattack"]["images_per_s"]) > 0
    assert {"clean_teacher_s", "attack_s", "robust_teacher_s", "student_update_s"} <= set(results["breakdown_eager"])
    assert results["patch_embed"] == {"mode": "matmul", "towers": "3"}
    assert results["last_block"] == {"mode": "class_token", "towers": "3"}
    # asked for and reported; the tiny teachers (37 tokens) keep train.attention's choice
    assert results["teacher_attention"] == {"mode": "split", "towers": "0"}
    assert float(results["check_eager"]["rel_diff_pgd2"]) < 0.05  # the fast step keeps the loss
    assert "profile" in results and "Self CPU" in proc.stdout
    assert re.search(r"\(b\) eager +cache", proc.stdout)


def test_shard_read_benchmark_runs(tmp_path):
    script = SCRIPT.parent / "shard_read.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", MMTARD_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(script), "--samples", "40", "--shards", "2", "--classes", "4",
                           "--reads", "10", "--image-px", "32"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert names == ["write", "index", "read", "read"]
    assert re.search(r"RESULT read source=shards reads=10 seconds=\S+ samples_per_s=\S+", proc.stdout)


def test_attack_update_benchmark_checks_the_fused_update(capsys, monkeypatch):
    assert _benchmark("attack_update", monkeypatch).main(["--tiny", "--device", "cpu", "--backend", "aot_eager"]) == 0
    lines = re.findall(r"RESULT update norm=(\S+) eager_ms=\S+ fused_ms=\S+ speedup=\S+ per_step_saved_ms=\S+ "
                       r"max_abs_diff=(\S+) compile_s=\S+", capsys.readouterr().out)
    assert [norm for norm, _ in lines] == ["linf", "l2"] and float(lines[0][1]) == 0.0


def test_attention_kernel_benchmark_runs(capsys, monkeypatch):
    assert _benchmark("attention_kernels", monkeypatch).main(["--tiny", "--device", "cpu", "--iters", "1"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT ")]
    timed = {(fields[1], fields[2]) for fields in lines if any(f.startswith("us_per_call=") for f in fields)}
    refused = {(fields[1], fields[2]) for fields in lines if any(f.startswith("refused=") for f in fields)}
    for shape in ("student", "update", "teacher"):
        assert {(shape, "kernel=torch"), (shape, "kernel=math"), (shape, "kernel=flash")} <= timed
        assert (shape, "kernel=cudnn") in refused  # a CPU has no cuDNN attention: reported, not fatal
    # the step's cost per kernel (calls per step times seconds per call), for kernels serving every shape
    per_call = {(f[1], f[2]): float(next(x for x in f if x.startswith("us_per_call="))[12:]) for f in lines
                if any(x.startswith("us_per_call=") for x in f)}
    step = {f[2]: float(f[3].split("=")[1]) for f in lines if f[1] == "step_attention"}
    assert set(step) == {"kernel=torch", "kernel=flash", "kernel=math", "kernel=short", "kernel=short-bwd8",
                         "kernel=split"}
    expected = sum(calls * per_call[(shape, "kernel=math")] for shape, calls in
                   (("student", 120), ("update", 12), ("teacher", 24))) / 1e3
    assert step["kernel=math"] == pytest.approx(expected, rel=1e-2, abs=0.02)
    best = [f for f in lines if f[1] == "best"]
    assert best and best[0][2] == min(step, key=step.get)


def test_written_out_attention_is_sdpa():
    # benchmarks/attention_matmul.py times this form against torch's fused kernels
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from attention_matmul import written_out
    finally:
        sys.path.remove(str(SCRIPT.parent))
    q, k, v = torch.randn(3, 2, 4, 7, 8).unbind(0)
    torch.testing.assert_close(written_out(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_tower_pass_benchmark_counts_what_each_rewrite_saves(capsys, monkeypatch):
    # the teacher is the student's architecture, so its no-grad forward is half the attack's pass
    assert _benchmark("tower_passes", monkeypatch).main(["--tiny", "--device", "cpu", "--only", "open_clip,class_token",
                                            "--teacher", "mmtard-tiny-vit"]) == 0
    results = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("RESULT "):
            _, name, *fields = line.split()
            fields = dict(f.split("=", 1) for f in fields)
            results[(name, fields.get("rewrite"))] = fields
    for rewrite in ("open_clip", "class_token"):
        for name in ("pass_attack", "pass_update", "pass_teacher"):
            assert float(results[(name, rewrite)]["s"]) > 0
        assert float(results[("towers", rewrite)]["tower_s"]) > 0
        # forward + input gradient = 2 forwards; the frozen teacher's fast attention path is counted too
        attack, teacher = (float(results[(name, rewrite)]["gflop_per_image"]) for name in ("pass_attack", "pass_teacher"))
        assert attack == pytest.approx(2 * teacher, rel=0.01)
    # the tiny towers have 2 blocks: a class-token last block saves most of one of them, every pass
    for name in ("pass_attack", "pass_update", "pass_teacher"):
        full, fast = (float(results[(name, r)]["gflop_per_image"]) for r in ("open_clip", "class_token"))
        assert 0.5 * full < fast < 0.8 * full, (name, full, fast)
    assert ("towers", "matmul") not in results  # --only
