"""`mmtard demo --quick` end to end, as a new user runs it."""

from __future__ import annotations

import json

import pytest
import torch

from mmtard.cli import main
from mmtard.demo import STUDENTS

ADVERSARIAL_STUDENTS = [row for row in STUDENTS]
ROWS = ["undefended", "clean_teacher", "robust_teacher", *STUDENTS]


def _robust_total(row: dict) -> float:
    return sum(v for d in row["datasets"].values() for v in d["robust"].values())


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    import torch

    out = tmp_path_factory.mktemp("demo") / "demo"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as a user's run: the demo is the one test big enough to gain from it
    try:
        assert main(["-q", "demo", "--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_quick_demo_results(quick_demo):
    from mmtard.results import validate_results

    results = json.loads((quick_demo / "results.json").read_text())
    validate_results(results)
    models = results["models"]
    for row in ROWS:
        assert row in models, row
        for name, data in models[row]["datasets"].items():
            assert set(data["robust"]) == {"4/255", "8/255"}
            for eps, value in data["robust"].items():
                assert value <= data["clean"], (row, name, eps)
    undefended = _robust_total(models["undefended"])
    for row in ADVERSARIAL_STUDENTS:
        assert _robust_total(models[row]) > undefended, row
    assert results["efficiency"], "efficiency points of mmt_ard_paper and ard"
    report = (quick_demo / "report.md").read_text()
    assert "not ImageNet results" in report and "Ablation" in report
    assert (quick_demo / "efficiency.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_demo_reuses_finished_stages_and_replays_a_stage(quick_demo, tmp_path, monkeypatch):
    before = (quick_demo / "runs" / "ard" / "student.safetensors").stat().st_mtime_ns
    # a row an earlier run with more --seeds left in the evaluation record: kept there, not reported
    record = quick_demo / "eval" / "results.json"
    stale = json.loads(record.read_text())
    stale["models"]["ard-seed7"] = stale["models"]["ard"]
    record.write_text(json.dumps(stale))
    monkeypatch.chdir(quick_demo.parent)  # started with an absolute --out, resumed with a relative one
    assert main(["-q", "demo", "--quick", "--out", quick_demo.name]) == 0
    assert (quick_demo / "runs" / "ard" / "student.safetensors").stat().st_mtime_ns == before
    assert "ard-seed7" in json.loads(record.read_text())["models"]
    assert "ard-seed7" not in json.loads((quick_demo / "results.json").read_text())["models"]
    assert "ard-seed7" not in (quick_demo / "report.md").read_text()
    config = quick_demo / "configs" / "mmt_ard_paper.yaml"
    assert main(["-q", "distill", "--config", str(config), "--out", str(tmp_path / "replay"), "train.steps=2"]) == 0
    assert (tmp_path / "replay" / "student.safetensors").exists()


def test_demo_refuses_a_folder_from_another_command(tmp_path, capsys):
    (tmp_path / "other.txt").write_text("not a demo")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_demo_names_a_damaged_marker(tmp_path, capsys):
    for damaged in ('{"plan": ', "[]"):  # cut off mid-write by an older version; not an object
        (tmp_path / "demo.json").write_text(damaged)
        assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
        assert "demo.json is damaged" in capsys.readouterr().err


def test_a_demo_of_an_older_model_forward_is_not_reused(tmp_path, capsys):
    from dataclasses import asdict

    from mmtard.demo import QUICK

    older = {k: v for k, v in asdict(QUICK).items() if k != "eval_restarts"}  # as written before the field
    (tmp_path / "demo.json").write_text(json.dumps({"plan": older, "seeds": 1}))  # and without "forward"
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "made by an older mmtard" in capsys.readouterr().err
    (tmp_path / "demo.json").write_text(json.dumps({"plan": older, "seeds": 1, "forward": 2}))
    assert main(["demo", "--out", str(tmp_path)]) == 2
    message = capsys.readouterr().err
    assert "another plan (world_size: quick there, demo here" in message and "eval_restarts: None there" in message


def test_pretraining_refuses_fewer_pairs_than_one_batch(tmp_path):
    from mmtard.errors import DataError
    from mmtard.pretrain import PretrainConfig, pretrain_clip

    pairs = [(torch.rand(3, 32, 32), "a red circle", i) for i in range(3)]
    with pytest.raises(DataError, match="3 image-caption pairs, fewer than one batch of 8"):
        pretrain_clip(pairs, PretrainConfig("mmtard-tiny-vit", steps=2, batch_size=8), tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_quiet_reaches_the_demos_progress_bars(tmp_path, monkeypatch):
    import mmtard.demo

    seen = {}
    monkeypatch.setattr(mmtard.demo, "run_demo", lambda out, **kwargs: seen.update(kwargs))
    assert main(["-q", "demo", "--quick", "--out", str(tmp_path / "d")]) == 0
    assert seen["show_progress"] is False
    assert main(["demo", "--quick", "--out", str(tmp_path / "d")]) == 0
    assert seen["show_progress"] is True
