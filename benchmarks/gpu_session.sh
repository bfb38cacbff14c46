#!/usr/bin/env bash
# The next lent GPU's measurements for issue 7, as one call of at most 9 minutes (see
# benchmarks/RESULTS.md, "Next GPU session"). From the repo root, with .whl/ carried, on an H100
# if one is lent (the goal is stated for an H100; no H100 has timed the step since the first session):
#
#   bash benchmarks/gpu_session.sh            # output in $OUT/<part>/*.txt, each part cut at its own timeout
#
# Parts, in order of what they decide:
#   kernels  the attention kernels alone (attention_kernels.py, 25 calls each): is the split kernel
#            (train.teacher_attention: split) correct on the GPU (max_abs_diff) and faster than
#            torch's 231 us per teacher call?
#   step     the compiled step with every default (short attention with its backward at 4 warps,
#            fused update, normalisation inside the compiled towers), reference in the same
#            process, loss check, the update's A/B on the same compiled towers, two repeats, a
#            profile: the figure against the goal
#   split    the same step with --teacher-attention split, loss check, one repeat (no reference):
#            does the split kernel pay in the step, same machine?
set -u
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT/kernels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/failed.txt"; exit 1; }
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 90 python3 benchmarks/attention_kernels.py --iters 25 2>&1 | tee "$OUT/kernels/kernels.txt"
BENCH_TIMEOUT=300 BENCH_ARGS="--compile on --check --update-ab --repeat 2 --profile 45" OUT=$OUT/step \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead
BENCH_TIMEOUT=150 BENCH_ARGS="--compile on --check --no-reference --repeat 1" OUT=$OUT/split \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead --teacher-attention split
