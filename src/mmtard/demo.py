"""``mmtard demo``: the whole method end to end on the offline world, on a CPU, in minutes.

Stages, each reused when the demo is re-run on the same folder:
1. generate the offline world;
2. pre-train two tiny CLIPs contrastively on its captions (teachers' base, students' base);
3. train the clean teacher (clean_ft) and the robust teacher (PMG-AFT) from the teachers' base;
4. distil students from the students' base with every method, same attack budget and steps,
   plus the MMT-ARD ablations (METHOD.md §4);
5. evaluate every model, clean and AutoAttack (APGD-CE with its restarts + APGD-T) at two eps, on the
   classification split and the world's zero-shot sets; robust accuracy of mmt_ard and ard at
   intermediate checkpoints for the efficiency comparison;
6. write results.json, report.md with figures, and print the table.

Every stage's resolved config is written to ``DIR/configs/NAME.yaml``, so
``mmtard distill --config DIR/configs/mmt_ard_paper.yaml --out OTHER`` replays one stage.
The numbers compare rows within this small world; they are not ImageNet results.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mmtard import checkpoint as ckpt
from mmtard.config import (AttackConfig, Config, DataConfig, MethodConfig, ModelConfig, TeacherConfig,
                           TrainConfig, load_config, save_config)
from mmtard.errors import MmtardError
from mmtard.pretrain import PretrainConfig, pretrain_clip
from mmtard.results import MODEL_FORWARD, write_json_atomic

log = logging.getLogger(__name__)

STUDENT_ARCH, TEACHER_ARCH = "mmtard-tiny-vit", "mmtard-small-vit"
MARKER = "demo.json"


@dataclass(frozen=True)
class DemoPlan:
    """Every size of the demo in one place; chosen once on the world's validation data.

    The world's classes are colours, which survive small perturbations better than ImageNet
    features do, so the demo trains and evaluates at larger radii (8/255) than the paper (2/255).
    """

    world_size: str = "demo"
    pretrain_steps: int = 400
    pretrain_batch: int = 128
    teacher_steps: int = 250
    student_steps: int = 150
    batch: int = 32
    lr: float = 5e-4
    attack_steps: int = 5
    train_eps: str = "8/255"
    train_step: str = "2/255"
    eval_eps: tuple[str, ...] = ("4/255", "8/255")
    eval_iterations: int = 10
    eval_restarts: int = 5  # APGD-CE's, as AutoAttack's custom version (the paper's protocol)
    eval_samples: int = 100
    efficiency_points: int = 3
    ablations: bool = True


FULL = DemoPlan()
QUICK = DemoPlan(world_size="quick", pretrain_steps=100, pretrain_batch=64, teacher_steps=30, student_steps=24,
                 attack_steps=3, train_step="3/255", eval_samples=32, eval_restarts=1, efficiency_points=2,
                 ablations=False)  # a smoke test: one APGD-CE restart keeps it near 2 minutes

# Students: row name -> method settings. Same attack budget and steps for all.
STUDENTS: dict[str, dict] = {
    "mmt_ard_paper": {"name": "mmt_ard", "recipe": "paper"},
    "mmt_ard_release": {"name": "mmt_ard", "recipe": "release"},
    "ard": {"name": "ard"},
    "tecoa": {"name": "tecoa"},
    "fare": {"name": "fare"},
    "pmg_aft": {"name": "pmg_aft"},
    "mtard": {"name": "mtard"},
}
ABLATIONS: dict[str, dict] = {
    "ablation_no_confidence": {"name": "mmt_ard", "recipe": "paper", "use_confidence": False},
    "ablation_no_balance": {"name": "mmt_ard", "recipe": "paper", "use_balance": False},
    "ablation_no_clean_stream": {"name": "mmt_ard", "recipe": "paper", "use_clean": False},
}


def _check_out_dir(out: Path) -> None:
    """Refuse before any work: a folder we cannot write, or one another command filled."""
    if out.exists() and not out.is_dir():
        raise MmtardError(f"demo folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise MmtardError(f"{out} is not empty and was not made by `mmtard demo`; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as exc:
        raise MmtardError(f"cannot write to demo folder {out}: {exc.strerror or exc}") from exc


def _stage(name: str) -> None:
    log.info("=== %s ===", name)


def _train_config(plan: DemoPlan, world: Path, arch: str, weights: Path, method: dict,
                  teachers: list[TeacherConfig], seed: int, steps: int, adversarial: bool = True) -> Config:
    return Config(
        student=ModelConfig(arch, str(weights)),
        teachers=teachers,
        data=DataConfig(source="world", root=str(world), templates=["a photo of a {}."]),
        attack=AttackConfig(eps=plan.train_eps, step_size=plan.train_step, steps=plan.attack_steps if adversarial else 0),
        method=MethodConfig(**method),
        train=TrainConfig(steps=steps, global_batch=plan.batch, lr=plan.lr, warmup_frac=0.1, seed=seed,
                          log_every=max(1, steps // 10), ckpt_every=-(-steps // plan.efficiency_points),
                          keep_checkpoints=plan.efficiency_points, device="cpu"),
    )


def _run_stage(out: Path, name: str, config: Config, show_progress: bool = True) -> Path:
    """Write the stage's config, train it unless already finished, return the exported student."""
    from mmtard.trainer import STUDENT_FILE, train

    config_path = out / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    save_config(config, config_path)
    run_dir = out / "runs" / name
    if (run_dir / STUDENT_FILE).exists():
        log.info("%s: finished earlier, reused", name)
        return run_dir / STUDENT_FILE
    _stage(f"train {name}")
    return train(load_config(config_path), run_dir, show_progress=show_progress)


def _checkpoint_students(out: Path, name: str) -> list[tuple[int, float, Path]]:
    """Export the student of each kept checkpoint of a run, for robust accuracy against steps and
    wall time (the paper's efficiency claim)."""
    from mmtard.factory import build_student
    from mmtard.lora import merged_copy
    from mmtard.models import export_open_clip
    from mmtard.trainer import load_student_weights

    run_dir = out / "runs" / name
    config = load_config(run_dir / "config.yaml")
    points = []
    for step, path in ckpt.list_checkpoints(run_dir):
        target = run_dir / "exported" / f"step_{step:08d}.safetensors"
        state = ckpt.load_checkpoint(path)
        if not target.exists():
            student, _ = build_student(config, ["x"], torch.device("cpu"))
            load_student_weights(student, state["student"], path)
            export_open_clip(merged_copy(student.clip), target)
        points.append((step, float(state.get("elapsed", 0.0)), target))
    return points


def run_demo(out: Path, quick: bool = False, seeds: int = 1, show_progress: bool = True) -> dict:
    """Run (or resume) the demo in ``out``; returns the results dict. ``show_progress=False``
    (``mmtard -q demo``) silences the stages' progress bars."""
    from mmtard.world import generate_world, load_world

    # absolute: the stage configs and evaluation records store paths under it, and a resume must
    # find the same ones whether --out is given relative or absolute, or from another working
    # folder (symbolic links are kept, as an absolute --out always kept them)
    out = Path(os.path.abspath(Path(out).expanduser()))
    if seeds < 1:  # before anything is created
        raise MmtardError("--seeds must be >= 1")
    _check_out_dir(out)
    plan = QUICK if quick else FULL
    marker = out / MARKER
    if marker.exists():
        try:
            previous = json.loads(marker.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            previous = f"{type(exc).__name__}: {exc}"
        if not isinstance(previous, dict):
            raise MmtardError(f"{marker} is damaged ({str(previous)[:100]}); delete it to resume this demo, or use "
                              "another --out")
        if previous.get("forward", 1) != MODEL_FORWARD:
            raise MmtardError(f"{out} holds a demo made by an older mmtard, whose models ran differently (before "
                              "QuickGELU for OpenAI-derived weights and the release's bicubic resize); its stages "
                              "cannot be reused. Use another --out")
        old_plan = previous.get("plan")
        if old_plan != _plan_dict(plan):
            if isinstance(old_plan, dict):
                differ = ", ".join(f"{k}: {old_plan.get(k)} there, {v} here" for k, v in _plan_dict(plan).items()
                                   if old_plan.get(k) != v)
            else:
                differ = "its plan is unreadable"
            raise MmtardError(f"{out} holds a demo of another plan ({differ}); use another --out "
                              "(or the same --quick as that run)")
    write_json_atomic({"plan": _plan_dict(plan), "seeds": seeds, "forward": MODEL_FORWARD}, marker)
    started = time.perf_counter()

    _stage("1. offline world")
    world_dir = out / "world"
    if not (world_dir / "world.json").exists():
        generate_world(world_dir, seed=0, size=plan.world_size)
    world = load_world(world_dir)

    _stage("2. contrastive pre-training of the tiny CLIPs")
    captions = world.captions()
    student_base = pretrain_clip(captions, PretrainConfig(STUDENT_ARCH, plan.pretrain_steps, plan.pretrain_batch),
                                 out / "pretrained" / "student_base.safetensors", show_progress=show_progress)
    teacher_base = pretrain_clip(captions, PretrainConfig(TEACHER_ARCH, plan.pretrain_steps, plan.pretrain_batch),
                                 out / "pretrained" / "teacher_base.safetensors", show_progress=show_progress)

    _stage("3. teachers")
    clean_teacher = _run_stage(out, "clean_teacher", _train_config(
        plan, world_dir, TEACHER_ARCH, teacher_base, {"name": "clean_ft"}, [], 0, plan.teacher_steps, adversarial=False),
        show_progress)
    robust_teacher = _run_stage(out, "robust_teacher", _train_config(
        plan, world_dir, TEACHER_ARCH, teacher_base, {"name": "pmg_aft"}, [], 0, plan.teacher_steps), show_progress)
    teachers = [TeacherConfig(TEACHER_ARCH, str(clean_teacher), "clean"),
                TeacherConfig(TEACHER_ARCH, str(robust_teacher), "robust")]

    _stage("4. students")
    students: dict[str, list[Path]] = {}
    for seed in range(seeds):
        for row, method in {**STUDENTS, **(ABLATIONS if seed == 0 and plan.ablations else {})}.items():
            name = row if seed == 0 else f"{row}-seed{seed}"
            roles = {"ard": ["robust"], "mmt_ard": ["clean", "robust"], "mtard": ["clean", "robust"]}
            wanted = roles.get(method["name"], [])
            config = _train_config(plan, world_dir, STUDENT_ARCH, student_base, method,
                                   [t for t in teachers if t.role in wanted], seed, plan.student_steps)
            students.setdefault(row, []).append(_run_stage(out, name, config, show_progress))

    _stage("5. evaluation")
    results = _evaluate(out, plan, world_dir, student_base, clean_teacher, robust_teacher, students, show_progress)
    _stage("6. report")
    report = _report(out, plan, results, students, seeds, time.perf_counter() - started)
    print(_table_text(results, plan))
    print(f"\nreport: {report}\nresults: {out / 'results.json'}")
    return results


def _plan_dict(plan: DemoPlan) -> dict:
    return json.loads(json.dumps(asdict(plan)))


def _evaluate(out: Path, plan: DemoPlan, world_dir: Path, student_base: Path, clean_teacher: Path,
              robust_teacher: Path, students: dict[str, list[Path]], show_progress: bool = True) -> dict:
    from mmtard.autoattack import AttackSpec
    from mmtard.eval_sets import world_datasets
    from mmtard.evaluate import ModelEntry, run_eval

    models = [ModelEntry("undefended", STUDENT_ARCH, str(student_base), undefended=True),
              ModelEntry("clean_teacher", TEACHER_ARCH, str(clean_teacher)),
              ModelEntry("robust_teacher", TEACHER_ARCH, str(robust_teacher))]
    for row, files in students.items():
        for i, path in enumerate(files):
            models.append(ModelEntry(row if i == 0 else f"{row}-seed{i}", STUDENT_ARCH, str(path)))
    spec = AttackSpec(name="apgd", iterations=plan.eval_iterations, n_target_classes=3, restarts=plan.eval_restarts)
    datasets = world_datasets(world_dir)
    results = run_eval(models, datasets, list(plan.eval_eps), attack=spec, n_samples=plan.eval_samples,
                       batch_size=100, out_dir=out / "eval", seed=0, device="cpu", progress=show_progress)
    # eval/results.json keeps the rows of an earlier run with more --seeds (their work is not lost
    # if those seeds come back); this run reports its own rows only
    results = _only_rows(results, {m.row for m in models})
    efficiency = []
    for row in ("mmt_ard_paper", "ard"):
        for step, elapsed, path in _checkpoint_students(out, row):
            efficiency.append((row, step, elapsed, ModelEntry(f"{row}@{step}", STUDENT_ARCH, str(path))))
    eff_results = run_eval([e[3] for e in efficiency], [d for d in datasets if d.name == "world"],
                           [plan.eval_eps[-1]], attack=spec, n_samples=plan.eval_samples, batch_size=100,
                           out_dir=out / "eval_efficiency", seed=0, device="cpu", progress=show_progress)
    results["efficiency"] = [
        {"row": row, "step": step, "elapsed_s": elapsed,
         "robust": eff_results["models"][entry.row]["datasets"]["world"]["robust"][plan.eval_eps[-1]]}
        for row, step, elapsed, entry in efficiency
    ]
    return results


def _only_rows(results: dict, rows: set[str]) -> dict:
    """``results`` with only the rows ``rows`` (sanity checks recomputed)."""
    from mmtard.results import sanity_checks

    kept = dict(results, models={row: entry for row, entry in results["models"].items() if row in rows})
    kept["sanity"] = sanity_checks(kept)
    return kept


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value  # an accuracy of 0.0 is a number


def _table_text(results: dict, plan: DemoPlan) -> str:
    """A plain-text table of the main rows (mean over seeds where several)."""
    eps = plan.eval_eps[-1]
    lines = [f"{'row':<26} {'world clean':>12} {'world ' + eps:>14} {'zero-shot clean':>16} {'zero-shot ' + eps:>16}"]
    for row, data in results["models"].items():
        if "-seed" in row or "@" in row:
            continue
        world = data["datasets"].get("world", {})
        avg = data.get("average", {})
        lines.append(f"{row:<26} {world.get('clean', float('nan')):>12.1f} {world.get('robust', {}).get(eps, float('nan')):>14.1f} "
                     f"{_or_nan(avg.get('clean')):>16.1f} {(avg.get('robust') or {}).get(eps, float('nan')):>16.1f}")
    return "\n".join(lines)


def _report(out: Path, plan: DemoPlan, results: dict, students: dict[str, list[Path]], seeds: int,
            seconds: float) -> Path:
    from mmtard.report import run_report

    runs = [out / "runs" / name for name in ("clean_teacher", "robust_teacher", "mmt_ard_paper", "ard")]
    # this run's rows (not eval/results.json, which may keep an earlier run's extra seeds)
    merged = dict(results, demo={"plan": _plan_dict(plan), "seeds": seeds, "seconds": round(seconds, 1)})
    if seeds > 1:
        merged["seed_summary"] = _seed_summary(results, students, plan)
    write_json_atomic(merged, out / "results.json")
    report = run_report([out / "results.json", *runs], out)
    summary = _demo_section(plan, results, students, seeds, seconds, out)
    text = report.read_text()
    ckpt.atomic_write_text(summary + "\n" + text, report)
    return report


def _row_figures(model: dict, plan: DemoPlan) -> dict[str, float | None]:
    """The figures one table row shows: classification clean/robust and the zero-shot average."""
    world, average = model["datasets"]["world"], model.get("average") or {}
    eps = plan.eval_eps[-1]
    figures = {"world clean": world["clean"]}
    figures.update({f"world {e}": world["robust"][e] for e in plan.eval_eps})
    figures["zero-shot clean"] = average.get("clean")
    figures[f"zero-shot {eps}"] = (average.get("robust") or {}).get(eps)
    return figures


def _seed_summary(results: dict, students: dict[str, list[Path]], plan: DemoPlan) -> dict:
    """Per row: {figure: (mean, std, number of seeds)}; rows trained once have one seed."""
    models = results["models"]
    groups = {row: [row] for row in ("undefended", "clean_teacher", "robust_teacher")}
    groups.update({row: [row] + [f"{row}-seed{i}" for i in range(1, len(files))] for row, files in students.items()})
    summary = {}
    for row, names in groups.items():
        per = [_row_figures(models[n], plan) for n in names if n in models]
        if not per:
            continue
        summary[row] = {}
        for key in per[0]:
            values = [p[key] for p in per if p[key] is not None]
            mean, std = _mean_std(values) if values else (float("nan"), 0.0)
            summary[row][key] = (mean, std, len(values))
    return summary


def _format_mean_std(mean: float, std: float, n: int) -> str:
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def _demo_section(plan: DemoPlan, results: dict, students: dict[str, list[Path]], seeds: int, seconds: float,
                  out: Path) -> str:
    eps = plan.eval_eps[-1]
    lines = [
        "# mmtard demo", "",
        "These numbers compare rows **within a small generated world** (24 drawn classes, "
        f"{STUDENT_ARCH} students, {TEACHER_ARCH} teachers, all pre-trained here). They are not ImageNet results.", "",
        f"Plan: {json.dumps(_plan_dict(plan))}; seeds: {seeds}; wall time {seconds:.0f} s.", "",
        f"Evaluation: AutoAttack APGD-CE ({plan.eval_restarts} restarts) + APGD-T (3 target classes), "
        f"{plan.eval_iterations} iterations each, "
        f"at {', '.join(plan.eval_eps)}, {plan.eval_samples} samples per set.", "",
    ]
    if seeds > 1:
        summary = _seed_summary(results, students, plan)
        keys = list(next(iter(summary.values())).keys())
        lines += [f"## Mean ± std over {seeds} seeds of the students' training", "",
                  "The base models, the teachers and the ablations are trained once (no ±).", "",
                  "| row | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for row, entry in summary.items():
            lines.append(f"| {row} | " + " | ".join(_format_mean_std(*v) for v in entry.values()) + " |")
        lines.append("")
    if not plan.ablations:
        lines += ["The ablations of the MMT-ARD switches run in the full demo (without --quick).", ""]
    lines += ["## Ablation of the MMT-ARD switches (METHOD.md §4)", "",
              f"| row | world clean | world robust {eps} | zero-shot avg clean | zero-shot avg robust {eps} |",
              "|---|---|---|---|---|"]
    for row in ["mmt_ard_paper", *ABLATIONS]:
        data = results["models"].get(row)
        if data:
            world, avg = data["datasets"]["world"], data.get("average", {})
            lines.append(f"| {row} | {world['clean']:.1f} | {world['robust'][eps]:.1f} | "
                         f"{_fmt(avg.get('clean'))} | {_fmt((avg.get('robust') or {}).get(eps))} |")
    lines += ["", "## Training efficiency: robust accuracy against steps and wall time", "",
              f"| row | step | training wall time (s) | world robust {eps} |", "|---|---|---|---|"]
    for point in results["efficiency"]:
        lines.append(f"| {point['row']} | {point['step']} | {point['elapsed_s']:.1f} | {point['robust']:.1f} |")
    figure = _plot_efficiency(results["efficiency"], out / "efficiency.png", eps)
    lines += ["", f"![efficiency]({figure.name})", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _plot_efficiency(points: list[dict], path: Path, eps: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for row in sorted({p["row"] for p in points}):
        mine = sorted((p for p in points if p["row"] == row), key=lambda p: p["step"])
        axes[0].plot([p["step"] for p in mine], [p["robust"] for p in mine], marker="o", label=row)
        axes[1].plot([p["elapsed_s"] for p in mine], [p["robust"] for p in mine], marker="o", label=row)
    axes[0].set_xlabel("training step")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel(f"robust accuracy at {eps} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
