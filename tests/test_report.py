"""Report: tables, figures and sanity flags from results files and training run folders."""

from __future__ import annotations

import csv
import json

import pytest

from mmtard.errors import DataError
from mmtard.report import eps_table, run_report

EPS = ("1/255", "2/255", "4/255")


def _dataset(clean: float, robust: list[float], kind: str = "zeroshot") -> dict:
    return {"n": 100, "clean": clean, "robust": dict(zip(EPS, robust)), "kind": kind}


def _results(models: dict, warnings: list[str] | None = None) -> dict:
    return {
        "models": models,
        "attack": {"name": "apgd", "attacks": ["apgd-ce", "apgd-t"], "iterations": 100, "norm": "linf",
                   "version": "custom", "eps": list(EPS)},
        "created": "2025-01-01T00:00:00+00:00",
        "warnings": warnings or [],
        "sanity": [],
    }


def _row(datasets: dict, **extra) -> dict:
    zs = {k: v for k, v in datasets.items() if v["kind"] == "zeroshot"}
    average = {
        "datasets": sorted(zs),
        "clean": sum(d["clean"] for d in zs.values()) / len(zs),
        "robust": {e: sum(d["robust"][e] for d in zs.values()) / len(zs) for e in EPS},
    }
    return {"arch": "ViT-B-32", "weights": "student.safetensors", "datasets": datasets, "average": average, **extra}


@pytest.fixture
def inputs(tmp_path):
    one = tmp_path / "eval-a"
    one.mkdir()
    (one / "results.json").write_text(json.dumps(_results({
        "mmt-ard": _row({"imagenet": _dataset(60.0, [45.0, 35.0, 20.0], "classification"),
                         "cifar10": _dataset(80.0, [60.0, 45.0, 25.0]),
                         "dtd": _dataset(30.0, [20.0, 12.0, 5.0])}),
    }, warnings=["mmt-ard/dtd: there are 2 points with zero gradient!"])))
    two = tmp_path / "eval-b.json"
    two.write_text(json.dumps(_results({
        "undefended": _row({"imagenet": _dataset(63.0, [1.0, 0.2, 0.0], "classification"),
                            "cifar10": _dataset(88.0, [3.0, 0.5, 0.0]),
                            "dtd": _dataset(44.0, [2.0, 0.0, 0.0])}),
        "ard": _row({"cifar10": _dataset(78.0, [55.0, 40.0, 22.0])}),
    })))
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["step", "loss", "loss_robust", "loss_clean", "lr", "train_acc_clean", "train_acc_adv", "images_per_s"]
        )
        for step in range(1, 21):
            lr = 1e-4 * (1 - step / 21)
            writer.writerow([step * 10, 2.0 / step, 1.5 / step, 0.5 / step, lr, 0.3 + step / 40, 0.1 + step / 60, ""])
    return [one, two, run]


def test_report_renders_tables_and_figures(inputs, tmp_path):
    path = run_report(inputs, tmp_path / "report")
    text = path.read_text()
    assert path.name == "report.md"
    for name in ("accuracy_vs_eps.png", "clean_vs_robust.png", "training_run.png"):
        figure = tmp_path / "report" / name
        assert figure.is_file() and figure.stat().st_size > 1000
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    for key in EPS:
        assert f"### eps = {key}" in text
    assert "| mmt-ard |" in text and "| undefended |" in text and "| ard |" in text
    assert "All passed" in text
    assert "zero gradient" in text  # AutoAttack's warnings travel into the report


def test_eps_table_has_clean_robust_and_average_columns():
    models = {"m": _row({"cifar10": _dataset(80.0, [60.0, 45.0, 25.0]), "dtd": _dataset(30.0, [20.0, 12.0, 5.0])})}
    table = eps_table(models, "2/255")
    header, _, line, _, sizes = table.splitlines()
    assert header.split(" | ")[1:3] == ["cifar10 clean", "cifar10 2/255"]
    assert "avg 2/255" in header
    assert line == "| m | 80.0 | 45.0 | 30.0 | 12.0 | 55.0 | 28.5 |"
    assert sizes == "Images per set: cifar10 100, dtd 100."


def test_eps_table_marks_means_over_fewer_sets_and_sets_of_other_sizes():
    """Rows averaging other sets, or evaluated on other numbers of images, are not comparable
    unmarked: a plain mean over fewer sets is starred, a set's cells of uneven sizes get †."""
    def row(datasets):
        return {"arch": "x", "weights": None, "attack": {"name": "apgd"}, "datasets": datasets, "average": {}}

    both = row({"a": _dataset(80.0, [60.0, 40.0, 20.0], "classification"),
                "b": _dataset(60.0, [40.0, 20.0, 10.0], "classification")})
    one = row({"a": _dataset(80.0, [60.0, 40.0, 20.0], "classification")})
    one["datasets"]["a"]["n"] = 50
    table = eps_table({"both": both, "one": one}, "2/255")
    assert "| both | 80.0† | 40.0† | 60.0 | 20.0 | 70.0 | 30.0 |" in table
    assert "| one | 80.0† | 40.0† | – | – | 80.0* | 40.0* |" in table
    assert "\\* average over fewer sets than the other rows' (one: a)" in table
    assert "† a: rows evaluated on different numbers of images (both 100, one 50)" in table
    assert "Images per set: b 100." in table


def test_report_flags_failed_sanity_checks_without_crashing(tmp_path, caplog):
    bad = _results({
        "undefended": _row({"cifar10": _dataset(80.0, [85.0, 30.0, 40.0])}),
    })
    (tmp_path / "results.json").write_text(json.dumps(bad))
    with caplog.at_level("WARNING"):
        text = run_report([tmp_path / "results.json"], tmp_path / "out").read_text()
    for check in ("robust<=clean", "monotone-eps", "undefended-near-zero"):
        assert check in text
    assert any("undefended" in r.getMessage() for r in caplog.records)


def test_report_of_training_run_only(inputs, tmp_path):
    text = run_report([inputs[2]], tmp_path / "out").read_text()
    assert "## Training" in text and (tmp_path / "out" / "training_run.png").stat().st_size > 1000


def test_a_metrics_file_with_bytes_that_are_not_utf8_still_plots(inputs, tmp_path):
    from mmtard.report import read_metrics

    with open(inputs[2] / "metrics.csv", "ab") as handle:  # a damaged sector
        handle.write(b"\xff\xfe,0.1\n")
    series = read_metrics(inputs[2])
    assert len(series["loss"]) == 20 and len(series["loss_robust"]) == 20  # the damaged row adds nothing readable
    assert "## Training" in run_report([inputs[2]], tmp_path / "out").read_text()


def test_report_refuses_missing_or_unknown_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        run_report([tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither"):
        run_report([tmp_path / "empty"], tmp_path / "out")
    (tmp_path / "broken.json").write_text(json.dumps({"models": {}}))
    with pytest.raises(DataError, match="attack"):
        run_report([tmp_path / "broken.json"], tmp_path / "out")


def test_eps_table_marks_rows_attacked_differently_and_rows_without_zero_shot_sets():
    def row(attack, kind):
        ds = {"set": {"n": 10, "clean": 50.0, "robust": {"2/255": 20.0}, "kind": kind}}
        average = {"datasets": ["set"], "clean": 50.0, "robust": {"2/255": 20.0}} if kind == "zeroshot" else {}
        return {"arch": "a", "weights": None, "attack": attack, "datasets": ds, "average": average}

    apgd = {"name": "apgd", "iterations": 100}
    same = eps_table({"a": row(apgd, "zeroshot"), "b": row(apgd, "zeroshot")}, "2/255")
    assert "| attack |" not in same and "°" not in same
    mixed = eps_table({"a": row(apgd, "zeroshot"), "b": row({"name": "pgd", "iterations": 10}, "classification")},
                      "2/255")
    assert "| model | attack |" in mixed and "| a | apgd/100it/?/-t/-r |" in mixed and "| b | pgd/10it/?/-t/-r |" in mixed
    assert "50.0° | 20.0° |" in mixed and "° no zero-shot set: mean over all of the row's sets" in mixed


def test_merging_a_row_of_other_weights_or_another_attack_replaces_it_whole():
    """The same row name with other weights (or another attack) in a later file is another model:
    its earlier datasets are dropped with a warning, never shown under the new weights."""
    from mmtard.results import merge_results

    first = _results({"m": _row({"cifar10": _dataset(10.0, [5.0, 4.0, 3.0]), "dtd": _dataset(40.0, [9.0, 8.0, 7.0])},
                                weights="old.safetensors")})
    newer = _results({"m": _row({"cifar10": _dataset(20.0, [6.0, 5.0, 4.0])}, weights="new.safetensors")})
    merged = merge_results([first, newer])
    assert merged["models"]["m"]["weights"] == "new.safetensors"
    assert set(merged["models"]["m"]["datasets"]) == {"cifar10"} and merged["models"]["m"]["average"]["clean"] == 20.0
    assert any("earlier results on cifar10, dtd are dropped" in w for w in merged["warnings"])
    pgd = _results({"m": _row({"dtd": _dataset(30.0, [9.0, 8.0, 7.0])}, weights="new.safetensors")})
    pgd["attack"] = {**pgd["attack"], "name": "pgd", "iterations": 10}
    merged = merge_results([newer, pgd])
    assert set(merged["models"]["m"]["datasets"]) == {"dtd"} and merged["models"]["m"]["attack"]["name"] == "pgd"
    same = merge_results([newer, _results({"m": _row({"dtd": _dataset(30.0, [9.0, 8.0, 7.0])},
                                                      weights="new.safetensors")})])
    assert set(same["models"]["m"]["datasets"]) == {"cifar10", "dtd"}  # same model and attack: one row


def test_training_runs_with_the_same_folder_name_get_a_figure_each(inputs, tmp_path):
    import shutil

    runs = [tmp_path / "a" / "seed0", tmp_path / "b" / "seed0"]
    for run in runs:
        shutil.copytree(inputs[2], run)
    text = run_report(runs, tmp_path / "out").read_text()
    assert "training_seed0-1.png" in text and "training_seed0-2.png" in text
    assert f"### seed0 ({runs[0]})" in text and f"### seed0 ({runs[1]})" in text


def test_l2_radii_are_plotted_as_they_are(tmp_path, monkeypatch):
    import matplotlib.figure

    from mmtard.report import plot_accuracy_vs_eps

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    ds = {"set": {"n": 10, "clean": 50.0, "robust": {"0.5": 20.0}, "kind": "zeroshot"}}
    for norm, expected in (("l2", ([0.0, 0.5], "eps")), ("linf", ([0.0, 127.5], "eps (x/255)"))):
        plot_accuracy_vs_eps({"m": {"attack": {"norm": norm}, "datasets": ds, "average": {}}}, tmp_path / "f.png")
        ax = figures[-1].axes[0]
        assert (list(ax.lines[0].get_xdata()), ax.get_xlabel()) == expected


def test_the_attack_line_follows_the_rows_not_the_first_files_header(tmp_path):
    """A merge keeps the first file's top-level attack; the report describes the rows' own."""
    pgd = {"name": "pgd", "attacks": ["pgd"], "iterations": 10, "norm": "linf", "version": "mmtard-pgd-any"}
    results = _results({"m": _row({"cifar10": _dataset(80.0, [60.0, 45.0, 25.0])}, attack=pgd)})
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = run_report([tmp_path / "results.json"], tmp_path / "out").read_text()
    assert "Attack: pgd (pgd), 10 iterations, norm linf, version mmtard-pgd-any" in text
    apgd = dict(results["attack"])
    results["models"]["n"] = _row({"cifar10": _dataset(80.0, [60.0, 45.0, 25.0])}, attack=apgd)
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert "Attack: per row" in run_report([tmp_path / "results.json"], tmp_path / "out2").read_text()


def test_a_metrics_file_cut_inside_a_quote_plots_up_to_there(inputs, caplog):
    from mmtard.report import read_metrics

    with open(inputs[2] / "metrics.csv", "a") as handle:
        handle.write('21,"0.5\n' + "x" * 200_000 + "\n")  # an unclosed quote: one field to the end
    with caplog.at_level("WARNING"):
        series = read_metrics(inputs[2])
    assert len(series["loss"]) == 20 and "is damaged" in caplog.text
