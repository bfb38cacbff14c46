#!/usr/bin/env bash
# The device run behind benchmarks/RESULTS.md: one call on a lent GPU machine, from the repo root,
# with the wheels of the packages its image lacks carried in .whl/ (see RESULTS.md for the list).
# BENCH_ARGS replaces the default arguments (--compile both --eval --check); the script's own
# arguments are appended. Everything goes to $OUT/bench.txt as it is printed, so a run cut short still returns its lines.
set -u
OUT=${OUT:-/tmp/bench-out}
mkdir -p "$OUT"
LOG="$OUT/bench.txt"
source benchmarks/device_env.sh "$LOG"
export TORCH_LOGS=graph_breaks,recompiles
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import sys, torch, triton, open_clip, timm, pyautoattack; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'triton', triton.__version__, 'open_clip', open_clip.__version__, 'timm', timm.__version__)"
  nproc
} 2>&1 | tee "$LOG"
timeout "${BENCH_TIMEOUT:-390}" python3 benchmarks/step_throughput.py ${BENCH_ARGS---compile both --eval --check} "$@" 2>&1 | tee -a "$LOG"
echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
