#!/usr/bin/env bash
# The next lent GPU's measurements for issue 7, as one call of at most 10 minutes (see
# benchmarks/RESULTS.md, "Next GPU session"). From the repo root, with .whl/ carried:
#
#   bash benchmarks/gpu_session.sh            # output in $OUT/<part>/*.txt, each part cut at its own timeout
#
# Parts, in order of what they decide:
#   attention   each attention kernel alone at the step's three shapes, mmtard's short-sequence
#               kernel (train.attention=short) among them: does it beat torch's choice?
#   short       the compiled step (CUDA graphs, cache, defaults) with train.attention=short; loss
#               check, reference, two repeats
#   auto        the same step with torch's attention, same machine: the A/B
#   eval        AutoAttack (APGD-CE with its 5 restarts + APGD-T, 100 iterations) under evaluation's
#               strict fp32, worst case: an eps so small that every image stays robust, so every
#               restart and APGD-T run on all of them
# Since the sixth session the benchmark's models are ViT-B-32-quickgelu and ViT-L-14-quickgelu
# (OpenAI's activation, which mmtard now gives OpenAI-derived models); earlier figures used GELU.
# Not in this call (its compile alone may take minutes): --compile-mode max-autotune.
set -u
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT/attention"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/failed.txt"; exit 1; }
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 60 python3 benchmarks/attention_kernels.py 2>&1 | tee "$OUT/attention/attention.txt"
BENCH_TIMEOUT=200 BENCH_ARGS="--compile on --check --repeat 2 --profile" OUT=$OUT/short \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead --attention short
BENCH_TIMEOUT=140 BENCH_ARGS="--compile on --no-reference --repeat 2" OUT=$OUT/auto \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead --attention auto
BENCH_TIMEOUT=120 BENCH_ARGS="--eval-only --eval-n 32 --eval-eps 0.01/255" OUT=$OUT/eval bash benchmarks/gpu_run.sh
