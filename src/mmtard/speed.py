"""Speed helpers for the training step: ``torch.compile`` of the image towers and attacks that
ask autograd for input gradients only. None of them changes the mathematics.

* :func:`compile_method` compiles, in place (``nn.Module.compile``), the image tower of the
  student, of every teacher and of the reference model. In place means the parameter names, the
  checkpoints and the exported student are exactly those of an uncompiled run. It is switched on
  by ``train.compile`` (see :func:`mmtard.factory.build_method`). The towers are the whole cost of
  a step; the zero-shot head and the losses are small work left in eager mode. Compilation
  happens lazily, at the first call of each (mode, shape, grad) variant: the student compiles
  twice (the attack's eval-mode forward/backward at batch B and the update's train-mode
  forward/backward at 2B), each frozen teacher once (no-grad forward at B). Each model's mean/std
  normalisation moves into its tower's call first, so the compiled graphs fuse it too.
* :func:`fused_update_iteration` (also ``train.compile``) compiles the attack's update after each
  gradient (momentum, sign step, projection): one element-wise kernel for L-inf. Eager, it is
  about ten kernels over image-sized fp32 tensors per PGD iteration, each reading and writing the
  whole batch (77 MB at batch 128 and 224 px); in the H200 profile of the fastest step the eager
  element-wise kernels took at least 4.7 ms of 121 ms of GPU time.
* :func:`compile_attack_iteration` compiles one whole PGD iteration (the student's forward, the
  zero-shot head, the attack loss, the input gradient through ``torch.func.grad``, momentum, sign
  step and projection) as a single graph, switched on by ``train.compile_attack``. Compiling only
  the towers leaves the attack as, per iteration, a compiled forward, a compiled backward and a few
  dozen small eager kernels in between (head, KL, its gradient, the update); with
  ``compile_mode: reduce-overhead`` the whole iteration becomes one CUDA graph instead. On CPU
  it pays; on an H200 it did not (685.5 vs 690.6 images/s: the step is bound by GPU time, not by
  launches), so it is off by default.
* :func:`input_grad_only` freezes a module's parameters while an attack runs. The attack wants the
  gradient with respect to the perturbation only; eager autograd already skips the weight
  gradients then, but a compiled backward (AOTAutograd) computes the gradient of every input that
  required grad when it was traced, weights included. With the parameters frozen the compiled
  backward is the input-gradient half only (half the backward matrix products), and eager mode
  keeps fewer tensors alive. The gradient with respect to the input is the same, bit for bit.

* :func:`attention_kernel` forces one of torch's scaled-dot-product-attention kernels for the
  step (``train.attention``: flash, efficient, cudnn, math). torch chooses by a fixed priority
  (cuDNN's kernel on Hopper), and none of the forced kernels was faster over the step's three
  shapes (``benchmarks/attention_kernels.py``). For the student's 50 tokens mmtard's own kernel
  (``short``, the default ``auto`` on a GPU; :mod:`mmtard.short_attention`, installed by
  :mod:`mmtard.tower_rewrites`) is: 45 us per call against torch's 112 on an H200.

The exact rewrites of the image towers themselves (the patch embedding as a matrix product, a
last block that computes the class token alone) are in :mod:`mmtard.tower_rewrites`.
Channels-last is deliberately not used: in a ViT the only convolution is the patch embedding,
replaced by that matrix product on a GPU, and the transformer blocks work on [B, L, D] tensors
that have no channels-last layout.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Iterator

import torch
from torch import nn

from mmtard.attacks import Iteration, ascent, functional_pgd_iteration, pgd_iteration
from mmtard.errors import ConfigError
from mmtard.tower_rewrites import classifiers, image_towers

log = logging.getLogger(__name__)

#: compiled variants per code object: (train/eval) x (grad/no-grad) x shapes x models sharing the
#: VisionTransformer code (the student and each teacher are separate guard entries)
RECOMPILE_LIMIT = 64


@contextlib.contextmanager
def input_grad_only(module: nn.Module | None) -> Iterator[None]:
    """Within the block, ``module``'s parameters do not require grad; restored afterwards exactly
    as they were (frozen ones stay frozen)."""
    if module is None:
        yield
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


_CPU_ATTENTION_KERNELS = ("auto", "torch", "short", "flash", "math")  # what a CPU has (short: torch's there)
_HALF_ONLY_ATTENTION_KERNELS = ("flash", "cudnn")  # on CUDA: fp16/bf16 only


def check_attention_kernel(name: str, device: torch.device, amp: torch.dtype | None) -> None:
    """Refuse, before any model is built, a kernel the device or precision does not have (torch
    would only say "No available kernel" at the first forward)."""
    if device.type != "cuda" and name not in _CPU_ATTENTION_KERNELS:
        raise ConfigError(f"train.attention: '{name}' needs a CUDA device; on {device.type} use one of "
                          f"{', '.join(_CPU_ATTENTION_KERNELS)}")
    if device.type == "cuda" and amp is None and name in _HALF_ONLY_ATTENTION_KERNELS:
        raise ConfigError(f"train.attention: '{name}' has no fp32 kernel on CUDA; use train.precision bf16 "
                          f"(or auto), or attention auto/torch/short/efficient/math")


def tag_compile_caches(attention: str) -> None:
    """Key torch.compile's on-disk caches by the attention kernel.

    The kernel is a process-wide flag read when a graph is traced; neither dynamo's guards nor the
    AOTAutograd cache key include it, so a graph compiled earlier under another kernel (this
    process, or another one sharing the cache folder) would be reused with that kernel. A tag in
    ``torch.compiler.config.cache_key_tag`` keeps them apart."""
    import torch.compiler.config as compiler_config

    tag = f"mmtard-attention={attention}"
    tags = [t for t in compiler_config.cache_key_tag.split(",") if t and not t.startswith("mmtard-attention=")]
    compiler_config.cache_key_tag = ",".join(tags + [tag])


def attention_kernel(name: str) -> contextlib.AbstractContextManager:
    """Within the block, scaled-dot-product attention runs ``name``'s kernel (``torch``, ``auto``
    and ``short``: torch's choice). Every kernel computes the same attention; only the order of the
    sums differs. The backward runs the kernel the forward chose, so the forward alone needs the
    block."""
    if name in ("auto", "torch", "short"):  # short (auto on a GPU): mmtard's kernel, in the towers (tower_rewrites)
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([backends[name]])


def _raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < limit:
            setattr(dynamo_config, name, limit)


def compile_method(method: nn.Module, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None = False) -> list[nn.Module]:
    """Compile every image tower of ``method`` in place; returns the compiled modules.

    Each classifier's input normalisation moves into its tower first
    (:meth:`mmtard.models.CLIPClassifier.normalise_in_tower`), so the compiled graph starts from
    the [0, 1] images: the subtraction, the division and, in the backward, the division of the
    input gradient become part of the tower's first fused kernel instead of three eager passes
    over the fp32 batch per PGD iteration.

    ``dynamic=False``: the step sees a handful of fixed shapes (micro-batch B for the attack and
    the teachers, 2B for the update), and static shapes give the faster kernels. Compilation is
    lazy; its cost shows up in the first steps (the benchmark reports it separately).
    """
    _raise_recompile_limit()
    for classifier in classifiers(method):
        classifier.normalise_in_tower()
    towers = image_towers(method)
    for tower in towers:
        tower.compile(backend=backend, mode=mode, dynamic=dynamic)
    log.info("torch.compile (%s%s) of %d image towers", backend, f", {mode}" if mode else "", len(towers))
    return towers


def fused_update_iteration(backend: str = "inductor") -> Iteration:
    """:func:`mmtard.attacks.pgd_iteration` with its update (:func:`mmtard.attacks.ascent`)
    compiled into one element-wise kernel: the same operations on the same fp32 tensors.

    No ``mode``: under CUDA graphs (reduce-overhead) the four image-sized inputs would first be
    copied into the graph's static buffers, more memory traffic than the fused kernel itself.
    ``fullgraph=True``: the update is plain tensor arithmetic; a graph break would mean a bug.
    """
    _raise_recompile_limit()
    log.info("torch.compile (%s) of the PGD update", backend)
    fused = torch.compile(ascent, backend=backend, dynamic=False, fullgraph=True)
    return functools.partial(pgd_iteration, update=fused)


def compile_attack_iteration(backend: str = "inductor", mode: str | None = None,
                             dynamic: bool | None = False) -> Iteration:
    """A compiled :func:`mmtard.attacks.functional_pgd_iteration`, for :func:`mmtard.attacks.pgd`.

    ``fullgraph=True``: a graph break inside would silently split the iteration again, which is
    exactly what this is for avoiding; an attack loss that cannot be traced fails loudly at the
    first step instead. Each method's loss closure compiles once (its code object is guarded, the
    tensors it captures are graph inputs), and once more per new batch size (``dynamic=False``).
    The student's parameters must be frozen while it runs (``Method.attack`` does so): the
    gradient ``torch.func.grad`` returns would otherwise stay differentiable with respect to them,
    and the compiled graph would carry a backward it never needs.
    """
    _raise_recompile_limit()
    log.info("torch.compile (%s%s) of the PGD iteration", backend, f", {mode}" if mode else "")
    compiled = torch.compile(functional_pgd_iteration, backend=backend, mode=mode, dynamic=dynamic, fullgraph=True)

    def iteration(loss_fn, x, delta, velocity, cfg, autocast_dtype=None):
        # Under CUDA graphs (reduce-overhead) an iteration's outputs live in the graph's memory
        # pool and the next replay overwrites them, yet they are the next iteration's inputs:
        # torch raises "accessing tensor output of CUDAGraphs that has been overwritten" (seen on
        # an H200). Copies outside the graph (two image-sized tensors, microseconds) break that.
        delta, velocity = compiled(loss_fn, x, delta, velocity, cfg, autocast_dtype)
        return delta.clone(), velocity.clone()

    return iteration
