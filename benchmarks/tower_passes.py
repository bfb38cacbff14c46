"""What the exact tower rewrites save, pass by pass (issue 7).

The training step's time is its image towers' passes: per step, ten PGD iterations of the student
(eval mode, forward and input gradient, batch B), one update of the student (train mode, forward
and backward with weight gradients, batch 2B: clean and adversarial) and one robust-teacher
forward (no gradient, batch B; the clean teacher is cached). This times each pass alone, with
open_clip's towers and with each rewrite of :mod:`mmtard.tower_rewrites` (``train.patch_embed``,
``train.last_block``), and counts its FLOPs with ``torch.utils.flop_counter.FlopCounterMode``.
``tower_s`` = 10 x attack + update + teacher, the towers' share of one step (the heads, losses
and optimiser are not in it); ``step_throughput.py`` times the whole step.

    python benchmarks/tower_passes.py                                  # one GPU: ViT-B-32, ViT-L-14, B=128, bf16
    python benchmarks/tower_passes.py --device cpu --batch 8 --teacher-batch 2
    python benchmarks/tower_passes.py --tiny --device cpu              # seconds (the test suite)

Every result line starts with ``RESULT`` and holds ``key=value`` fields.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from mmtard import tower_rewrites  # noqa: E402  (after the path set-up)
from mmtard.speed import input_grad_only  # noqa: E402
from attention_kernels import time_call  # noqa: E402  (this folder)
from step_throughput import count_flops  # noqa: E402

#: (label, train.patch_embed, train.last_block), each applied to fresh copies of the towers
REWRITES = [("open_clip", "conv", "full"), ("class_token", "conv", "class_token"),
            ("matmul", "matmul", "full"), ("matmul+class_token", "matmul", "class_token")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--tiny", action="store_true", help="mmtard-tiny-vit student, mmtard-small-vit teacher, batch 4")
    p.add_argument("--student", default=None, help="open_clip model name (default ViT-B-32-quickgelu)")
    p.add_argument("--teacher", default=None, help="open_clip model name (default ViT-L-14-quickgelu)")
    p.add_argument("--batch", type=int, default=None, help="the step's micro-batch B (default 128; tiny 4)")
    p.add_argument("--teacher-batch", type=int, default=None, help="batch of the teacher pass (default B)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per pass (default 10; tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per pass first (default 3; tiny 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile each tower (compile time not timed)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead")
    p.add_argument("--only", default=None, help="comma-separated labels of REWRITES to run")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    # QuickGELU as OpenAI's weights, which the paper's student and teachers start from
    args.student = args.student or ("mmtard-tiny-vit" if args.tiny else "ViT-B-32-quickgelu")
    args.teacher = args.teacher or ("mmtard-small-vit" if args.tiny else "ViT-L-14-quickgelu")
    args.batch = args.batch or (4 if args.tiny else 128)
    args.teacher_batch = args.teacher_batch or args.batch
    args.iters = args.iters or (1 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    return args


def emit(name: str, **fields) -> None:
    text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
    print(f"RESULT {name} {text}", flush=True)


def image_tower(name: str, device: torch.device) -> torch.nn.Module:
    from mmtard.models import ModelSpec, create_clip

    return create_clip(ModelSpec(name, None), device).visual  # random weights: timing does not depend on them


def passes(student: torch.nn.Module, teacher: torch.nn.Module, args, device: torch.device) -> dict:
    """The three passes as closures over fixed random inputs (pixel values; the towers normalise
    nothing themselves, which changes no cost)."""
    size = student.image_size if isinstance(student.image_size, int) else student.image_size[0]
    t_size = teacher.image_size if isinstance(teacher.image_size, int) else teacher.image_size[0]
    x = torch.rand(args.batch, 3, size, size, device=device)
    x2 = torch.rand(2 * args.batch, 3, size, size, device=device)
    xt = torch.rand(args.teacher_batch, 3, t_size, t_size, device=device)
    params = [p for p in student.parameters() if p.requires_grad]

    def attack():
        student.eval()
        with input_grad_only(student):
            delta = torch.zeros_like(x, requires_grad=True)
            torch.autograd.grad(student(x + delta).float().square().sum(), delta)

    def update():
        student.train()
        torch.autograd.grad(student(x2).float().square().sum(), params)

    def teacher_pass():
        with torch.no_grad():
            teacher(xt)

    return {"attack": (attack, args.batch), "update": (update, 2 * args.batch),
            "teacher": (teacher_pass, args.teacher_batch)}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    gpu = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    emit("setup", device=device.type, gpu=gpu, torch=torch.__version__, student=args.student, teacher=args.teacher,
         batch=args.batch, teacher_batch=args.teacher_batch, precision=str(amp or "fp32"), compile=args.compile,
         compile_mode=args.compile_mode, threads=torch.get_num_threads())
    base_student, base_teacher = image_tower(args.student, device), image_tower(args.teacher, device)
    only = set(args.only.split(",")) if args.only else None
    for label, patch_embed, last_block in REWRITES:
        if only and label not in only:
            continue
        student, teacher = copy.deepcopy(base_student), copy.deepcopy(base_teacher)
        if patch_embed == "matmul":
            tower_rewrites.matmul_patch_embedding([student, teacher])
        if last_block == "class_token":
            tower_rewrites.class_token_last_block([student, teacher])
        calls = passes(student, teacher, args, device)  # closures over the towers: compiling in place keeps them
        flops = {name: count_flops(fn) / n / 1e9 for name, (fn, n) in calls.items()}
        if args.compile:
            for tower in (student, teacher):
                tower.compile(mode=args.compile_mode, dynamic=False)
        seconds = {}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            for name, (fn, n) in calls.items():
                seconds[name] = time_call(fn, device, args.warmup, args.iters)
                emit(f"pass_{name}", rewrite=label, s=seconds[name], images_per_s=n / seconds[name],
                     gflop_per_image=flops[name])
        tower_s = 10 * seconds["attack"] + seconds["update"] + seconds["teacher"] * args.batch / args.teacher_batch
        emit("towers", rewrite=label, tower_s=tower_s,
             gflop_per_image=10 * flops["attack"] + 2 * flops["update"] + flops["teacher"])
        del student, teacher
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
