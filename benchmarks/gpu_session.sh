#!/usr/bin/env bash
# The next lent GPU's measurements for issue 7, as one call of at most 10 minutes (see
# benchmarks/RESULTS.md, "Next GPU session"). From the repo root, with .whl/ carried:
#
#   bash benchmarks/gpu_session.sh            # output in $OUT/<part>/bench.txt, each part cut at its own timeout
#
# Parts, in order:
#   eval          AutoAttack (APGD-CE + APGD-T, 100 iterations) under evaluation's strict fp32, worst
#                 case: an eps so small that every image stays robust, so APGD-T runs on all of them
#                 (the time per iteration does not depend on eps)
#   autotune      the compiled step with inductor's max-autotune (Triton GEMM templates, which can
#                 take GELU as an epilogue; CUDA graphs as reduce-overhead), loss check; compare with
#                 the fifth session's 856 images/s (reduce-overhead, same defaults), a fresh machine
#                 of the same kind, so treat a difference under ~3 % as noise
# (The fifth session's call, which measured the class-token last block and the attention kernels,
# is in git history: git log -p benchmarks/gpu_session.sh.)
set -u
OUT=${OUT:-/tmp/bench-out}
BENCH_TIMEOUT=100 BENCH_ARGS="--eval-only --eval-n 32 --eval-eps 0.01/255" OUT=$OUT/eval bash benchmarks/gpu_run.sh
BENCH_TIMEOUT=420 BENCH_ARGS="--compile on --no-reference --check --repeat 2" OUT=$OUT/autotune \
  bash benchmarks/gpu_run.sh --compile-mode max-autotune
