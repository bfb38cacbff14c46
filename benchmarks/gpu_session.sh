#!/usr/bin/env bash
# The next lent GPU's measurements for issue 7, as one call of at most 9 minutes (see
# benchmarks/RESULTS.md, "Next GPU session"). From the repo root, with .whl/ carried, on an H100
# if one is lent (the goal is stated for an H100; no H100 has timed the step since the first session):
#
#   bash benchmarks/gpu_session.sh            # output in $OUT/<part>/*.txt, each part cut at its own timeout
#
# Parts, in order of what they decide:
#   update   the PGD update alone, eager against fused into one kernel (train.compile fuses it
#            since the eighth session): does it save the ~3 ms per step the kernel count suggests?
#   step     the compiled step with every default (short attention with its backward at 4 warps,
#            fused update), reference in the same process, loss check, the update's A/B on the
#            same compiled towers, two repeats, a profile: the figure against the goal
#   torch    the loss check with torch's attention (no reference, no repeats): the eighth
#            session's compiled bf16 loss differed from fp32 by 0.018 with the short kernel and
#            QuickGELU, against 0.0056 in the fifth (GELU, torch's attention); which one moved it?
set -u
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT/update"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed" | tee "$OUT/failed.txt"; exit 1; }
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 60 python3 benchmarks/attack_update.py 2>&1 | tee "$OUT/update/update.txt"
BENCH_TIMEOUT=300 BENCH_ARGS="--compile on --check --update-ab --repeat 2 --profile 45" OUT=$OUT/step \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead
BENCH_TIMEOUT=150 BENCH_ARGS="--compile on --check --no-reference" OUT=$OUT/torch \
  bash benchmarks/gpu_run.sh --compile-mode reduce-overhead --attention torch
