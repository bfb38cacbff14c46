#!/usr/bin/env bash
# One lent GPU's measurements for issue 7, as one call of at most 9 minutes (see
# benchmarks/RESULTS.md, "Next GPU session"). From the repo root, with .whl/ carried; the goal is
# stated for an H100, so name nvidia-h100-x1 where one is lent:
#
#   bash benchmarks/gpu_session.sh            # output in $OUT/<part>/*.txt, each part cut at its own timeout
#
# Parts, in order of what they decide:
#   kernels  the attention kernels alone (attention_kernels.py, 25 calls each): microseconds per
#            call of torch's kernels, the short kernel (student) and the split kernel (teachers),
#            and their largest difference from torch's attention on this GPU
#   step     the compiled step with every default (short attention in the student, split
#            attention in the teachers, fused update, normalisation inside the compiled towers),
#            reference in the same process, loss check, the update's A/B on the same compiled
#            towers, two repeats, a profile: the figure against the goal
#   torch    the same step with --teacher-attention torch, one repeat (no reference): what the
#            split kernel is worth in the step, same machine
set -u
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT/kernels"
source benchmarks/device_env.sh "$OUT/failed.txt"  # once: the gpu_run.sh parts below reuse it
timeout 90 python3 benchmarks/attention_kernels.py --iters 25 2>&1 | tee "$OUT/kernels/kernels.txt"
BENCH_TIMEOUT=300 BENCH_ARGS="--compile on --check --update-ab --repeat 2 --profile 45" OUT=$OUT/step \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead
BENCH_TIMEOUT=150 BENCH_ARGS="--compile on --no-reference --repeat 1" OUT=$OUT/torch \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead --teacher-attention torch
