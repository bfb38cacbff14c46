"""Attention as plain batched matrix products at the step's shapes, against torch's fused kernels
(issue 7): at 50 tokens the fused kernels run at ~18 TFLOP/s. Times, per shape, forward (+ input
gradient where the step takes one) of: sdpa (torch's choice), the same three products written out
in eager, and those compiled by inductor (with and without its pattern matcher, which may turn
them back into sdpa). Prints RESULT lines; also the largest difference against sdpa's output.

    python benchmarks/attention_matmul.py           # one GPU, bf16
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from attention_kernels import shapes, time_call  # noqa: E402


def written_out(q, k, v):
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)


def call_of(fn, q, k, v, backward):
    grad_out = torch.randn_like(q) if backward else None

    def call():
        out = fn(q, k, v)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad_out)
        return out
    return call


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = 128 if device.type == "cuda" else 2
    import torch._inductor.config as inductor_config
    candidates = {"sdpa": F.scaled_dot_product_attention, "eager_matmul": written_out,
                  "compiled_matmul": torch.compile(written_out, dynamic=False)}
    g = torch.Generator(device="cpu").manual_seed(0)
    total, served = {}, {}
    for shape, b, heads, tokens, dim, backward, calls in shapes(batch):
        q, k, v = (torch.randn(b, heads, tokens, dim, generator=g).to(device, dtype).requires_grad_(backward)
                   for _ in range(3))
        with torch.no_grad():
            ref = F.scaled_dot_product_attention(q, k, v).float()
        flops = 4 * b * heads * tokens * tokens * dim * (3.5 if backward else 1.0)
        runs = dict(candidates)
        for name, fn in list(runs.items()) + [("compiled_matmul_nopattern", None)]:
            if fn is None:
                torch._dynamo.reset()
                inductor_config.pattern_matcher = False
                fn = torch.compile(written_out, dynamic=False)
            try:
                seconds = time_call(call_of(fn, q, k, v, backward), device, warmup=3, iters=50)
                with torch.no_grad():
                    diff = (fn(q, k, v).float() - ref).abs().max().item()
            except Exception as exc:  # noqa: BLE001 - report and go on: one call per session
                print(f"RESULT {shape} impl={name} failed={type(exc).__name__}:{str(exc)[:100]!r}", flush=True)
                continue
            total[name] = total.get(name, 0.0) + calls * seconds
            served[name] = served.get(name, 0) + 1
            print(f"RESULT {shape} impl={name} us_per_call={seconds * 1e6:.1f} tflops={flops / seconds / 1e12:.2f} "
                  f"max_abs_diff_vs_sdpa={diff:.3g} shape={b}x{heads}x{tokens}x{dim} backward={backward}", flush=True)
        inductor_config.pattern_matcher = True
        torch._dynamo.reset()
        candidates["compiled_matmul"] = torch.compile(written_out, dynamic=False)
    whole = {k: t for k, t in total.items() if served[k] == len(shapes(batch))}  # ran at every shape
    for name, seconds in sorted(whole.items(), key=lambda kv: kv[1]):
        print(f"RESULT step_attention impl={name} ms_per_step={seconds * 1e3:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
