"""Long-run hygiene: memory stays flat over 500 steps, old checkpoints are pruned, and the run
folder says which versions produced it.

The run happens in a fresh interpreter, so that the peak resident memory it reports belongs to
this run alone and not to whatever the test session did before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from test_trainer import TEACHERS

STEPS = 500

# Peak (VmHWM) and current (VmRSS) resident memory after each checkpoint, i.e. every 100 steps.
_CHILD = textwrap.dedent('''
    import json, sys

    import torch

    from mmtard.config import load_config
    from mmtard.trainer import Trainer

    def _memory_kib():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return {key: int(fields[key].split()[0]) for key in ("VmHWM", "VmRSS")}

    samples = {}
    save = Trainer._save_checkpoint

    def save_and_measure(self):
        save(self)
        samples[self.step] = _memory_kib()

    Trainer._save_checkpoint = save_and_measure
    torch.set_num_threads(1)
    Trainer(load_config(None, json.loads(sys.argv[1])), sys.argv[2], show_progress=False).train()
    print(json.dumps(samples))
''')


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc (Linux)")
def test_memory_stays_flat_over_500_steps_and_checkpoints_are_pruned(world_dir, tmp_path):
    overrides = [TEACHERS] + [f"{k}={v}" for k, v in {
        "data.root": world_dir, "method.name": "mmt_ard", "train.steps": STEPS, "train.global_batch": 4,
        "train.micro_batch": 4, "attack.steps": 1, "train.log_every": 50, "train.ckpt_every": 100,
        "train.keep_checkpoints": 2, "train.lr": 1e-4, "train.precision": "fp32", "train.device": "cpu",
    }.items()]
    run = tmp_path / "run"
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(overrides), str(run)],
                           env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    assert child.returncode == 0, child.stderr
    samples = {int(k): v for k, v in json.loads(child.stdout.strip().splitlines()[-1]).items()}
    assert sorted(samples) == [100, 200, 300, 400, 500]
    peak_100, peak_500 = samples[100]["VmHWM"], samples[500]["VmHWM"]
    growth = (peak_500 - peak_100) / peak_100
    print(f"{STEPS} steps in {seconds:.0f} s; peak RSS {peak_100 / 1024:.1f} MiB at step 100, "
          f"{peak_500 / 1024:.1f} MiB at step 500 ({growth:+.2%}); RSS by step: "
          + ", ".join(f"{s}: {v['VmRSS'] / 1024:.1f}" for s, v in sorted(samples.items())))
    assert growth < 0.05, f"peak RSS grew {growth:.1%} between steps 100 and 500: {samples}"

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000400.pt", "step_00000500.pt"]
    info = json.loads((run / "run.json").read_text())
    import open_clip
    import torch

    import mmtard

    assert (info["mmtard"], info["torch"], info["open_clip"]) == (mmtard.__version__, torch.__version__,
                                                                   open_clip.__version__)
    assert "git_commit" in info
