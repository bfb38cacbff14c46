# Sourced from the repo root by the lent-GPU scripts (gpu_run.sh, gpu_session.sh,
# gpu_trainer_check.sh): installs the wheels carried in .whl/ (see RESULTS.md, "Reproduce") into
# /tmp/site, once per call (a script it starts inherits WHEELS_INSTALLED), and sets the environment
# they share. $1: the log a failed install is reported in; a failed install ends the script.
if [ -z "${WHEELS_INSTALLED:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$1"; exit 1; }
  export WHEELS_INSTALLED=1
fi
export PYTHONPATH=/tmp/site:src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
