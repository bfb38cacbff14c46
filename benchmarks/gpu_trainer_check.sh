#!/usr/bin/env bash
# The user's path on a lent GPU, end to end: the offline world, `mmtard distill` (compiled, every
# GPU default: short and split attention, fused update), killed mid-run and resumed from its last
# checkpoint, then `mmtard eval` (AutoAttack) of the student and `mmtard report`. From the repo
# root, with .whl/ carried. Random weights: ViT-B-32-quickgelu student, ViT-B-16 teachers (197
# tokens, so the split kernel runs in them). Output in $OUT/check.txt.
#
#   bash benchmarks/gpu_trainer_check.sh              # STUDENT=... TEACHER=... STEPS=... to change
set -u
OUT=${OUT:-/tmp/check-out}
mkdir -p "$OUT"
LOG="$OUT/check.txt"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee "$LOG"; exit 1; }
  export PYTHONPATH=/tmp/site:src
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
STUDENT=${STUDENT:-ViT-B-32-quickgelu} TEACHER=${TEACHER:-ViT-B-16} STEPS=${STEPS:-12}
WORK=${WORK:-/tmp/mmtard-check}
rm -rf "$WORK" && mkdir -p "$WORK"
step() { echo "== $*" | tee -a "$LOG"; }
run_distill() {  # a seed-fixed 'mmt_ard' release run on the world; extra arguments are overrides
  python3 -m mmtard distill --config configs/paper_vitb32_mmt_ard_release.yaml --out "$WORK/run" \
    "student={name: $STUDENT}" "teachers=[{name: $TEACHER, role: clean}, {name: $TEACHER, role: robust}]" \
    data.source=world data.root="$WORK/world" data.num_workers=2 train.steps="$STEPS" train.global_batch=32 \
    train.micro_batch=32 train.log_every=1 train.ckpt_every=4 train.warmup_frac=0 "$@" 2>&1 | tee -a "$LOG"
}
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"; } | tee -a "$LOG"
step world && python3 -m mmtard -q world --out "$WORK/world" --size test 2>&1 | tee -a "$LOG"
# killed once the checkpoint of step 8 exists (the run goes on to STEPS), then resumed
step "distill, killed after its second checkpoint"
run_distill train.compile="${COMPILE:-true}" &
while [ ! -e "$WORK/run/checkpoints/step_00000008.pt" ] && kill -0 $! 2>/dev/null; do sleep 1; done
pkill -KILL -f "mmtard distill" ; wait
ls "$WORK/run/checkpoints" | tee -a "$LOG"
step "distill, resumed"
run_distill train.compile="${COMPILE:-true}"
echo "exit ${PIPESTATUS[0]}" | tee -a "$LOG"
cut -d, -f1-4 "$WORK/run/metrics.csv" | tee -a "$LOG"
step "eval"
python3 -m mmtard eval --run "$WORK/run" --dataset world="$WORK/world" --eps 1/255 --iterations 10 \
  --n-samples 64 --out "$WORK/eval" 2>&1 | tee -a "$LOG"
step "report"
python3 -m mmtard report "$WORK/eval" --out "$WORK/report" 2>&1 | tee -a "$LOG"
ls "$WORK/report" | tee -a "$LOG"
cp "$WORK/eval/results.json" "$OUT/" 2>/dev/null
echo "done" | tee -a "$LOG"
