#!/usr/bin/env bash
# The fifth session's lent-GPU measurements for issue 7, as one call of at most 10 minutes (see
# benchmarks/RESULTS.md). From the repo root, with .whl/ carried:
#
#   bash benchmarks/gpu_session.sh            # output in $OUT/<part>/*.txt, each part cut at its own timeout
#
# Parts, in order of what they decide:
#   attention   which attention kernel costs the step least at its three shapes (seconds)
#   step        the compiled step (CUDA graphs, cache, patch embedding as a matrix product) with
#               the class-token last block; loss check, reference, two repeats
#   step-full   the same with open_clip's full last block, same machine: the class-token A/B
#   step-attn   class-token step with the attention part's fastest kernel (skipped if it is auto)
#   eval        AutoAttack (APGD-CE + APGD-T, 100 iterations) under evaluation's strict fp32
set -u
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT/attention"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/failed.txt"; exit 1; }
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 40 python3 benchmarks/attention_kernels.py 2>&1 | tee "$OUT/attention/attention.txt"
KERNEL=$(sed -n 's/^RESULT best kernel=\([a-z]*\).*/\1/p' "$OUT/attention/attention.txt")
BENCH_TIMEOUT=190 BENCH_ARGS="--compile on --check --repeat 2 --profile" OUT=$OUT/step \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead --last-block class_token
BENCH_TIMEOUT=125 BENCH_ARGS="--compile on --no-reference --repeat 2" OUT=$OUT/step-full \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead --last-block full
if [ -n "$KERNEL" ] && [ "$KERNEL" != auto ]; then
  BENCH_TIMEOUT=120 BENCH_ARGS="--compile on --no-reference --check" OUT=$OUT/step-attn \
    bash benchmarks/gpu_run.sh --compile-mode reduce-overhead --last-block class_token --attention "$KERNEL"
fi
BENCH_TIMEOUT=70 BENCH_ARGS="--eval-only --eval-n 32" OUT=$OUT/eval bash benchmarks/gpu_run.sh
