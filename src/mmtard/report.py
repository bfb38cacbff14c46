"""Markdown report with figures from results.json files and training run folders.

``run_report`` takes any mix of results folders, results.json files and training run folders
(those holding ``metrics.csv``, and possibly a results.json of their own) and writes
``report.md`` beside PNG figures: one accuracy table per eps, accuracy-vs-eps curves, a
clean-vs-robust scatter of all models, and training curves per run. The sanity checks of
:func:`mmtard.results.sanity_checks` are logged and written into the report; a failed check is
flagged, never fatal.

Figures use matplotlib's object API on the Agg canvas, so no global backend is touched.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Sequence

from mmtard.checkpoint import atomic_write_text
from mmtard.errors import DataError
from mmtard.results import RESULTS_NAME, eps_value, merge_results, now_iso, sanity_checks, sorted_eps

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.csv"
REPORT_NAME = "report.md"


# ----------------------------------------------------------------------------- inputs
def _classify_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """Split inputs into results files and training run folders (a folder may be both)."""
    results, runs = [], []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix == ".json":
            results.append(path)
        elif path.is_file() and path.name == METRICS_NAME:
            runs.append(path.parent)
        elif path.is_dir():
            found = False
            if (path / RESULTS_NAME).is_file():
                results.append(path / RESULTS_NAME)
                found = True
            if (path / METRICS_NAME).is_file():
                runs.append(path)
                found = True
            if not found:
                raise DataError(f"{path} holds neither {RESULTS_NAME} nor {METRICS_NAME}")
        else:
            problem = "is not a results.json file or a folder" if path.exists() else "does not exist"
            raise DataError(
                f"report input {path} {problem} (give results folders, results.json files or run folders)"
            )
    return results, runs


def read_metrics(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    """Numeric columns of a run's metrics.csv as (step, value) series; blank cells skipped."""
    series: dict[str, list[tuple[float, float]]] = {}
    # undecodable bytes (a damaged file) read as U+FFFD: their cells parse as no number and are skipped
    path = run_dir / METRICS_NAME
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.DictReader(handle)
        try:
            for i, row in enumerate(reader):
                step = _number(row.get("step")) if "step" in row else float(i)
                if step is None:  # a damaged row: its values belong to no known step
                    continue
                for key, text in row.items():
                    value = _number(text)
                    if key and key != "step" and value is not None:
                        series.setdefault(key, []).append((step, value))
        except csv.Error as exc:  # e.g. an unclosed quote: the rest of the file is one broken field
            log.warning("%s: line %d is damaged (%s); the curves stop there", path, reader.line_num, exc)
    return series


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------- tables
def _fmt(value) -> str:
    return "–" if value is None else f"{value:.1f}"


def _row_summary(entry: dict) -> dict:
    """Zero-shot average when the row has zero-shot sets, else the mean over all its sets."""
    avg = entry.get("average") or {}
    if avg.get("datasets"):
        return {"clean": avg.get("clean"), "robust": dict(avg.get("robust", {})), "label": "zero-shot avg"}
    sets = list(entry["datasets"].values())
    if not sets:
        return {"clean": None, "robust": {}, "label": "mean"}
    common = set.intersection(*(set(d["robust"]) for d in sets))
    return {
        "clean": sum(d["clean"] for d in sets) / len(sets),
        "robust": {e: sum(d["robust"][e] for d in sets) / len(sets) for e in common},
        "label": "mean",
    }


def _datasets_of(models: dict) -> list[str]:
    names: list[str] = []
    for entry in models.values():
        names += [n for n in entry["datasets"] if n not in names]
    kind = {n: e["datasets"][n].get("kind", "zeroshot") for e in models.values() for n in e["datasets"]}
    return sorted(names, key=lambda n: (kind[n] != "classification", n))  # classification sets first


def eps_table(models: dict, eps: str) -> str:
    """Markdown table at one eps: clean and robust per dataset, then the average.

    An average taken over fewer sets than the other rows' (zero-shot sets for a zero-shot
    average, all sets for a plain mean) is starred: it is not comparable with theirs. A set
    evaluated on different numbers of images in different rows is marked (†) with the numbers;
    otherwise each set's number of images is listed under the table.
    """
    names = _datasets_of(models)
    attacks = {row: _attack_label(entry.get("attack", {})) for row, entry in models.items()}
    show_attack = len(set(attacks.values())) > 1  # rows attacked differently say so in the table
    head = (["model"] + (["attack"] if show_attack else []) + [f"{n} {c}" for n in names for c in ("clean", eps)]
            + ["avg clean", f"avg {eps}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    zeroshot = {n for e in models.values() for n, d in e["datasets"].items() if d.get("kind", "zeroshot") == "zeroshot"}
    summaries = {row: _row_summary(entry) for row, entry in models.items()}
    mixed_labels = len({summary["label"] for summary in summaries.values()}) > 1
    sizes = {n: {row: e["datasets"][n].get("n") for row, e in models.items() if n in e["datasets"]} for n in names}
    uneven = [n for n in names if len(set(sizes[n].values())) > 1]
    partial, means = [], []
    for row, entry in models.items():
        cells = [row] + ([attacks[row]] if show_attack else [])
        for n in names:
            ds = entry["datasets"].get(n, {})
            dagger = "†" if n in uneven and ds else ""
            cells += [_fmt(ds.get("clean")) + dagger, _fmt(ds.get("robust", {}).get(eps)) + dagger]
        summary = summaries[row]
        mark = ""
        if summary["label"] == "zero-shot avg" and set(entry["average"]["datasets"]) != zeroshot:
            mark = "*"
            partial.append(f"{row}: {', '.join(entry['average']['datasets'])}")
        elif summary["label"] == "mean":
            if set(entry["datasets"]) != set(names):
                mark = "*"
                partial.append(f"{row}: {', '.join(entry['datasets'])}")
            if mixed_labels:
                mark += "°"
                means.append(row)
        cells += [_fmt(summary["clean"]) + mark, _fmt(summary["robust"].get(eps)) + mark]
        lines.append("| " + " | ".join(cells) + " |")
    if partial:
        lines += ["", "\\* average over fewer sets than the other rows' (" + "; ".join(partial) + ")"]
    if means:
        lines += ["", f"° no zero-shot set: mean over all of the row's sets, not comparable ({', '.join(means)})"]
    for n in uneven:
        lines += ["", f"† {n}: rows evaluated on different numbers of images ("
                  + ", ".join(f"{row} {size}" for row, size in sizes[n].items()) + ")"]
    even = [f"{n} {next(iter(sizes[n].values()))}" for n in names if n not in uneven and sizes[n]]
    if even:
        lines += ["", "Images per set: " + ", ".join(even) + "."]
    return "\n".join(lines)


def _attack_label(attack: dict) -> str:
    """A row's attack for the table, every setting that changes its strength:
    ``apgd/100it/linf/9t/1r`` (name, iterations, norm, target classes, restarts)."""
    if not attack:
        return "?"
    return (f"{attack.get('name', '?')}/{attack.get('iterations', '?')}it/{attack.get('norm', '?')}"
            f"/{attack.get('n_target_classes', '-')}t/{attack.get('restarts', '-')}r")


# ----------------------------------------------------------------------------- figures
def _figure(n_panels: int, width: float = 4.0, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _colors(models: dict) -> dict:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(models) <= 10 else "tab20"]
    return {row: cmap(i % cmap.N) for i, row in enumerate(models)}


def plot_accuracy_vs_eps(models: dict, path: Path) -> Path:
    """One panel per dataset plus the average; one line per model; eps 0 is clean accuracy."""
    names = _datasets_of(models)
    colors = _colors(models)
    linf = all(entry.get("attack", {}).get("norm", "linf") == "linf" for entry in models.values())
    scale, xlabel = (255, "eps (x/255)") if linf else (1, "eps")  # L2 radii are not read in 1/255 units
    fig, axes = _figure(len(names) + 1)
    for ax, name in zip(axes, names + ["average"]):
        for row, entry in models.items():
            point = _row_summary(entry) if name == "average" else entry["datasets"].get(name)
            if not point or point.get("clean") is None:
                continue
            keys = sorted_eps(point["robust"])
            xs = [0.0] + [eps_value(k) * scale for k in keys]
            ax.plot(xs, [point["clean"]] + [point["robust"][k] for k in keys], marker="o", label=row, color=colors[row])
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    _legend(fig, colors)
    fig.savefig(path, dpi=100)
    return path


def _legend(fig, colors: dict) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", label=row) for row, c in colors.items()]
    fig.legend(handles=handles, loc="outside right upper", fontsize="small")


def plot_clean_vs_robust(models: dict, path: Path) -> Path:
    """Average clean vs average robust accuracy of every model, one panel per eps."""
    eps = sorted_eps(k for e in models.values() for k in _row_summary(e)["robust"])
    colors = _colors(models)
    fig, axes = _figure(max(len(eps), 1), width=4.2, height=4.0)
    for ax, key in zip(axes, eps or [None]):
        for row, entry in models.items():
            summary = _row_summary(entry)
            if key is None or summary["clean"] is None or key not in summary["robust"]:
                continue
            ax.scatter([summary["clean"]], [summary["robust"][key]], color=colors[row])
            ax.annotate(row, (summary["clean"], summary["robust"][key]), fontsize="small",
                        xytext=(3, 3), textcoords="offset points")
        ax.plot([0, 100], [0, 100], color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"robust accuracy at {key} (%)" if key else "robust accuracy (%)")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def plot_training(series: dict[str, list[tuple[float, float]]], title: str, path: Path) -> Path:
    """Loss terms, accuracies and learning rate of one training run against the step."""
    groups = {
        "loss": sorted(k for k in series if k == "loss" or k.startswith("loss_")),
        "accuracy": sorted(k for k in series if "acc" in k),
        "learning rate": [k for k in ("lr",) if k in series],
    }
    groups = {name: keys for name, keys in groups.items() if keys}
    if not groups:
        raise DataError(f"{title}: metrics.csv has no loss, accuracy or lr column")
    fig, axes = _figure(len(groups))
    for ax, (name, keys) in zip(axes, groups.items()):
        for key in keys:
            steps, values = zip(*series[key])
            ax.plot(steps, values, label=key)
        ax.set_title(f"{title}: {name}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------- the report
def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _results_section(results: dict, out_dir: Path) -> list[str]:
    models = results["models"]
    # the rows' own attacks: a merge keeps the first file's top-level one even where later files
    # replaced every row with another attack
    by_label = {_attack_label(a) + f"/{a.get('version')}": a
                for a in (entry.get("attack") or results.get("attack", {}) for entry in models.values())}
    if len(by_label) <= 1:
        attack = next(iter(by_label.values()), results.get("attack", {}))
        described = (f"Attack: {attack.get('name', '?')} ({', '.join(attack.get('attacks', []))}), "
                     f"{attack.get('iterations', '?')} iterations, norm {attack.get('norm', '?')}, "
                     f"version {attack.get('version', '?')}")
    else:
        described = "Attack: per row (the tables' attack column; details in results.json)"
    lines = ["## Accuracy (%)", "", f"{described}; n per dataset in results.json.", ""]
    all_eps = sorted_eps(k for e in models.values() for d in e["datasets"].values() for k in d["robust"])
    for key in all_eps:
        lines += [f"### eps = {key}", "", eps_table(models, key), ""]
    if not all_eps:
        lines += ["(no robust accuracy in the inputs)", ""]
    curves = plot_accuracy_vs_eps(models, out_dir / "accuracy_vs_eps.png")
    scatter = plot_clean_vs_robust(models, out_dir / "clean_vs_robust.png")
    lines += ["## Figures", "", f"![accuracy vs eps]({curves.name})", "", f"![clean vs robust]({scatter.name})", ""]
    return lines


def _sanity_section(results: dict | None, notes: list[str]) -> list[str]:
    lines = ["## Sanity checks", ""]
    flags = sanity_checks(results) if results else []
    for flag in flags:
        log.warning("sanity: %s", flag["message"])
    if results is None:
        lines.append("(no results given)")
    elif not flags:
        lines.append(
            "All passed: robust <= clean, robust non-increasing in eps, undefended models near zero at the largest eps."
        )
    else:
        lines += [f"- **{f['check']}**: {f['message']}" for f in flags]
    warnings = (results or {}).get("warnings", []) + notes
    if warnings:
        lines += ["", "### Warnings (evaluation, AutoAttack checks, inputs)", ""] + [f"- {w}" for w in warnings]
    return lines + [""]


def run_report(inputs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write ``out_dir/report.md`` and its figures; return the report's path.

    Args:
        inputs: results folders, results.json files and/or training run folders (metrics.csv).
        out_dir: where the report and PNGs go (created).
    """
    if not inputs:
        raise DataError("run_report needs at least one input (results folder/file or run folder)")
    result_files, runs = _classify_inputs(inputs)
    results = merge_results(result_files) if result_files else None
    out_dir = Path(out_dir)  # made only once the inputs are read: a refusal leaves nothing behind
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# mmtard report", "", f"Created {now_iso()} from: " + ", ".join(str(Path(p)) for p in inputs), ""]
    if results is not None:
        lines += _results_section(results, out_dir)
    notes: list[str] = []
    if runs:
        lines += ["## Training", ""]
        names = [_safe_name(run.resolve().name) for run in runs]
        for index, (run, name) in enumerate(zip(runs, names)):
            heading = run.name
            if names.count(name) > 1:  # runs/a/seed0 and runs/b/seed0: a figure and a heading each
                name, heading = f"{name}-{index + 1}", f"{run.name} ({run})"
            try:
                figure = plot_training(read_metrics(run), run.name, out_dir / f"training_{name}.png")
            except DataError as exc:
                notes.append(str(exc))
                continue
            lines += [f"### {heading}", "", f"![training {heading}]({figure.name})", ""]
    lines += _sanity_section(results, notes)
    path = atomic_write_text("\n".join(lines), out_dir / REPORT_NAME)
    log.info("report written to %s", path)
    return path
