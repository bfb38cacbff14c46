#!/usr/bin/env bash
# The user's path on a lent GPU, end to end: the offline world, `mmtard distill` (compiled, every
# GPU default: short and split attention, fused update), killed (SIGKILL) after its second
# checkpoint and resumed by the same command, then `mmtard eval` (AutoAttack) of the student and
# `mmtard report`. From the repo root, with .whl/ carried. Random weights: ViT-B-32-quickgelu
# student, ViT-B-16 teachers (197 tokens, so the split kernel runs in them). Output in
# $OUT/check.txt; each stage's exit status is logged, and the script stops at the first failure.
#
#   bash benchmarks/gpu_trainer_check.sh              # STUDENT=... TEACHER=... STEPS=... COMPILE=... to change
set -u -o pipefail
OUT=${OUT:-/tmp/check-out}
mkdir -p "$OUT"
LOG="$OUT/check.txt"
: >"$LOG"
if [ -d .whl ]; then  # on a lent GPU; without .whl/ (this machine) the installed packages serve
  source benchmarks/device_env.sh "$LOG"
else
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
fi
STUDENT=${STUDENT:-ViT-B-32-quickgelu} TEACHER=${TEACHER:-ViT-B-16} STEPS=${STEPS:-24} COMPILE=${COMPILE:-true}
WORK=${WORK:-/tmp/mmtard-check}
rm -rf "$WORK" && mkdir -p "$WORK"
stage() { echo "== $*" | tee -a "$LOG"; }
check() {  # the exit status of the stage just run; stop at the first failure
  local status=$1
  echo "exit $status" | tee -a "$LOG"
  [ "$status" -eq 0 ] || { echo "FAILED" | tee -a "$LOG"; exit "$status"; }
}
distill=(python3 -m mmtard distill --config configs/paper_vitb32_mmt_ard_release.yaml --out "$WORK/run"
  "student={name: $STUDENT}" "teachers=[{name: $TEACHER, role: clean}, {name: $TEACHER, role: robust}]"
  data.source=world data.root="$WORK/world" data.num_workers=2 train.steps="$STEPS" train.global_batch=32
  train.micro_batch=32 train.log_every=1 train.ckpt_every=4 train.warmup_frac=0 train.compile="$COMPILE")
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"; } | tee -a "$LOG"

stage world
python3 -m mmtard -q world --out "$WORK/world" --size test 2>&1 | tee -a "$LOG"; check $?

stage "distill, killed after its second checkpoint"
# its own process group, so the kill reaches the trainer and its data-loader workers and nothing else
setsid "${distill[@]}" >>"$LOG" 2>&1 &
trainer=$!
while [ ! -e "$WORK/run/checkpoints/step_00000008.pt" ] && kill -0 "$trainer" 2>/dev/null; do sleep 0.1; done
kill -KILL -- "-$trainer" 2>/dev/null; wait "$trainer"
ls "$WORK/run/checkpoints" | tee -a "$LOG"
if [ ! -e "$WORK/run/checkpoints/step_00000008.pt" ]; then
  echo "the run ended before its step-8 checkpoint (its output is above)" | tee -a "$LOG"; check 1
elif [ -e "$WORK/run/student.safetensors" ]; then
  echo "the run finished before the kill reached it (raise STEPS)" | tee -a "$LOG"; check 1
fi

stage "distill, resumed"
"${distill[@]}" 2>&1 | tee -a "$LOG"; check $?
cut -d, -f1-4 "$WORK/run/metrics.csv" | tee -a "$LOG"

stage eval
python3 -m mmtard eval --run "$WORK/run" --dataset world="$WORK/world" --eps 1/255 --iterations 10 \
  --n-samples 64 --out "$WORK/eval" 2>&1 | tee -a "$LOG"; check $?
cp "$WORK/eval/results.json" "$OUT/"

stage report
python3 -m mmtard report "$WORK/eval" "$WORK/run" --out "$WORK/report" 2>&1 | tee -a "$LOG"; check $?
ls "$WORK/report" | tee -a "$LOG"
echo "done" | tee -a "$LOG"
