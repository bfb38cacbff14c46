#!/usr/bin/env bash
# The next lent GPU's measurements for issue 7, as one call of at most 10 minutes (see
# benchmarks/RESULTS.md, "Next GPU session"). From the repo root, with .whl/ carried:
#
#   bash benchmarks/gpu_session.sh            # output in $OUT/<part>/*.txt, each part cut at its own timeout
#
# Parts, in order of what they decide:
#   attention  which attention kernel is fastest at the step's three shapes (seconds)
#   towers     each tower pass, eager bf16, with and without each exact rewrite (about a minute)
#   step       the compiled step (CUDA graphs, cache), patch embedding as a matrix product (auto)
#              and the class-token last block; with the loss check and the reference
#   step-full  the same with open_clip's full last block, same machine: the class-token A/B
set -u
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT/attention" "$OUT/towers"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/failed.txt"; exit 1; }
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 45 python3 benchmarks/attention_kernels.py 2>&1 | tee "$OUT/attention/attention.txt"
timeout 100 python3 benchmarks/tower_passes.py 2>&1 | tee "$OUT/towers/towers.txt"
BENCH_TIMEOUT=200 BENCH_ARGS="--compile on --check" OUT=$OUT/step \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead --last-block class_token
BENCH_TIMEOUT=140 BENCH_ARGS="--compile on --no-reference" OUT=$OUT/step-full \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead --last-block full
