"""The PGD update after each gradient, eager against fused into one kernel (issue 7).

``mmtard.attacks.ascent`` (momentum on the sign of the gradient, sign step, projection onto the
eps ball and onto [0, 1]) is about ten element-wise operations over image-sized fp32 tensors,
each a kernel that reads and writes the whole batch: 77 MB at batch 128 and 224 px, ten times
per training step. ``train.compile`` runs it compiled instead
(``mmtard.speed.fused_update_iteration``). This times both forms alone, with synchronisation,
and checks that they give the same tensors (L-inf: bit for bit; L2 sums a norm in another order).

    python benchmarks/attack_update.py                 # one GPU (or a CPU), batch 128, 224 px
    python benchmarks/attack_update.py --tiny          # seconds, also in the test suite

Every result line starts with ``RESULT`` and holds ``key=value`` fields.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from attention_kernels import bench_device, time_call  # this folder
from mmtard.attacks import PGDConfig, ascent
from mmtard.speed import fused_update_iteration


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="batch 2 at 32 px, few calls (the test suite's run)")
    p.add_argument("--batch", type=int, default=None, help="images (default 128)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per form (default 50)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the fused form")
    args = p.parse_args(argv)
    device = bench_device(args.device)
    batch = args.batch or (2 if args.tiny else 128)
    size = 32 if args.tiny else 224
    iters = args.iters or (2 if args.tiny else 50)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"RESULT setup device={name.replace(' ', '_')} torch={torch.__version__} batch={batch} size={size} "
          f"iters={iters} backend={args.backend}", flush=True)
    fused = fused_update_iteration(backend=args.backend).keywords["update"]
    g = torch.Generator(device="cpu").manual_seed(0)
    for cfg in (PGDConfig(eps=2 / 255, step_size=1 / 255, momentum=0.9),
                PGDConfig(eps=0.5, step_size=0.1, momentum=0.9, norm="l2")):
        x = torch.rand(batch, 3, size, size, generator=g).to(device)
        delta = ((torch.rand(x.shape, generator=g) - 0.5) * 2 * cfg.eps).to(device)
        velocity = torch.randn(x.shape, generator=g).sign().to(device)
        grad = torch.randn(x.shape, generator=g).to(device)
        start = time.perf_counter()
        got = fused(delta, velocity, grad, x, cfg)
        compile_s = time.perf_counter() - start
        expected = ascent(delta, velocity, grad, x, cfg)
        diff = max((a - b).abs().max().item() for a, b in zip(got, expected))
        eager_s = time_call(lambda: ascent(delta, velocity, grad, x, cfg), device, 3, iters)
        fused_s = time_call(lambda: fused(delta, velocity, grad, x, cfg), device, 3, iters)
        print(f"RESULT update norm={cfg.norm} eager_ms={eager_s * 1e3:.3f} fused_ms={fused_s * 1e3:.3f} "
              f"speedup={eager_s / fused_s:.2f} per_step_saved_ms={10 * (eager_s - fused_s) * 1e3:.2f} "
              f"max_abs_diff={diff:.3g} compile_s={compile_s:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
