"""Training-step and evaluation throughput of mmtard on one device (issue 7).

In ONE process, with random weights (timing does not depend on their values):

(a) ``reference``: a release-style MMT-ARD step written here: fp32, PGD-10 with momentum against
    the student maximising KL to the clean teacher, three teacher passes (clean teacher on x,
    robust teacher on x_adv, and the original-CLIP pass the release computes and never uses), the
    release loss (entry-wise KL, factors 50 and 5, cosine confidences) and an AdamW step.
(b) ``mmtard``: one step of mmtard's own trainer: a real :class:`mmtard.trainer.Trainer` built
    from a :class:`mmtard.config.Config` (method ``mmt_ard``), driven through its real
    ``Trainer._train_step`` with batches already on the device (the data loader is not timed).
    Variants: without and with the clean-teacher cache (steady state: every row filled), with
    ``train.compile`` (compile time reported separately) and, with ``--compile-attack``, with
    ``train.compile_attack`` on top (each whole PGD iteration one compiled graph). Like the
    trainer, (b) runs the exact tower rewrites of :mod:`mmtard.tower_rewrites` as configured
    (``--patch-embed``, ``--last-block``, ``--attention`` and ``--teacher-attention``, default
    ``auto``: on a GPU): the patch embedding as a matrix product, a last block that computes the
    class token alone, mmtard's short-sequence attention in the student and its
    class-token-apart attention in the teachers; its compiled variants also fuse the attack's update, as
    ``train.compile`` does (``--update-ab`` times them without).
    They are applied after (a) and the fp32 loss check, which keep open_clip's towers as the
    release does.

Printed per variant: images/s, seconds per step, peak memory; the ratio b/a; the FLOP count of
(b) from ``torch.utils.flop_counter.FlopCounterMode`` and the fraction of ``--peak-tflops``.
``--eval`` also times AutoAttack (APGD-CE + APGD-T, 100 iterations, through
:func:`mmtard.autoattack.robust_flags`) on a zero-shot ViT-B-32 with ``--classes`` classes.

    python benchmarks/step_throughput.py                       # ViT-B-32 + 2x ViT-L-14, 224 px
    python benchmarks/step_throughput.py --tiny --device cpu   # seconds, for the test suite

Every result line starts with ``RESULT`` and holds ``key=value`` fields.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from mmtard.config import (ATTENTION_KERNELS, COMPILE_MODES, LAST_BLOCKS, PATCH_EMBEDS,  # noqa: E402  (after the path set-up)
                           TEACHER_ATTENTION)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="mmtard-tiny-vit student, mmtard-small-vit teachers")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--batch", type=int, default=None, help="micro-batch of (b) (default 128; tiny 8)")
    p.add_argument("--ref-batch", type=int, default=None, help="batch of (a) (default 64; tiny 8)")
    p.add_argument("--classes", type=int, default=None, help="zero-shot classes (default 1000; tiny 10)")
    p.add_argument("--image-size", type=int, default=None, help="input pixels (default 224; tiny 48)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 10; tiny 2)")
    p.add_argument("--ref-steps", type=int, default=None, help="timed steps of (a) (default 3; tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per variant (default 2; tiny 1)")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--recipe", default="release", choices=["release", "paper"], help="mmt_ard recipe of (b)")
    p.add_argument("--precision", default="auto", help="train.precision of (b): auto (bf16 on GPU), bf16, fp32")
    p.add_argument("--compile", default="off", choices=["off", "on", "both"],
                   help="(b) with train.compile: off, on (compiled variants only), both")
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help="torch.compile mode of the compiled variants, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--update-ab", action="store_true",
                   help="after the compiled variants, time the cached step again with the attack's update in "
                        "eager mode (train.compile fuses it into one kernel)")
    p.add_argument("--compile-attack", action="store_true",
                   help="after the compiled variants, also compile each whole PGD iteration (train.compile_attack)")
    p.add_argument("--repeat", type=int, default=0,
                   help="time the last configuration's cached step this many more times (spread)")
    p.add_argument("--profile", nargs="?", type=int, const=25, default=0, metavar="ROWS",
                   help="print torch.profiler's top ROWS operators (default 25) for one steady step of the last "
                        "(b) variant")
    p.add_argument("--patch-embed", default="auto", choices=PATCH_EMBEDS,
                   help="train.patch_embed of (b): auto = matmul on a GPU (the reference keeps the convolution)")
    p.add_argument("--last-block", default="auto", choices=LAST_BLOCKS,
                   help="train.last_block of (b): auto = class token alone on a GPU (the reference keeps "
                        "open_clip's full block)")
    p.add_argument("--teacher-attention", default="auto", choices=TEACHER_ATTENTION,
                   help="train.teacher_attention of (b): split = mmtard's kernel with the class token apart in the "
                        "frozen teachers; auto = split on a GPU; torch keeps --attention's choice there")
    p.add_argument("--attention", default="auto", choices=ATTENTION_KERNELS,
                   help="train.attention of (b): auto (short on a GPU), torch's choice, mmtard's short-sequence "
                        "kernel or one of torch's (see attention_kernels.py)")
    p.add_argument("--no-reference", action="store_true", help="skip (a)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager variants of (b)")
    p.add_argument("--check", action="store_true", help="compare the step's loss: fp32 vs bf16 (vs compiled)")
    p.add_argument("--compile-breakdown", action="store_true", help="also time the parts of the compiled step")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="peak bf16 TFLOP/s for the fraction")
    p.add_argument("--eval", action="store_true", help="also time AutoAttack")
    p.add_argument("--eval-n", type=int, default=None, help="images attacked (default 64; tiny 4)")
    p.add_argument("--eval-iterations", type=int, default=None, help="APGD iterations (default 100; tiny 2)")
    p.add_argument("--eval-eps", default="2/255")
    p.add_argument("--eval-only", action="store_true", help="only the AutoAttack timing")
    return p.parse_args(argv)


def defaults(args):
    tiny = args.tiny
    pick = lambda value, full, small: value if value is not None else (small if tiny else full)  # noqa: E731
    args.batch = pick(args.batch, 128, 8)
    args.ref_batch = pick(args.ref_batch, 64, 8)
    args.classes = pick(args.classes, 1000, 10)
    args.image_size = pick(args.image_size, 224, 48)
    args.steps = pick(args.steps, 10, 2)
    args.ref_steps = pick(args.ref_steps, 3, 1)
    args.warmup = pick(args.warmup, 2, 1)
    args.eval_n = pick(args.eval_n, 64, 4)
    args.eval_iterations = pick(args.eval_iterations, 100, 2)
    # QuickGELU, as the paper's models have: OpenAI's weights (the student's start, the teachers'
    # base) were trained with it, and mmtard builds them with it (models.tag_uses_quick_gelu).
    args.student = "mmtard-tiny-vit" if tiny else "ViT-B-32-quickgelu"
    args.teacher = "mmtard-small-vit" if tiny else "ViT-L-14-quickgelu"
    return args


def emit(name: str, **fields) -> None:
    text = " ".join(f"{k}={_fmt(v)}" for k, v in fields.items())
    print(f"RESULT {name} {text}", flush=True)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.device.type == "cuda":
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return "n/a"

    def run(self, fn, warmup: int, steps: int) -> dict:
        """Times ``fn`` after ``warmup`` calls; the first warm-up call is timed apart (it holds
        compilation, autotuning and allocator growth)."""
        self.reset_peak()
        first = None
        for i in range(warmup):
            t0 = time.perf_counter()
            fn()
            self.sync()
            if i == 0:
                first = time.perf_counter() - t0
        self.sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        self.sync()
        per_step = (time.perf_counter() - t0) / max(steps, 1)
        return {"s_per_step": per_step, "first_step_s": first, "peak_mem_GiB": self.peak_gib()}


# ---------------------------------------------------------------------------------------------- set-up
def write_image_folder(root: Path, classes: int, per_class: int) -> None:
    """A class-per-folder set of small PNGs: the trainer needs a dataset for its class names and
    size checks; the timed steps get their batches directly on the device."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class{k:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{j}.png")


def build_trainer(args, workdir: Path, compile_: bool):
    from mmtard.config import (AttackConfig, Config, DataConfig, MethodConfig, ModelConfig, TeacherConfig,
                               TrainConfig, validate)
    from mmtard.trainer import Trainer

    pool = 4  # distinct batches cycled through (and cached)
    data_root = workdir / "data"
    if not data_root.exists():
        per_class = max(1, -(-args.batch * pool // args.classes))
        write_image_folder(data_root, args.classes, per_class)
    config = Config(
        student=ModelConfig(args.student, None),
        teachers=[TeacherConfig(args.teacher, None, role="clean"), TeacherConfig(args.teacher, None, role="robust")],
        data=DataConfig(source="imagefolder", root=str(data_root), image_size=args.image_size),
        attack=AttackConfig(steps=args.pgd_steps),
        method=MethodConfig(name="mmt_ard", recipe=args.recipe,
                            confidence="cosine" if args.recipe == "release" else "probability"),
        train=TrainConfig(steps=10**6, global_batch=args.batch, device=str(args.device), precision=args.precision,
                          log_every=10**6, ckpt_every=10**6, clean_teacher_cache=True, compile=compile_,
                          # open_clip's towers for the reference; main() rewrites them per
                          # --patch-embed, --last-block, --attention (short, auto on a GPU) and
                          # --teacher-attention
                          patch_embed="conv", last_block="full", teacher_attention="torch",
                          attention="torch" if args.attention in ("auto", "short") else args.attention),
    )
    validate(config)
    run_dir = workdir / ("run-compiled" if compile_ else "run")
    trainer = Trainer(config, run_dir, force=True, show_progress=False)
    trainer.method.train()
    return trainer


def synthetic_batches(args, device, n_samples: int, pool: int = 4):
    g = torch.Generator(device="cpu").manual_seed(0)
    batches = []
    for i in range(pool):
        images = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
        labels = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
        indices = (torch.arange(args.batch) + i * args.batch) % n_samples
        batches.append((images, labels, indices))
    return batches


# ---------------------------------------------------------------------------------------------- (a)
def reference_step_fn(student, clean_t, robust_t, orig_t, args, device):
    """The release's step as written, in fp32: returns a closure doing one step on a fixed batch.

    The attack asks for the input gradient only (``torch.autograd.grad``), which is the cheaper
    reading of the release; the third teacher pass is computed and dropped as the release does.
    """
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.rand(args.ref_batch, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.ref_batch,), generator=g).to(device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=1e-4)
    eps, alpha, steps = 2 / 255, 1 / 255, args.pgd_steps

    def logits_and_embed(model, images):
        embed = F.normalize(model.clip.encode_image(model.prepare(images)), dim=-1)
        return 100.0 * embed @ model.text_weights, embed

    def step():
        student.eval()
        with torch.no_grad():
            t_clean_logits, t_clean_embed = logits_and_embed(clean_t, x)
            _unused = logits_and_embed(orig_t, x)  # the release's original-CLIP pass, never used
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        momentum = torch.zeros_like(x)
        p_clean = F.softmax(t_clean_logits, dim=1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            s_logits, _ = logits_and_embed(student, x_adv)
            loss = F.kl_div(F.log_softmax(s_logits, dim=1), p_clean, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            momentum = (0.9 * momentum + grad.sign()).sign()  # the release's (RobustVLM's) momentum rule
            x_adv = x_adv.detach() + alpha * momentum
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
        student.train()
        with torch.no_grad():
            t_rob_logits, t_rob_embed = logits_and_embed(robust_t, x_adv)
        s_adv, _ = logits_and_embed(student, x_adv)
        s_clean, _ = logits_and_embed(student, x)
        kl_r = F.kl_div(F.log_softmax(s_adv, dim=1), F.softmax(t_rob_logits, dim=1), reduction="none")
        kl_c = F.kl_div(F.log_softmax(s_clean, dim=1), p_clean, reduction="none")
        c_r = (t_rob_embed * robust_t.text_weights[:, y].t()).sum(1, keepdim=True)
        c_c = (t_clean_embed * clean_t.text_weights[:, y].t()).sum(1, keepdim=True)
        loss = (50.0 * c_r * kl_r + 5.0 * c_c * kl_c).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


# ---------------------------------------------------------------------------------------------- (b)
def trainer_step_fn(trainer, batches):
    cycle = itertools.cycle(batches)
    bad: dict = {}

    def step():
        trainer._train_step(cycle, bad)

    return step


def count_flops(fn) -> int:
    """FLOPs of one call of ``fn``, counted by torch. nn.MultiheadAttention's no-grad fast path
    (``torch._native_multi_head_attention``, taken by every frozen teacher in eager mode) has no
    FLOP formula, so its projections and attention would count zero: it is switched off while
    counting (the composite path does the same products)."""
    from torch.utils.flop_counter import FlopCounterMode

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return int(counter.get_total_flops())


def time_trainer_variants(args, trainer, timer, batches, label: str, reference_ips: float | None, flops: dict,
                          variants: tuple[str, ...] = ("nocache", "cache")):
    from mmtard.teacher_cache import CleanTeacherCache

    cache = trainer.method.clean_cache
    if not isinstance(cache, CleanTeacherCache):
        raise SystemExit("the trainer built no clean-teacher cache (train.clean_teacher_cache with augment off)")
    fn = trainer_step_fn(trainer, batches)
    results = {}
    try:
        _time_variants(args, trainer, timer, fn, batches, cache, label, reference_ips, flops, variants, results)
    finally:  # a failed variant must not leave the next stage without the cache
        trainer.method.clean_cache = cache
    return results


def _time_variants(args, trainer, timer, fn, batches, cache, label, reference_ips, flops, variants, results):
    for variant in variants:
        use_cache = variant == "cache"
        trainer.method.clean_cache = cache if use_cache else None
        if use_cache:  # fill every row the timed steps will read: steady state
            for _ in range(len(batches)):
                fn()
            timer.sync()
            misses_before = cache.misses
        name = f"mmtard_{label}_{variant}"
        r = timer.run(fn, args.warmup, args.steps)
        if use_cache and cache.misses != misses_before:
            raise SystemExit("the clean-teacher cache missed in steady state")
        ips = args.batch / r["s_per_step"]
        fields = dict(images_per_s=ips, s_per_step=r["s_per_step"], peak_mem_GiB=r["peak_mem_GiB"],
                      batch=args.batch, first_step_s=r["first_step_s"])
        if label.startswith("compiled"):
            # compile time: the first call's excess over a steady step (each variant compiles what
            # it has not seen yet; the first variant holds nearly all of it)
            fields["compile_s"] = max(0.0, r["first_step_s"] - r["s_per_step"])
        if reference_ips:
            fields["ratio_b_over_a"] = ips / reference_ips
        key = variant
        if key in flops:
            fields["gflop_per_image"] = flops[key] / args.batch / 1e9
            fields["tflops_achieved"] = flops[key] / r["s_per_step"] / 1e12
            fields["fraction_of_peak"] = flops[key] / r["s_per_step"] / (args.peak_tflops * 1e12)
        emit(name, **fields)
        results[variant] = ips


def measure_flops(args, trainer, batches, timer) -> dict:
    """FLOPs of one trainer step (b), with and without the cache; eager, counted by torch."""
    cache = trainer.method.clean_cache
    fn = trainer_step_fn(trainer, batches)
    flops = {}
    try:
        for variant, c in (("nocache", None), ("cache", cache)):
            trainer.method.clean_cache = c
            if c is not None:
                for _ in range(len(batches)):
                    fn()
            flops[variant] = count_flops(fn)
            timer.sync()
            emit(f"flops_{variant}", gflop_per_step=flops[variant] / 1e9,
                 gflop_per_image=flops[variant] / args.batch / 1e9,
                 floor_images_per_s_at_peak=args.batch * args.peak_tflops * 1e12 / flops[variant],
                 peak_tflops=args.peak_tflops)
    finally:  # a failure must not leave the next stage without the cache
        trainer.method.clean_cache = cache
    return flops


def time_breakdown(args, trainer, batches, timer, label: str = "eager") -> None:
    """Where a step's time goes: one clean-teacher forward, the 10-step attack, one robust-teacher
    forward on x_adv, and the student update (forward and backward at 2B), each timed alone."""
    from mmtard.methods.distill import attack_targets, distillation_attack, teacher_outputs
    from mmtard.speed import attention_kernel

    method = trainer.method
    images, labels, indices = batches[0]
    cache = method.clean_cache
    method.clean_cache = None
    amp = trainer.amp

    @contextlib.contextmanager
    def ctx():  # as Trainer._train_step runs the method
        with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None), \
                attention_kernel(args.attention):
            yield
    try:
        with ctx():
            targets = attack_targets(method, images, indices)
            adv = distillation_attack(method, targets, images)

        def teacher():
            with ctx():
                attack_targets(method, images, indices)

        def attack():
            with ctx():
                distillation_attack(method, targets, images)

        def robust():
            with ctx():
                teacher_outputs(method, "robust", adv)

        def update():
            with ctx():
                clean, bad = method.student_logits_pair(images, adv)
                loss = clean.float().logsumexp(-1).mean() + bad.float().logsumexp(-1).mean()
            loss.backward()
            trainer.optimizer.zero_grad(set_to_none=True)

        parts = {}
        for name, fn in (("clean_teacher", teacher), ("attack", attack), ("robust_teacher", robust),
                         ("student_update", update)):
            parts[name] = timer.run(fn, args.warmup, args.steps)["s_per_step"]
        emit(f"breakdown_{label}", batch=args.batch, **{f"{k}_s": v for k, v in parts.items()},
             sum_s=sum(parts.values()))
    finally:
        method.clean_cache = cache


@contextlib.contextmanager
def _fixed_batch_loss(trainer, steps: int):
    """The method with PGD ``steps``, no clean-teacher cache and a seeded attack start; settings
    restored afterwards."""
    import dataclasses

    method = trainer.method
    cache, cfg, amp_saved, generator = method.clean_cache, method.attack_cfg, method.autocast_dtype, method.generator
    method.clean_cache = None
    method.attack_cfg = dataclasses.replace(cfg, steps=steps)
    # the attack's random start from the same seed every time (the trainer leaves its own
    # per-micro-batch generator on the method, which would otherwise be used)
    method.generator = torch.Generator(device=trainer.device).manual_seed(5)
    torch.manual_seed(5)  # anything else random in the forward
    try:
        yield method
    finally:
        method.clean_cache, method.attack_cfg, method.autocast_dtype = cache, cfg, amp_saved
        method.generator = generator


def reference_losses(args, trainer, batches, store: dict) -> None:
    """The plain step's losses for :func:`check_losses`: fp32, eager, open_clip's convolution and
    torch's attention kernel (run before any speed switch), with the attack off (PGD steps 0: the
    forward and loss alone) and on; and the trainable weights, so that every later check runs on
    these same weights although the timed steps in between train them."""
    from mmtard.autoattack import strict_fp32

    images, labels, indices = batches[0]
    store["weights"] = [p.detach().clone() for p in trainer.trainable]
    for steps in (0, args.pgd_steps):
        with _fixed_batch_loss(trainer, steps) as method, strict_fp32():  # no TF32 on a GPU either
            method.autocast_dtype = None
            store[steps] = float(method(images, labels, indices)["loss"].detach())


def check_losses(args, trainer, batches, label: str, store: dict) -> None:
    """The fast step keeps the mathematics: the method's loss on one fixed batch, attack noise
    seeded, in bf16 autocast with the speed switches as configured (eager or compiled), against
    :func:`reference_losses`."""
    from mmtard.speed import attention_kernel

    images, labels, indices = batches[0]
    amp = trainer.amp or torch.bfloat16
    with torch.no_grad():
        for p, saved in zip(trainer.trainable, store["weights"]):
            p.copy_(saved)
    fields = {}
    for steps in (0, args.pgd_steps):
        with _fixed_batch_loss(trainer, steps) as method:
            method.autocast_dtype = amp
            with torch.autocast(images.device.type, dtype=amp), attention_kernel(args.attention):
                fast = float(method(images, labels, indices)["loss"].detach())
        ref = store[steps]
        fields[f"loss_fp32_pgd{steps}"] = ref
        fields[f"loss_{label}_bf16_pgd{steps}"] = fast
        fields[f"rel_diff_pgd{steps}"] = abs(fast - ref) / max(abs(ref), 1e-12)
    emit(f"check_{label}", loss_fp32=fields["loss_fp32_pgd0"], **fields)


def profile_step(args, trainer, batches, timer, rows: int = 25) -> None:
    """Where one steady step of (b), as last configured, spends its time, operator by operator:
    the table of ``torch.profiler`` sorted by device time (CUDA) or CPU time, top ``rows``."""
    from torch.profiler import ProfilerActivity, profile

    fn = trainer_step_fn(trainer, batches)
    for _ in range(len(batches)):  # warm: compiled variants and cache rows ready
        fn()
    timer.sync()
    cuda = timer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        timer.sync()
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows), flush=True)
    emit("profile", sort=sort, rows=rows)


def stage(name, fn, *a, **kw):
    """Run one stage; a failure is reported and the next stage still runs."""
    try:
        return fn(*a, **kw)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports and goes on
        import traceback

        traceback.print_exc()
        emit(f"failed_{name}", error=repr(exc)[:300].replace(" ", "_"))
        return None


# ---------------------------------------------------------------------------------------------- eval
def time_autoattack(args, classifier, device, timer) -> None:
    was_training = classifier.training
    classifier.eval()
    try:
        _time_autoattack(args, classifier, device, timer)
    finally:  # the student trains in the stages after this one
        classifier.train(was_training)


def _time_autoattack(args, classifier, device, timer) -> None:
    from mmtard.attacks import parse_eps
    from mmtard.autoattack import AttackSpec, robust_flags

    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.rand(args.eval_n, 3, args.image_size, args.image_size, generator=g).to(device)
    with torch.no_grad():
        y = classifier(x).argmax(1)  # every point starts correct, so every point is attacked
    spec = AttackSpec(name="apgd", iterations=args.eval_iterations)
    eps = parse_eps(args.eval_eps)
    timer.reset_peak()
    timer.sync()
    t0 = time.perf_counter()
    outcome = robust_flags(classifier, x, y, eps, spec, seed=0)
    timer.sync()
    seconds = time.perf_counter() - t0
    emit("autoattack", images_per_s=args.eval_n / seconds, seconds=seconds, n=args.eval_n, classes=args.classes,
         iterations=args.eval_iterations, attacks="apgd-ce+apgd-t", apgd_ce_restarts=spec.restarts, eps=args.eval_eps,
         robust_fraction=float(outcome.robust.float().mean()), peak_mem_GiB=timer.peak_gib(), precision="fp32")


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = defaults(parse_args(argv))
    logging.basicConfig(level=logging.WARNING)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    timer = Timer(device)
    import open_clip

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    emit("setup", device=device.type, gpu=gpu.replace(" ", "_"), torch=torch.__version__,
         open_clip=open_clip.__version__, python=platform.python_version(), cuda=torch.version.cuda,
         student=args.student, teachers=f"2x{args.teacher}", image_size=args.image_size, classes=args.classes,
         batch=args.batch, ref_batch=args.ref_batch, pgd_steps=args.pgd_steps, recipe=args.recipe,
         threads=torch.get_num_threads())

    with tempfile.TemporaryDirectory(prefix="mmtard-bench-") as tmp:
        workdir = Path(tmp)
        os.environ.setdefault("MMTARD_CACHE_DIR", str(workdir / "cache"))
        t0 = time.perf_counter()
        trainer = build_trainer(args, workdir, compile_=False)
        emit("build", seconds=time.perf_counter() - t0, precision=str(trainer.amp or "fp32"),
             n_samples=len(trainer.dataset))
        if args.eval_only:
            time_autoattack(args, trainer.student, device, timer)
            return 0
        batches = synthetic_batches(args, device, len(trainer.dataset))
        reference_ips = None
        if not args.no_reference:
            teachers = trainer.method.teachers
            fn = reference_step_fn(trainer.student, teachers[0], teachers[1], teachers[0], args, device)
            r = timer.run(fn, 1, args.ref_steps)
            reference_ips = args.ref_batch / r["s_per_step"]
            ref_flops = count_flops(fn)
            emit("reference", images_per_s=reference_ips, s_per_step=r["s_per_step"], peak_mem_GiB=r["peak_mem_GiB"],
                 batch=args.ref_batch, precision="fp32", teacher_passes=3,
                 gflop_per_image=ref_flops / args.ref_batch / 1e9)
        fp32_losses: dict = {}
        if args.check:  # before any speed switch: the plain fp32 step, as (a) runs open_clip
            stage("check", reference_losses, args, trainer, batches, fp32_losses)
        if args.eval:  # evaluation builds its models with open_clip's convolution
            stage("autoattack", time_autoattack, args, trainer.student, device, timer)
        from mmtard import tower_rewrites

        # what train.patch_embed, train.last_block, train.attention (auto: on a GPU) and
        # train.teacher_attention do in factory.build_method
        done = tower_rewrites.rewrite_towers(trainer.method, device, args.patch_embed, args.last_block, args.attention,
                                             args.teacher_attention)
        for setting, mode in (("patch_embed", "matmul"), ("last_block", "class_token"), ("attention", "short"),
                              ("teacher_attention", "split")):
            if setting in done:
                emit(setting, mode=mode, towers=done[setting])
        flops = stage("flops", measure_flops, args, trainer, batches, timer) or {}
        summary = {}
        if args.compile in ("off", "both") and not args.no_eager:
            summary["eager"] = stage("eager", time_trainer_variants, args, trainer, timer, batches, "eager",
                                     reference_ips, flops)
            stage("breakdown", time_breakdown, args, trainer, batches, timer)
        if args.check and fp32_losses:
            stage("check", check_losses, args, trainer, batches, "eager", fp32_losses)
        if args.compile in ("on", "both"):
            from mmtard.speed import compile_method, fused_update_iteration, tag_compile_caches

            t0 = time.perf_counter()
            # what train.compile=true (with train.compile_mode) does in factory.build_method
            tag_compile_caches(args.attention)
            compile_method(trainer.method, mode=args.compile_mode)
            trainer.method.attack_iteration = fused_update_iteration()
            emit("compile_wrap", seconds=time.perf_counter() - t0)
            summary["compiled"] = stage("compiled", time_trainer_variants, args, trainer, timer, batches, "compiled",
                                        reference_ips, flops)
            if args.update_ab:  # same towers, same process: the update's fusion alone
                from mmtard.attacks import pgd_iteration

                fused, trainer.method.attack_iteration = trainer.method.attack_iteration, pgd_iteration
                summary["eager_update"] = stage("eager_update", time_trainer_variants, args, trainer, timer, batches,
                                                "compiled_eager_update", reference_ips, flops, variants=("cache",))
                trainer.method.attack_iteration = fused
            if args.check and fp32_losses:
                stage("check", check_losses, args, trainer, batches, "compiled", fp32_losses)
            if args.compile_breakdown:
                stage("breakdown", time_breakdown, args, trainer, batches, timer, "compiled")
            if args.compile_attack:
                from mmtard.speed import compile_attack_iteration

                # what train.compile_attack=true adds in factory.build_method
                trainer.method.attack_iteration = compile_attack_iteration(mode=args.compile_mode)
                summary["compiled_attack"] = stage("compiled_attack", time_trainer_variants, args, trainer, timer,
                                                   batches, "compiled_attack", reference_ips, flops)
                if summary["compiled_attack"] is None and args.compile_mode:
                    # one GPU call is all a session may get: if the CUDA-graph form fails, still
                    # measure the whole-iteration compile without CUDA graphs
                    trainer.method.attack_iteration = compile_attack_iteration(mode=None)
                    summary["compiled_attack"] = stage("compiled_attack", time_trainer_variants, args, trainer,
                                                       timer, batches, "compiled_attack_default", reference_ips, flops)
                if args.check and fp32_losses:
                    stage("check", check_losses, args, trainer, batches, "compiled_attack", fp32_losses)
                if args.compile_breakdown:
                    stage("breakdown", time_breakdown, args, trainer, batches, timer, "compiled_attack")
        for i in range(args.repeat):  # the spread of the last configuration's cached step
            stage("repeat", time_trainer_variants, args, trainer, timer, batches, f"repeat{i + 1}", reference_ips,
                  flops, variants=("cache",))
        if args.profile:
            stage("profile", profile_step, args, trainer, batches, timer, rows=args.profile)
        summary = {k: v for k, v in summary.items() if v}
        print("\nsummary (images/s)", flush=True)
        if reference_ips:
            print(f"  (a) reference fp32, batch {args.ref_batch}: {reference_ips:.1f}")
        for label, res in summary.items():
            for variant, ips in res.items():
                ratio = f"  b/a {ips / reference_ips:.1f}x" if reference_ips else ""
                print(f"  (b) {label:8s} {variant:8s} batch {args.batch}: {ips:.1f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
