"""Which scaled-dot-product-attention kernel is fastest at the training step's shapes (issue 7).

torch picks its attention kernel by a fixed priority (cuDNN's on Hopper). The step's attention
is unusual: the student (ViT-B-32 at 224 px) has 50 tokens, far shorter than the sequences those
kernels are tuned for, and in the H200 profile its attention ran at about 18 TFLOP/s forward and
39 backward (cuDNN's kernel). This times
each kernel ``train.attention`` can force, alone, at the step's three shapes:

* ``student``: ViT-B-32 in the attack, batch B, 12 heads, 50 tokens: forward and input gradient
  (10 per step);
* ``update``: the same at batch 2B (clean and adversarial images), forward and backward (1);
* ``teacher``: ViT-L-14, batch B, 16 heads, 257 tokens: forward only (1 per step, no grad).

``split`` is mmtard's forward-only kernel with the class token apart (``train.teacher_attention:
split``, :mod:`mmtard.split_attention`) at the teacher's shape, and the short kernel (what
``train.attention: auto`` gives the student on a GPU) at the other two.

Per kernel and shape: microseconds per call and TFLOP/s (attention FLOPs: 4 B H L^2 d forward,
2.5 times that for the backward), or why the kernel refused. Use the fastest with
``train.attention`` and confirm with ``step_throughput.py --attention``.

    python benchmarks/attention_kernels.py                    # one GPU, bf16, seconds
    python benchmarks/attention_kernels.py --tiny --device cpu

Every result line starts with ``RESULT`` and holds ``key=value`` fields.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch
import torch.nn.functional as F

from mmtard.config import ATTENTION_KERNELS
from mmtard.speed import attention_kernel


def shapes(batch: int) -> list[tuple[str, int, int, int, int, bool, int]]:
    """(name, batch, heads, tokens, head dim, backward, calls per step) of the step's attention:
    the student's 12 layers in each of 10 PGD iterations and once in the update, the robust
    teacher's 24 layers once."""
    return [("student", batch, 12, 50, 64, True, 10 * 12), ("update", 2 * batch, 12, 50, 64, True, 12),
            ("teacher", batch, 16, 257, 64, False, 24)]


def bench_device(name: str) -> torch.device:
    """``--device``: ``auto`` is the GPU where there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def time_call(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call, after ``warmup`` calls, between device synchronisations."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / max(iters, 1)


def graph_time_call(fn, device: torch.device, warmup: int, iters: int) -> float | None:
    """Seconds per replay of ``fn`` captured as one CUDA graph (what a ``reduce-overhead`` step
    sees: no Python or launch cost per call); None where capture fails or on a CPU."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    return time_call(graph.replay, device, warmup=warmup, iters=iters)


#: mmtard's kernel with other warps per program than short_attention's defaults (forward, backward)
SHORT_VARIANTS = {"short": None, "short-bwd8": (4, 8)}


@contextlib.contextmanager
def short_warps(variant: str):
    """Within the block, the short kernel launches with ``variant``'s warps."""
    from mmtard import short_attention

    saved = short_attention.FORWARD_WARPS, short_attention.BACKWARD_WARPS
    if SHORT_VARIANTS.get(variant):
        short_attention.FORWARD_WARPS, short_attention.BACKWARD_WARPS = SHORT_VARIANTS[variant]
    try:
        yield
    finally:
        short_attention.FORWARD_WARPS, short_attention.BACKWARD_WARPS = saved


def packed(q, k, v) -> torch.Tensor:
    """[B, H, L, D] queries, keys and values as the towers' fused projection [B, L, 3 H D]."""
    batch, heads, tokens, dim = q.shape
    return torch.cat([t.detach().transpose(1, 2).reshape(batch, tokens, heads * dim) for t in (q, k, v)], -1)


def kernel_error(kernel: str, q, k, v, backward: bool) -> str:
    """Largest difference of mmtard's kernel's (``short`` or ``split``) output (and input gradient)
    from torch's attention."""
    from mmtard import short_attention, split_attention

    module = split_attention if kernel == "split" else short_attention
    attend = getattr(module, f"{kernel}_attention")
    heads = q.shape[1]
    qkv = packed(q, k, v).requires_grad_(backward)
    if not module.applies(qkv, heads):
        return "n/a"
    out, ref = attend(qkv, heads), short_attention.reference_attention(qkv, heads)
    text = f"{(out.float() - ref.float()).abs().max().item():.3g}"
    if backward:
        grad_out = torch.randn_like(out)
        (grad,), (ref_grad,) = torch.autograd.grad(out, qkv, grad_out), torch.autograd.grad(ref, qkv, grad_out)
        text += f"/{(grad.float() - ref_grad.float()).abs().max().item():.3g}"
    return text


def attention_call(kernel: str, q, k, v, backward: bool):
    """One call (forward, and the input gradient where the step takes one) of ``kernel``;
    ``short`` runs mmtard's kernel on the fused projection [B, L, 3E] the towers give it, where it
    applies, and torch's choice (as in the towers) where it does not."""
    grad_out = torch.randn_like(q) if backward else None
    if kernel == "split":  # the frozen teacher's gradient-free calls; the student's as train.attention auto
        from mmtard.split_attention import applies, split_attention

        qkv = packed(q, k, v)
        if not backward and applies(qkv, q.shape[1]):
            def split_call():
                split_attention(qkv, q.shape[1])

            split_call.served_by = "split"
            return split_call
        kernel = "short"
    if kernel.startswith("short"):
        from mmtard.short_attention import applies, short_attention

        batch, heads, tokens, dim = q.shape
        qkv = packed(q, k, v)
        if applies(qkv, heads):
            qkv.requires_grad_(backward)
            grad = grad_out.transpose(1, 2).reshape(batch, tokens, heads * dim) if backward else None

            def short_call():
                with short_warps(kernel):
                    out = short_attention(qkv, heads)
                    if backward:
                        torch.autograd.grad(out, qkv, grad)

            short_call.served_by = "short"
            return short_call
        kernel = "torch"

    def call():
        with attention_kernel(kernel):
            out = F.scaled_dot_product_attention(q, k, v)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad_out)

    call.served_by = kernel
    return call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="batch 2, few calls (the test suite's CPU run)")
    p.add_argument("--batch", type=int, default=None, help="the step's micro-batch B (default 128)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per kernel and shape (default 50)")
    args = p.parse_args(argv)
    device = bench_device(args.device)
    batch = args.batch or (2 if args.tiny else 128)
    iters = args.iters or (2 if args.tiny else 50)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"RESULT setup device={name.replace(' ', '_')} torch={torch.__version__} dtype={dtype} batch={batch} "
          f"iters={iters}", flush=True)
    g = torch.Generator(device="cpu").manual_seed(0)
    step_seconds: dict[str, float] = {}
    served: dict[str, int] = {}
    for shape, b, heads, tokens, dim, backward, calls in shapes(batch):
        q, k, v = (torch.randn(b, heads, tokens, dim, generator=g).to(device, dtype).requires_grad_(backward)
                   for _ in range(3))
        flops = 4 * b * heads * tokens * tokens * dim * (3.5 if backward else 1.0)
        kernels = [k for k in ATTENTION_KERNELS if k not in ("auto", "short")] + list(SHORT_VARIANTS) + ["split"]
        for kernel in kernels:
            try:
                fn = attention_call(kernel, q, k, v, backward)
                eager = time_call(fn, device, warmup=3, iters=iters)
                graphed = graph_time_call(fn, device, warmup=3, iters=iters)
            except Exception as exc:  # noqa: BLE001 - a kernel that does not serve this device, dtype or shape, or
                # (short) fails to compile: reported, and the others still timed
                reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120].replace(" ", "_")
                print(f"RESULT {shape} kernel={kernel} refused={reason}", flush=True)
                continue
            seconds = graphed if graphed is not None else eager  # a compiled step replays graphs
            step_seconds[kernel] = step_seconds.get(kernel, 0.0) + calls * seconds
            served[kernel] = served.get(kernel, 0) + 1
            mine = fn.served_by if fn.served_by in ("short", "split") and kernel in ("short", "split") else None
            error = f" max_abs_diff={kernel_error(mine, q, k, v, backward)}" if mine else ""
            print(f"RESULT {shape} kernel={kernel} us_per_call={seconds * 1e6:.1f} eager_us={eager * 1e6:.1f} "
                  f"graph={graphed is not None} tflops={flops / seconds / 1e12:.2f} backward={backward} "
                  f"shape={b}x{heads}x{tokens}x{dim} served_by={fn.served_by}{error}", flush=True)
    # The kernel that costs the step least over all three shapes (one kernel serves the whole step).
    whole = {k: t for k, t in step_seconds.items() if served[k] == len(shapes(batch))}
    for kernel, seconds in sorted(whole.items(), key=lambda kv: kv[1]):
        print(f"RESULT step_attention kernel={kernel} ms_per_step={seconds * 1e3:.2f}", flush=True)
    if whole:
        best = min(whole, key=whole.get)
        print(f"RESULT best kernel={best} ms_per_step={whole[best] * 1e3:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
