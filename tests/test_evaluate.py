"""Evaluation: AutoAttack wrapper, run_eval, results.json schema, merging, resume, bad inputs.

Tiny registered models on CPU. One model is trained for a few dozen steps on a generated set whose
classes differ by a faint fixed pattern per class (clearly learnable, yet within reach of an 8/255
attack), so "an undefended model loses nearly all accuracy" is checked on a model that has
accuracy to lose.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from mmtard.autoattack import AttackSpec, robust_flags
from mmtard.data.folders import imagenet_wnids
from mmtard.errors import ConfigError, DataError
from mmtard.eval_sets import DatasetEntry, imagenet_dataset, suite_datasets, suite_image_size, world_datasets
from mmtard.evaluate import ModelEntry, run_eval
from mmtard.models import CLIPClassifier, ModelSpec, create_clip, export_open_clip, train_only_image_tower
from mmtard.results import merge_results, same_evaluation, sanity_checks, validate_results
from mmtard.zeroshot import text_weights

TINY = "mmtard-tiny-vit"
CLASSES = ["alpha", "beta", "gamma", "delta"]
TEMPLATES = ["a photo of a {}."]


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are dominated by threading overhead; on a shared 2-core machine one thread is
    # an order of magnitude faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PatternSet(Dataset):
    """Grey noise images; class k adds a faint fixed +-amplitude pattern. (image, label, i)."""

    def __init__(self, n: int, seed: int, amplitude: float = 0.04, size: int = 32):
        bits = torch.randint(0, 2, (len(CLASSES), 3, size, size), generator=torch.Generator().manual_seed(1))
        patterns = bits * 2.0 - 1
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % len(CLASSES)
        noise = 0.08 * torch.randn(n, 3, size, size, generator=g)
        self.images = (0.5 + amplitude * patterns[self.labels] + noise).clamp(0, 1)
        self.classnames = list(CLASSES)
        self.sample_ids = [f"pattern/{i:04d}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), i


def _entry(n: int = 64, seed: int = 3, name: str = "patterns") -> DatasetEntry:
    return DatasetEntry(name, PatternSet(n, seed), list(CLASSES), list(TEMPLATES))


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory):
    """A tiny CLIP whose image tower learnt PatternSet with plain CE: accurate and not robust."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    clip = create_clip(ModelSpec(TINY))
    model = CLIPClassifier(clip, text_weights(clip, TINY, CLASSES, TEMPLATES))
    train_only_image_tower(clip)
    data = PatternSet(256, seed=2)
    optimizer = torch.optim.AdamW(clip.visual.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    clip.train()
    for _ in range(60):
        idx = torch.randint(0, len(data), (32,), generator=g)
        loss = F.cross_entropy(model(data.images[idx]), data.labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    clip.eval()
    return str(export_open_clip(clip, tmp_path_factory.mktemp("weights") / "undefended.safetensors"))


def _row(weights, row="undefended"):
    return ModelEntry(row, TINY, weights, undefended=True)


# ----------------------------------------------------------------------------- the attack
def test_undefended_model_loses_nearly_all_accuracy_at_8_255(trained_weights, tmp_path):
    results = run_eval([_row(trained_weights)], [_entry()], ["8/255"], AttackSpec(iterations=10),
                       n_samples=64, batch_size=64, out_dir=tmp_path, progress=False)
    ds = results["models"]["undefended"]["datasets"]["patterns"]
    assert ds["n"] == 64
    assert ds["clean"] >= 75.0, "the trained model should be well above the 25% chance level"
    assert ds["robust"]["8/255"] <= 5.0
    assert results["sanity"] == []
    # K = 4 < 10: APGD-T runs with K - 1 = 3 target classes, and says so.
    assert any("3 target classes" in w for w in results["warnings"])


def test_autoattack_checks_are_captured():
    """A model that returns probabilities trips AutoAttack's own check; its text must come back."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5), nn.Softmax(dim=1))
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 5, (6,))
    outcome = robust_flags(net, x, y, 2 / 255, AttackSpec(iterations=2), seed=0)
    assert outcome.robust.dtype == torch.bool and outcome.robust.shape == (6,)
    assert any("probability distribution" in m for m in outcome.messages)
    assert ((outcome.x_adv - x).abs().max() <= 2 / 255 + 1e-6)


def test_robust_flags_are_worst_case_and_only_on_correct_points():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 5, (8,))
    with torch.no_grad():
        correct = net(x).argmax(1).eq(y)
    for spec in (AttackSpec(iterations=3), AttackSpec(name="pgd", iterations=3)):
        flags = robust_flags(net, x, y, 8 / 255, spec, seed=1).robust
        assert not (flags & ~correct).any(), "a misclassified point can never be robust"


def test_evaluation_attacks_run_in_strict_fp32():
    """No TF32 in cuDNN convolutions or matrix products while an evaluation attack runs (torch
    allows it in convolutions by default); the user's settings come back afterwards."""
    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5))

        def forward(self, x):
            seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision))
            return self.net(x)

    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,))
    for spec in (AttackSpec(iterations=2), AttackSpec(name="pgd", iterations=2)):
        robust_flags(Recording(), x, y, 2 / 255, spec, seed=0)
    assert seen and set(seen) == {("ieee", "ieee")}
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before


def test_l2_attack_stays_in_its_ball():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(8, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    outcome = robust_flags(net, x, y, 0.05, AttackSpec(norm="l2", iterations=5), seed=0)
    assert (outcome.x_adv - x).flatten(1).norm(dim=1).max() <= 0.05 + 1e-5
    assert outcome.messages == []


@pytest.mark.slow
def test_standard_autoattack_on_request():
    """Full standard AutoAttack (with FAB-T and 5000-query Square): several seconds even here."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(8, 3, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)
    spec = AttackSpec(name="standard", iterations=5)
    assert spec.describe()["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    outcome = robust_flags(net, x, y, 1 / 255, spec, seed=0)
    assert outcome.robust.shape == (8,) and (outcome.x_adv - x).abs().max() <= 1 / 255 + 1e-6


def test_attack_spec_refuses_unknown_values():
    with pytest.raises(ConfigError, match="apgd"):
        AttackSpec(name="fgsm")
    with pytest.raises(ConfigError, match="linf"):
        AttackSpec(norm="l1")
    with pytest.raises(ConfigError, match="--apgd-ce-restarts: 0"):
        AttackSpec(restarts=0)
    with pytest.raises(ConfigError, match="--attack pgd runs no APGD-CE"):
        AttackSpec(name="pgd", restarts=3)


def test_apgd_ce_restarts_follow_autoattack_custom_version_unless_told():
    """The release and RobustVLM run AutoAttack's ``custom`` version, whose APGD-CE keeps its
    constructor's 5 restarts; the standard version sets 1. The resolved number is recorded."""
    from mmtard.autoattack import _autoattack

    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    for spec, restarts in ((AttackSpec(), 5), (AttackSpec(name="standard"), 1), (AttackSpec(restarts=2), 2)):
        adversary, _ = _autoattack(net, 1 / 255, spec, n_classes=10, seed=0, device="cpu")
        assert adversary.apgd.n_restarts == restarts and adversary.apgd_targeted.n_restarts == 1
        assert spec.describe()["restarts"] == restarts


# ----------------------------------------------------------------------------- run_eval + results.json
def test_results_json_on_world_validates(world_dir, tmp_path):
    datasets = world_datasets(world_dir, sets=["world", "world-shapes", "world-colors"])
    assert [d.kind for d in datasets] == ["classification", "zeroshot", "zeroshot"]
    results = run_eval([ModelEntry("random", TINY)], datasets, ["1/255", "2/255"], AttackSpec(name="pgd", iterations=2),
                       n_samples={"world": 8, "world-shapes": 8}, batch_size=4, out_dir=tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    validate_results(on_disk)
    assert on_disk["models"] == results["models"]
    row = on_disk["models"]["random"]
    assert set(row["datasets"]) == {"world", "world-shapes", "world-colors"}
    assert row["datasets"]["world-colors"]["n"] == 24  # absent from the n_samples mapping: all of it
    assert row["datasets"]["world"]["n"] == 8 and set(row["datasets"]["world"]["robust"]) == {"1/255", "2/255"}
    # the zero-shot average leaves the classification split out
    assert row["average"]["datasets"] == ["world-colors", "world-shapes"]
    shapes, colors = row["datasets"]["world-shapes"], row["datasets"]["world-colors"]
    assert math.isclose(row["average"]["clean"], (shapes["clean"] + colors["clean"]) / 2)
    assert on_disk["attack"]["eps"] == ["1/255", "2/255"] and on_disk["attack"]["name"] == "pgd"
    samples = json.loads((tmp_path / "samples" / "random" / "world.json").read_text())
    assert len(samples["sample_ids"]) == 8 and samples["sample_ids"][0].endswith(".png")


def test_resume_after_interruption_gives_identical_numbers(trained_weights, tmp_path, monkeypatch):
    args = dict(eps_list=["1/255", "2/255"], attack=AttackSpec(iterations=4), n_samples=24, batch_size=8,
                seed=5, progress=False)
    full = run_eval([_row(trained_weights)], [_entry(40)], out_dir=tmp_path / "full", **args)

    calls = []

    def crash_after_three(dataset, eps, chunk):
        calls.append((dataset, eps, chunk))
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval([_row(trained_weights)], [_entry(40)], out_dir=tmp_path / "cut", on_batch=crash_after_three, **args)
    resumed_calls = []
    # asked with another batch size, the resumed record keeps the batching it was started with
    resumed = run_eval([_row(trained_weights)], [_entry(40)], out_dir=tmp_path / "cut",
                       on_batch=lambda *a: resumed_calls.append(a), **{**args, "batch_size": 5})
    assert len(resumed_calls) == 3 * 2 - 3, "only the missing (batch, eps) steps are recomputed"
    assert resumed["models"] == full["models"]
    a = json.loads((tmp_path / "full" / "samples" / "undefended" / "patterns.json").read_text())
    b = json.loads((tmp_path / "cut" / "samples" / "undefended" / "patterns.json").read_text())
    assert a["robust"] == b["robust"] and a["clean"] == b["clean"] and a["sample_ids"] == b["sample_ids"]
    # a finished evaluation reruns nothing, also when its weights file is named by another path
    again = []
    monkeypatch.chdir(Path(trained_weights).parent)
    rerun = run_eval([_row(Path(trained_weights).name)], [_entry(40)], out_dir=tmp_path / "cut",
                     on_batch=lambda *a: again.append(a), **args)
    assert again == [] and rerun["models"]["undefended"]["datasets"] == full["models"]["undefended"]["datasets"]
    assert not [w for w in rerun["warnings"] if "other weights" in w]  # one row, merged
    stored = full["models"]["undefended"]
    assert same_evaluation(stored, {**stored, "weights": Path(trained_weights).name})
    assert not same_evaluation(stored, {**stored, "weights": "openai"})


@pytest.mark.parametrize("damage", ["cut lists", "not an object", "cut file", "not UTF-8"])
def test_a_damaged_record_is_evaluated_again(trained_weights, tmp_path, caplog, damage):
    """A per-sample record only saves work: one edited by hand or cut short is started again, never
    read with its missing samples counted as done (nor stopped on with a raw TypeError)."""
    args = dict(eps_list=["2/255"], attack=AttackSpec(iterations=2), n_samples=16, batch_size=8, seed=5,
                progress=False)
    full = run_eval([_row(trained_weights)], [_entry(40)], out_dir=tmp_path, **args)
    path = tmp_path / "samples" / "undefended" / "patterns.json"
    record = json.loads(path.read_text())
    if damage == "cut lists":
        record["robust"]["2/255"] = record["robust"]["2/255"][:8]
        path.write_text(json.dumps(record))
    elif damage == "not an object":
        path.write_text(json.dumps([record]))
    elif damage == "cut file":
        path.write_text(path.read_text()[:200])
    else:
        path.write_bytes(b'{"arch": "\xff"}')
    calls = []
    with caplog.at_level("WARNING"):
        again = run_eval([_row(trained_weights)], [_entry(40)], out_dir=tmp_path, on_batch=lambda *a: calls.append(a),
                         **args)
    assert f"{path} is unreadable or incomplete; starting it again" in caplog.text
    assert len(calls) == 2 and again["models"] == full["models"]


def test_other_evaluation_in_same_folder_is_refused(tmp_path):
    entry = _entry(8)
    run_eval([ModelEntry("m", TINY)], [entry], ["1/255"], AttackSpec(name="pgd", iterations=1), n_samples=4,
             batch_size=4, out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="different evaluation"):
        run_eval([ModelEntry("m", TINY)], [entry], ["1/255"], AttackSpec(name="pgd", iterations=2), n_samples=4,
                 batch_size=4, out_dir=tmp_path, progress=False)


def test_images_replaced_in_place_are_not_mistaken_for_the_evaluated_ones(world_dir, tmp_path):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(world_dir, world)  # the session's world stays untouched
    kwargs = dict(eps_list=["1/255"], attack=AttackSpec(name="pgd", iterations=1), n_samples=4, batch_size=4,
                  out_dir=tmp_path / "eval", progress=False)
    first = run_eval([ModelEntry("m", TINY)], world_datasets(world, sets=["world-shapes"]), **kwargs)
    record_path = tmp_path / "eval" / "samples" / "m" / "world-shapes.json"
    record = json.loads(record_path.read_text())
    assert set(record["data"]) == {"files", "bytes"}
    # an unchanged dataset resumes (nothing to redo), as does one whose files were touched or copied
    assert run_eval([ModelEntry("m", TINY)], world_datasets(world, sets=["world-shapes"]), **kwargs)["models"] \
        == first["models"]
    evaluated = world_datasets(world, sets=["world-shapes"])[0].dataset.root / record["sample_ids"][0]
    os.utime(evaluated, ns=(1, 1))
    assert run_eval([ModelEntry("m", TINY)], world_datasets(world, sets=["world-shapes"]), **kwargs)["models"] \
        == first["models"]
    # the same file names with other images (a regenerated dataset) are refused by name
    other = next(p for p in world.rglob("*.png") if p.read_bytes() != evaluated.read_bytes())
    shutil.copyfile(other, evaluated)
    with pytest.raises(ConfigError, match=r"world-shapes.json was written on other images or labels"):
        run_eval([ModelEntry("m", TINY)], world_datasets(world, sets=["world-shapes"]), **kwargs)
    # a record written before the digest existed has nothing to compare, and resumes
    del record["data"]
    record_path.write_text(json.dumps(record))
    assert run_eval([ModelEntry("m", TINY)], world_datasets(world, sets=["world-shapes"]), **kwargs)["models"] \
        == first["models"]


def test_an_unreadable_image_stops_the_evaluation_and_names_the_file(world_dir, tmp_path):
    """Training reads the next readable image instead of a broken one; evaluation must not, or
    that neighbour would be counted twice in the accuracy."""
    import shutil

    world = tmp_path / "world"
    shutil.copytree(world_dir, world)
    (entry,) = world_datasets(world, sets=["world-shapes"])
    broken = Path(entry.dataset.files[3])
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"Cannot read image {broken}"):
        run_eval([ModelEntry("m", TINY)], world_datasets(world, sets=["world-shapes"]), ["1/255"],
                 AttackSpec(name="pgd", iterations=1), n_samples=None, batch_size=4, out_dir=tmp_path / "eval",
                 progress=False)


def test_dataset_digest_covers_labels_and_unreadable_files(tmp_path):
    from types import SimpleNamespace

    from mmtard.dataset_digest import dataset_digest

    files = [tmp_path / f"{i}.png" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 10)
    listed = SimpleNamespace(files=[str(f) for f in files], targets=[0, 1, 1])
    relabelled = SimpleNamespace(files=listed.files, targets=[0, 1, 0])

    class Wrapped:  # a clip-benchmark set around a torchvision ImageFolder: (path, label) samples
        inner = SimpleNamespace(samples=list(zip(listed.files, listed.targets)))

        def __len__(self):
            return 3

    for kind in ("files", "bytes"):
        digest = dataset_digest(listed, [0, 2], kind)
        assert digest != dataset_digest(relabelled, [0, 2], kind)  # a label alone changed
        assert digest == dataset_digest(Wrapped(), [0, 2], kind)
        assert dataset_digest(SimpleNamespace(), [0], kind) is None  # shards, in-memory sets
    before = dataset_digest(listed, [0, 2], "bytes")
    files[2].write_bytes(b"other image")
    assert dataset_digest(listed, [0, 2], "bytes") != before
    files[2].unlink()  # the loader skips it and notes it; the digest must not stop the evaluation
    assert dataset_digest(listed, [0, 2], "bytes") not in (None, before)


def test_rewritten_weights_file_is_not_mistaken_for_the_evaluated_one(tmp_path):
    weights = export_open_clip(create_clip(ModelSpec(TINY)), tmp_path / "w.safetensors")
    kwargs = dict(n_samples=4, batch_size=4, out_dir=tmp_path / "eval", progress=False)
    spec = AttackSpec(name="pgd", iterations=1)
    run_eval([ModelEntry("m", TINY, str(weights))], [_entry(8)], ["1/255"], spec, **kwargs)
    export_open_clip(create_clip(ModelSpec(TINY)), weights)  # a new checkpoint at the same path
    with pytest.raises(ConfigError, match="weights_file"):
        run_eval([ModelEntry("m", TINY, str(weights))], [_entry(8)], ["1/255"], spec, **kwargs)


def test_second_model_into_same_folder_keeps_first_row(tmp_path):
    spec = AttackSpec(name="pgd", iterations=1)
    kwargs = dict(n_samples=4, batch_size=4, out_dir=tmp_path, progress=False)
    run_eval([ModelEntry("a", TINY)], [_entry(8)], ["1/255"], spec, **kwargs)
    out = run_eval([ModelEntry("b", TINY)], [_entry(8)], ["1/255"], spec, **kwargs)
    assert set(out["models"]) == {"a", "b"}
    validate_results(json.loads((tmp_path / "results.json").read_text()))


# ----------------------------------------------------------------------------- merge / validate / sanity
def _results(rows: dict, eps=("1/255",)) -> dict:
    models = {}
    for row, datasets in rows.items():
        ds = {name: {"n": 10, "clean": c, "robust": dict(zip(eps, r)), "kind": "zeroshot"}
              for name, (c, r) in datasets.items()}
        models[row] = {"arch": TINY, "weights": None, "datasets": ds,
                       "average": {"datasets": sorted(ds), "clean": 0.0, "robust": {}}}
    return {"models": models, "attack": {"name": "apgd", "iterations": 100, "norm": "linf", "eps": list(eps)},
            "created": "2025-01-01T00:00:00+00:00", "warnings": [], "sanity": []}


def test_merge_two_results_files_later_wins(tmp_path):
    first = _results({"a": {"x": (50.0, [20.0])}, "b": {"x": (40.0, [10.0])}})
    second = _results({"b": {"x": (45.0, [15.0]), "y": (30.0, [5.0])}, "c": {"x": (60.0, [1.0])}})
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "results.json").write_text(json.dumps(first))
    (tmp_path / "two.json").write_text(json.dumps(second))
    merged = merge_results([tmp_path / "one", tmp_path / "two.json"])
    validate_results(merged)
    assert set(merged["models"]) == {"a", "b", "c"}
    assert merged["models"]["b"]["datasets"]["x"]["clean"] == 45.0  # the later file wins
    assert set(merged["models"]["b"]["datasets"]) == {"x", "y"}
    assert merged["models"]["b"]["average"]["clean"] == pytest.approx(37.5)  # recomputed
    assert any("b/x appears twice" in w for w in merged["warnings"])


def test_an_unreadable_results_file_is_moved_aside_not_overwritten(tmp_path):
    from mmtard.evaluate import _write_results

    (tmp_path / "results.json").write_text('{"models": {"earlier": ')  # cut short by hand or a full disk
    (tmp_path / "results.json.unreadable").write_text("an older one")
    rows = _results({"a": {"x": (50.0, [20.0])}})["models"]
    written = _write_results(tmp_path, rows, AttackSpec(), [1 / 255], [])
    assert (tmp_path / "results.json.unreadable").read_text() == "an older one"
    assert (tmp_path / "results.json.unreadable.1").read_text() == '{"models": {"earlier": '
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(written)) and set(on_disk["models"]) == {"a"}
    assert any("moved to results.json.unreadable.1" in w for w in on_disk["warnings"])
    (tmp_path / "results.json").write_bytes(b'{"models": "\xff"}')  # not even UTF-8
    _write_results(tmp_path, rows, AttackSpec(), [1 / 255], [])
    assert (tmp_path / "results.json.unreadable.2").read_bytes() == b'{"models": "\xff"}'


def test_evaluations_writing_into_one_folder_at_once_keep_every_row(tmp_path, monkeypatch):
    """Each merge reads the file, adds its row and writes it back: two at once, unserialised, would
    both read the old file and the later write would drop the earlier one's row."""
    import threading
    import time

    from mmtard import evaluate

    evaluate._write_results(tmp_path, _results({"base": {"x": (50.0, [20.0])}})["models"], AttackSpec(),
                            [1 / 255], [])
    real_load = evaluate.load_results

    def slow_load(path):
        loaded = real_load(path)
        time.sleep(0.5)  # the other writer reads meanwhile, unless it waits for this one
        return loaded

    monkeypatch.setattr(evaluate, "load_results", slow_load)
    writers = [threading.Thread(target=evaluate._write_results,
                                args=(tmp_path, _results({name: {"x": (40.0, [10.0])}})["models"], AttackSpec(),
                                      [1 / 255], []))
               for name in ("a", "b")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert set(json.loads((tmp_path / "results.json").read_text())["models"]) == {"base", "a", "b"}


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda r: r.pop("attack"), "attack"),
        (lambda r: r["models"]["a"]["datasets"]["x"].update(clean=120.0), "percentage"),
        (lambda r: r["models"]["a"]["datasets"]["x"]["robust"].update({"two": 3.0}), "eps key"),
        (lambda r: r["models"]["a"]["datasets"]["x"].update(n=2.5), "integer"),
        (lambda r: r.update(created="yesterday"), "ISO"),
    ],
)
def test_validate_results_names_the_problem(mutate, match):
    obj = _results({"a": {"x": (50.0, [20.0])}})
    validate_results(obj)
    mutate(obj)
    with pytest.raises(DataError, match=match):
        validate_results(obj)


def test_sanity_checks_flag_but_do_not_raise():
    obj = _results({"undefended": {"x": (50.0, [60.0, 30.0])}}, eps=("1/255", "4/255"))
    obj["models"]["undefended"]["datasets"]["y"] = {"n": 10, "clean": 50.0, "robust": {"1/255": 10.0, "4/255": 20.0}}
    checks = {f["check"] for f in sanity_checks(obj)}
    assert checks == {"robust<=clean", "monotone-eps", "undefended-near-zero"}


# ----------------------------------------------------------------------------- bad inputs
def test_eps_in_255_units_is_refused_with_hint(tmp_path):
    with pytest.raises(ConfigError, match="2/255"):
        run_eval([ModelEntry("m", TINY)], [_entry(8)], ["2"], "pgd", out_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="cannot read"):
        run_eval([ModelEntry("m", TINY)], [_entry(8)], ["two"], "pgd", out_dir=tmp_path, progress=False)


def test_class_count_mismatch_is_a_data_error(tmp_path):
    entry = DatasetEntry("patterns", PatternSet(8, 0), CLASSES[:3], TEMPLATES)
    with pytest.raises(DataError, match="3 class names.*4 classes"):
        run_eval([ModelEntry("m", TINY)], [entry], ["1/255"], "pgd", out_dir=tmp_path, progress=False)
    unnamed = PatternSet(8, 0)
    del unnamed.classnames  # no class list to compare: caught on the labels themselves
    entry = DatasetEntry("patterns", unnamed, CLASSES[:3], TEMPLATES)
    with pytest.raises(DataError, match="outside the head's 3 classes"):
        run_eval([ModelEntry("m", TINY)], [entry], ["1/255"], AttackSpec(name="pgd", iterations=1),
                 n_samples=8, batch_size=8, out_dir=tmp_path / "b", progress=False)


def test_missing_dataset_roots_name_the_expected_layout(tmp_path):
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        suite_datasets(["cifar10"], tmp_path / "nowhere")
    with pytest.raises(DataError, match="cifar-10-batches-py"):  # a template, clip-benchmark's form
        suite_datasets(["cifar10"], str(tmp_path / "nowhere" / "{name}"))
    for template in ("{name}/{split}", "{0}", "{name"):
        with pytest.raises(ConfigError, match=r"may hold only \{name\}"):
            suite_datasets(["cifar10"], str(tmp_path / template))
    with pytest.raises(DataError, match="val/<wnid>"):
        imagenet_dataset(tmp_path / "imagenet")
    with pytest.raises(DataError, match="world.json"):
        world_datasets(tmp_path / "no-world")


def test_a_row_evaluated_again_with_other_weights_does_not_keep_old_sets(tmp_path):
    """Row m: sets x and y with one checkpoint, then x alone with another: y's old numbers must
    not be listed (nor averaged) under the new weights."""
    spec = AttackSpec(name="pgd", iterations=1)
    old = export_open_clip(create_clip(ModelSpec(TINY)), tmp_path / "old.safetensors")
    new = export_open_clip(create_clip(ModelSpec(TINY)), tmp_path / "new.safetensors")
    kwargs = dict(n_samples=4, batch_size=4, progress=False)
    run_eval([ModelEntry("m", TINY, str(old))], [_entry(8, name="x"), _entry(8, name="y")], ["1/255"], spec,
             out_dir=tmp_path / "eval", **kwargs)
    with pytest.raises(ConfigError, match="different evaluation"):  # x's own record refuses the swap
        run_eval([ModelEntry("m", TINY, str(new))], [_entry(8, name="x")], ["1/255"], spec,
                 out_dir=tmp_path / "eval", **kwargs)
    # into a folder holding only results.json (its per-sample records gone): y is dropped, said so
    import shutil

    shutil.rmtree(tmp_path / "eval" / "samples")
    out = run_eval([ModelEntry("m", TINY, str(new))], [_entry(8, name="x")], ["1/255"], spec,
                   out_dir=tmp_path / "eval", **kwargs)
    assert set(out["models"]["m"]["datasets"]) == {"x"}
    assert any("results on y were dropped" in w for w in out["warnings"])
    # the same weights again: earlier sets are kept (an eps or a set added to a row)
    out = run_eval([ModelEntry("m", TINY, str(new))], [_entry(8, name="y")], ["1/255"], spec,
                   out_dir=tmp_path / "eval", **kwargs)
    assert set(out["models"]["m"]["datasets"]) == {"x", "y"}


def test_resume_refuses_a_set_whose_samples_changed(tmp_path):
    spec = AttackSpec(name="pgd", iterations=1)
    kwargs = dict(n_samples=4, batch_size=4, out_dir=tmp_path, progress=False)
    run_eval([ModelEntry("m", TINY)], [_entry(8)], ["1/255"], spec, **kwargs)
    changed = _entry(8)
    changed.dataset.sample_ids = [f"other/{i:04d}" for i in range(8)]  # same size, other images
    with pytest.raises(ConfigError, match="sample_ids differs"):
        run_eval([ModelEntry("m", TINY)], [changed], ["1/255"], spec, **kwargs)
    # another attack: the refusal names the setting that differs, not a truncated dict
    with pytest.raises(ConfigError, match=r"attack differs: stored \"\{'iterations': 1\}\", now \"\{'iterations': 2\}\""):
        run_eval([ModelEntry("m", TINY)], [_entry(8)], ["1/255"], AttackSpec(name="pgd", iterations=2), **kwargs)


def test_fixed_size_suite_sets_keep_their_native_resolution():
    assert suite_image_size("cifar10") is None and suite_image_size("stl10") is None
    assert suite_image_size("caltech101") == 224 and suite_image_size("imagenet-r") == 224
    assert suite_image_size("eurosat") == 224 and suite_image_size("pcam") == 224  # as the release


def test_suite_entry_takes_names_and_templates_in_the_head_form(tmp_path):
    """clip-benchmark's built-in one-image set: its class names, and its templates with the
    ``{c}`` slot as the ``{}`` that the zero-shot head formats."""
    (entry,) = suite_datasets(["dummy"], tmp_path)
    assert entry.kind == "zeroshot" and entry.classnames == ["blank image", "noisy image"]
    assert entry.templates and all(t.count("{}") == 1 and "{c}" not in t for t in entry.templates)


def _benchmark_shards(root, n_per_shard=(5, 5, 2), size=32, templates=True, fmt="png"):
    """A clip-benchmark webdataset download: classnames.txt, templates, test/{0..}.tar (png + cls)."""
    import io
    import tarfile

    from PIL import Image

    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("airplane\nautomobile\nbird\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na blurry photo of a {c}.\n")
    g = torch.Generator().manual_seed(0)
    i = 0
    for shard, count in enumerate(n_per_shard):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for _ in range(count):
                pixels = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
                encoded = io.BytesIO()
                Image.fromarray(pixels).save(encoded, format=fmt.upper())
                for suffix, data in ((f".{fmt}", encoded.getvalue()), (".cls", str(i % 3).encode())):
                    info = tarfile.TarInfo(f"s{i:05d}{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
    return root


def test_evaluation_pgd_counts_an_image_broken_at_any_iterate():
    """PGD's last iterate may step back out of a misclassified region: --attack pgd counts an image
    broken if any iterate is misclassified (here only the attack's third forward, an intermediate
    iterate), and returns that iterate."""
    class Flicker(nn.Module):
        def __init__(self, flip_at: int | None = 3):
            super().__init__()
            self.linear = nn.Linear(3 * 4 * 4, 2)
            self.attack_calls, self.flip_at, self.flipped_input = 0, flip_at, None
            with torch.no_grad():
                self.linear.weight.mul_(1e-3)
                self.linear.bias.copy_(torch.tensor([1.0, 0.0]))  # class 0 everywhere near x

        def forward(self, z):
            logits = self.linear(z.flatten(1))
            if torch.is_grad_enabled():  # the attack's own forwards, not the checks around it
                self.attack_calls += 1
                if self.attack_calls == self.flip_at:
                    self.flipped_input = z.detach().clone()
                    return logits + torch.tensor([0.0, 5.0])
            return logits

    x, y = torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long)
    model = Flicker()
    outcome = robust_flags(model, x, y, 2 / 255, AttackSpec(name="pgd", iterations=4), seed=0)
    assert outcome.robust.tolist() == [False, False]  # the last iterate alone would say [True, True]
    torch.testing.assert_close(outcome.x_adv, model.flipped_input, rtol=0, atol=0)
    assert (outcome.x_adv - x).abs().max() <= 2 / 255 + 1e-6
    # the independent re-check runs for PGD too (this model misclassifies that iterate only once)
    assert outcome.messages == ["2 points the attack marked broken are classified correctly on re-check"]
    steady = robust_flags(Flicker(flip_at=None), x, y, 2 / 255, AttackSpec(name="pgd", iterations=4))
    assert steady.robust.tolist() == [True, True] and not steady.messages
    assert AttackSpec(name="pgd").describe()["version"] == "mmtard-pgd-any"


def test_varied_size_sets_are_resized_to_each_rows_input_size(caplog):
    """eps is measured in the pixels the model sees: ImageNet and the suite's varied-size sets are
    resized to each row's own input size (a 336 px model is not fed 224 px images upsampled),
    whatever other rows share the command."""
    from mmtard.cli import _rows_by_input_size

    def groups(*archs, sets=("imagenet=/data", "cifar10=/data")):
        models = [ModelEntry(f"row{i}", arch) for i, arch in enumerate(archs)]
        return {size: [m.arch for m in rows] for size, rows in _rows_by_input_size(models, list(sets)).items()}

    assert groups("ViT-L-14-336") == {336: ["ViT-L-14-336"]} and groups(TINY, TINY) == {32: [TINY, TINY]}
    assert groups("ViT-B-32", "ViT-L-14-336", "ViT-B-32-quickgelu") == {
        224: ["ViT-B-32", "ViT-B-32-quickgelu"], 336: ["ViT-L-14-336"]}
    assert "not known" not in caplog.text
    # a hub config is remote: not fetched; 224, said once a set needs a size
    assert groups("hf-hub:timm/ViT-B-16-SigLIP", "ViT-L-14-336") == {224: ["hf-hub:timm/ViT-B-16-SigLIP"],
                                                                       336: ["ViT-L-14-336"]}
    assert "row0: the input size of hf-hub:timm/ViT-B-16-SigLIP is not known" in caplog.text
    caplog.clear()  # native-size sets only: one group, nothing to say
    assert groups("hf-hub:timm/x", "ViT-L-14-336", sets=("cifar10=/d", "world=/w")) == {
        224: ["hf-hub:timm/x", "ViT-L-14-336"]} and not caplog.text


def test_clip_benchmark_webdataset_sets_are_read_as_the_release_did(tmp_path, capsys):
    """The release evaluated the suite from clip-benchmark's wds downloads: their class names and
    templates come with them, their shards are read by index (so records and resume work)."""
    from mmtard.cli import main

    _benchmark_shards(tmp_path / "wds" / "cifar10")
    _benchmark_shards(tmp_path / "wds" / "eurosat", n_per_shard=(4,), size=40, templates=False, fmt="webp")
    cifar, eurosat = suite_datasets(["cifar10", "eurosat"], tmp_path / "wds")
    assert cifar.classnames == ["airplane", "automobile", "bird"]
    assert cifar.templates == ["a photo of a {}.", "a blurry photo of a {}."]
    assert len(cifar.dataset) == 12 and cifar.dataset[11][0].shape == (3, 32, 32)  # native size, shard 2 last
    assert [cifar.dataset[i][1] for i in range(12)] == [i % 3 for i in range(12)]
    assert eurosat.dataset[0][0].shape == (3, 224, 224) and eurosat.templates  # clip-benchmark's own templates
    assert cifar.dataset.image_size is None and eurosat.dataset.image_size == 224
    # for a model of another input size, varied-size sets are resized to it (native ones stay native)
    cifar_48, eurosat_48 = suite_datasets(["cifar10", "eurosat"], tmp_path / "wds", variable_size=48)
    assert cifar_48.dataset.image_size is None and eurosat_48.dataset[0][0].shape == (3, 48, 48)
    out = tmp_path / "eval"
    args = ["-q", "eval", "--model", TINY, "--dataset", f"cifar10={tmp_path}/wds", "--eps", "1/255",
            "--attack", "pgd", "--iterations", "1", "--out", str(out)]
    assert main(args) == 0
    first = json.loads((out / "results.json").read_text())["models"][TINY]["datasets"]["cifar10"]
    assert first["n"] == 12 and first["n_classes"] == 3
    assert main(args) == 0  # resumed from its records
    assert json.loads((out / "results.json").read_text())["models"][TINY]["datasets"]["cifar10"] == first
    # two input sizes in one command: EuroSAT (varied sizes) resized to each model's own, one results.json
    both = tmp_path / "both"
    assert main(["-q", "eval", "--model", TINY, "--model", "mmtard-small-vit", "--dataset", f"eurosat={tmp_path}/wds",
                 "--eps", "1/255", "--attack", "pgd", "--iterations", "1", "--out", str(both)]) == 0
    rows = json.loads((both / "results.json").read_text())["models"]
    assert {r: rows[r]["datasets"]["eurosat"]["image_size"] for r in rows} == {TINY: 32, "mmtard-small-vit": 48}
    bad = _benchmark_shards(tmp_path / "bad" / "cifar10")
    (bad / "zeroshot_classification_templates.txt").write_text("a photo\n")
    with pytest.raises(DataError, match="lacks the class slot"):
        suite_datasets(["cifar10"], tmp_path / "bad")
    (bad / "classnames.txt").write_text("airplane\n\nbird\n")  # clip-benchmark would shift labels past the blank
    with pytest.raises(DataError, match=r"classnames\.txt line 2 is blank"):
        suite_datasets(["cifar10"], tmp_path / "bad")
    (bad / "classnames.txt").unlink()
    with pytest.raises(DataError, match="holds clip-benchmark shards but no classnames.txt"):
        suite_datasets(["cifar10"], tmp_path / "bad")
    (tmp_path / "wds" / "cifar10" / "test" / "nshards.txt").write_text("2\n")  # clip-benchmark reads 0..1 only
    assert len(suite_datasets(["cifar10"], tmp_path / "wds")[0].dataset) == 10
    (tmp_path / "wds" / "cifar10" / "test" / "nshards.txt").write_text("4\n")
    with pytest.raises(DataError, match="says 4 shards, but 3.tar is missing"):
        suite_datasets(["cifar10"], tmp_path / "wds")


def test_eval_n_samples_leaves_the_imagenet_list_whole():
    from types import SimpleNamespace

    from mmtard.cli import _sample_sizes

    args = SimpleNamespace(n_samples=1000, imagenet_samples=None)
    sets = [SimpleNamespace(name="imagenet"), SimpleNamespace(name="cifar10")]
    assert _sample_sizes(args, sets) == {"imagenet": None, "cifar10": 1000}


def _fresh_record(dataset: str, **changes) -> dict:
    from mmtard.results import MODEL_FORWARD

    return {"arch": TINY, "weights": None, "weights_file": None, "forward": MODEL_FORWARD, "indices": [0, 1],
            "sample_ids": ["a", "b"], "attack": {"name": "pgd"}, "head": "h", "seed": 0, "batch_size": 2,
            "dataset": dataset, "image_size": 32, "data": None, "labels": [None, None], "clean": [None, None],
            "robust": {}, **changes}


def test_a_record_or_row_from_before_quick_gelu_and_bicubic_is_not_resumed_or_merged(tmp_path):
    """Version-1 records ran OpenAI-derived weights with GELU and resized with bilinear."""
    from mmtard.evaluate import _open_record
    from mmtard.results import same_evaluation

    fresh = _fresh_record("patterns")
    legacy = {k: v for k, v in fresh.items() if k != "forward"}
    (tmp_path / "r.json").write_text(json.dumps(legacy))
    with pytest.raises(ConfigError, match=r"forward differs: stored '1', now '2'\) \(written by an older mmtard"):
        _open_record(tmp_path / "r.json", fresh)
    (tmp_path / "native.json").write_text(json.dumps({**fresh, "image_size": None}))  # attacked in another pixel space
    with pytest.raises(ConfigError, match="image_size differs: stored 'None', now '32'"):
        _open_record(tmp_path / "native.json", fresh)
    row = {"arch": TINY, "weights": None, "attack": {"name": "pgd"}}
    assert same_evaluation(row, dict(row)) and same_evaluation({**row, "forward": 1}, row)
    assert not same_evaluation(row, {**row, "forward": 2})


def test_an_empty_set_is_refused_by_name(tmp_path):
    """Zero samples would be reported as 0 % clean and pull the zero-shot averages down."""
    with pytest.raises(DataError, match="dataset 'patterns' has no samples"):
        run_eval([ModelEntry("random", TINY)], [_entry(0)], ["1/255"], AttackSpec(name="pgd", iterations=1),
                 n_samples=None, out_dir=tmp_path, progress=False)


def test_imagenet_evaluation_needs_all_1000_class_folders(tmp_path):
    """With fewer wnid folders, labels and the head would cover only those: not ImageNet accuracy."""
    from PIL import Image

    val = tmp_path / "imagenet" / "val"
    lst = tmp_path / "list.txt"
    lst.write_text("n01440764/a.JPEG\n")
    (val / "n01440764").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(val / "n01440764" / "a.JPEG", format="JPEG")
    with pytest.raises(DataError, match="has 1 <wnid> class folders under val/, not 1000"):
        imagenet_dataset(tmp_path / "imagenet", list_file=lst, image_size=8)
    others = list(imagenet_wnids()[1:])
    for wnid in others[:-1] + ["n99999999"]:  # the other classes' folders may be empty; one is stray
        (val / wnid).mkdir()
    with pytest.raises(DataError, match=f"not ImageNet-1k: n99999999; missing: {others[-1]}"):
        imagenet_dataset(tmp_path / "imagenet", list_file=lst, image_size=8)
    for wnid in others[:-1] + ["n99999999"]:  # the whole val folder: one image per class
        Image.new("RGB", (8, 8)).save(val / wnid / "b.JPEG", format="JPEG")
    with pytest.raises(DataError, match=f"not ImageNet-1k: n99999999; missing: {others[-1]}"):
        imagenet_dataset(tmp_path / "imagenet", image_size=8, full_val=True)
    (val / "n99999999").rename(val / others[-1])
    entry = imagenet_dataset(tmp_path / "imagenet", list_file=lst, image_size=8)
    assert len(entry.classnames) == 1000 and entry.classnames[0] == "tench"


def test_resume_refuses_a_set_whose_labels_changed_under_the_same_names(trained_weights, tmp_path):
    """A set with no file digest (CIFAR's few binary files, an in-memory set) replaced by another of
    the same size keeps every sample id; its labels tell, and the stored verdicts are refused."""
    args = dict(eps_list=["1/255", "2/255"], attack=AttackSpec(name="pgd", iterations=1), n_samples=16,
                batch_size=8, seed=5, progress=False, out_dir=tmp_path)

    def stop_after_first(dataset, eps, chunk):  # batch 0 has its labels and one radius stored
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_eval([_row(trained_weights)], [_entry(16)], on_batch=stop_after_first, **args)
    relabelled = _entry(16)
    relabelled.dataset.labels = (relabelled.dataset.labels + 1) % len(CLASSES)
    with pytest.raises(DataError, match=r"'patterns': batch 0 has other labels than the stored record's"):
        run_eval([_row(trained_weights)], [relabelled], **args)


def test_a_record_another_evaluation_is_completing_is_refused(tmp_path):
    """Two runs completing one record would each rewrite it whole from their own copy; the second
    is refused. Other records of the same folder stay free."""
    from mmtard.errors import MmtardError
    from mmtard.evaluate import _hold_record

    path = tmp_path / "samples" / "m" / "patterns.json"
    held = _hold_record(path)
    try:
        with pytest.raises(MmtardError, match=r"patterns.json is being evaluated by another mmtard eval run"):
            run_eval([ModelEntry("m", TINY)], [_entry(8)], ["1/255"], AttackSpec(name="pgd", iterations=1),
                     n_samples=4, batch_size=4, out_dir=tmp_path, progress=False)
        _hold_record(tmp_path / "samples" / "m" / "other.json").close()
    finally:
        held.close()
    run_eval([ModelEntry("m", TINY)], [_entry(8)], ["0/255"], AttackSpec(name="pgd", iterations=1),
             n_samples=4, batch_size=4, out_dir=tmp_path / "zero", progress=False)
    record = json.loads((tmp_path / "zero" / "samples" / "m" / "patterns.json").read_text())
    assert record["robust"]["0/255"] == record["clean"]  # eps 0: robust is clean-correct, no second pass


def test_a_torchvision_array_set_is_digested_from_its_images():
    """CIFAR and STL-10 keep their images in one array read from a few binary files: the record's
    digest is of the evaluated images and labels, so another set of the same size is told apart."""
    import numpy as np

    from mmtard.dataset_digest import dataset_digest

    class ArraySet:  # torchvision's CIFAR10 shape: data [N, H, W, 3] uint8, targets list
        def __init__(self, seed):
            self.data = np.random.default_rng(seed).integers(0, 255, (6, 4, 4, 3), dtype=np.uint8)
            self.targets = [0, 1, 2, 0, 1, 2]

        def __len__(self):
            return 6

    class Wrapped:  # as ZeroShotSuiteDataset holds it
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

    a, b = Wrapped(ArraySet(0)), Wrapped(ArraySet(1))
    assert dataset_digest(a, [0, 2], "files") == dataset_digest(Wrapped(ArraySet(0)), [0, 2], "bytes")
    assert dataset_digest(a, [0, 2], "files") != dataset_digest(b, [0, 2], "files")
    relabelled = ArraySet(0)
    relabelled.targets = [1, 1, 2, 0, 1, 2]
    assert dataset_digest(a, [0, 2], "files") != dataset_digest(Wrapped(relabelled), [0, 2], "files")
