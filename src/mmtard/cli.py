"""Command line: parse arguments, build a config, call the library. No logic of its own.

    mmtard world --out DIR                      generate the offline world
    mmtard train-teacher --config FILE --out DIR [key=value ...]
    mmtard distill --config FILE --out DIR [key=value ...]
    mmtard eval --model NAME --pretrained FILE ... --dataset world=DIR --out DIR
    mmtard report DIR [DIR ...] --out DIR
    mmtard convert --model NAME --pretrained TAG|FILE [--visual FILE] --out FILE.safetensors
    mmtard demo [--out DIR] [--quick] [--seeds N]

Any refusal on bad input is one line on stderr and exit code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from mmtard.errors import ConfigError, MmtardError

log = logging.getLogger("mmtard")


def _drop_random_init_notice(record: logging.LogRecord) -> bool:
    """open_clip warns for every randomly initialised model; mmtard's tiny models are meant to be,
    any other architecture (a forgotten ``pretrained``) keeps the warning."""
    message = record.getMessage()
    return not ("Model initialized randomly" in message and "'mmtard-" in message)


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--out", required=True, help="run folder: resumed if it holds a checkpoint")
    parser.add_argument("--force", action="store_true", help="overwrite a finished run in --out")
    parser.add_argument("overrides", nargs="*", help="config overrides such as train.lr=1e-5 teachers.0.pretrained=FILE")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmtard", description="Multi-teacher adversarial distillation for robust CLIP.")
    _add_global_args(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the whole method end to end on the offline world (CPU, minutes)")
    demo.add_argument("--out", default="mmtard-demo", help="demo folder (default: ./mmtard-demo)")
    demo.add_argument("--quick", action="store_true", help="a 2-minute version for smoke tests")
    demo.add_argument("--seeds", type=int, default=1, help="repeat the distillations with N seeds (mean ± std)")

    teacher = sub.add_parser("train-teacher", help="train a clean (clean_ft) or robust (tecoa/fare/pmg_aft) teacher")
    _add_run_args(teacher)
    distill = sub.add_parser("distill", help="distil a student from teachers (mmt_ard, ard, mtard, ...)")
    _add_run_args(distill)

    ev = sub.add_parser("eval", help="clean and AutoAttack zero-shot accuracy -> results.json")
    ev.add_argument("--model", action="append", default=[], help="open_clip model name (repeatable, pairs with --pretrained)")
    ev.add_argument("--pretrained", action="append", default=[], help="weights for the matching --model: file or tag")
    ev.add_argument("--name", action="append", default=[],
                    help="row names: one per --model, then optionally one per --run (default: the file or folder name)")
    ev.add_argument("--run", action="append", default=[], help="a training run folder (its student is evaluated)")
    ev.add_argument("--dataset", action="append", default=[], required=True,
                    help="NAME=ROOT: imagenet=PATH, world=DIR (all world sets), a clip-benchmark name=ROOT")
    ev.add_argument("--eps", default="1/255,2/255,4/255", help="comma-separated radii (default: %(default)s)")
    ev.add_argument("--attack", default="apgd-ce,apgd-t", help="apgd-ce,apgd-t | standard | pgd (default: %(default)s)")
    ev.add_argument("--iterations", type=int, default=100, help="iterations per attack (default: %(default)s)")
    ev.add_argument("--apgd-ce-restarts", type=int, default=None,
                    help="restarts of APGD-CE (default: 5 for apgd-ce,apgd-t, as AutoAttack's custom version; "
                         "1 for standard)")
    ev.add_argument("--n-samples", type=int, default=None,
                    help="seeded samples per world or zero-shot set (default: all; the paper's protocol: 1000)")
    ev.add_argument("--imagenet-samples", type=int, default=None,
                    help="seeded samples of the ImageNet list (default: all 5 000 of the RobustBench subset)")
    ev.add_argument("--batch-size", type=int, default=64, help="images per attack batch (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the sample subsets and attacks (default: %(default)s)")
    ev.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    ev.add_argument("--out", required=True, help="evaluation folder: resumed if interrupted")

    report = sub.add_parser("report", help="tables and plots from results and training runs")
    report.add_argument("inputs", nargs="+", help="evaluation folders, results.json files or training run folders")
    report.add_argument("--out", required=True, help="report folder: report.md and its figures")

    convert = sub.add_parser("convert", help="another tool's checkpoint (an image encoder alone, e.g. RobustVLM's or "
                             "the MMT-ARD release's) as a full-CLIP safetensors file mmtard loads")
    convert.add_argument("--model", required=True, help="open_clip architecture, e.g. ViT-L-14")
    convert.add_argument("--pretrained", default=None,
                         help="the base model (tag such as openai, or a file): its text encoder and settings")
    convert.add_argument("--visual", default=None,
                         help="image-encoder state dict (.pt/.safetensors) loaded over the base's image encoder")
    convert.add_argument("--lora-alpha", type=float, default=None,
                         help="alpha of a LoRA image encoder, merged as W + (alpha/r) B A (default: r, the release's)")
    convert.add_argument("--out", required=True, help="the full-CLIP .safetensors file to write")

    world = sub.add_parser("world", help="generate the offline world (images, captions, zero-shot sets)")
    world.add_argument("--out", required=True, help="folder to write the world to (replaces a world there)")
    world.add_argument("--seed", type=int, default=0, help="seed of every image and caption (default: %(default)s)")
    world.add_argument("--size", default="demo", choices=["test", "quick", "demo"],
                       help="images per class: test (tiny), quick, demo (default: %(default)s)")
    world.add_argument("--image-size", type=int, default=48, help="side of the square images (default: %(default)s)")
    for command in sub.choices.values():  # also after the command: `mmtard distill --debug ...`
        _add_global_args(command, default=argparse.SUPPRESS)
    return parser


def _add_global_args(parser: argparse.ArgumentParser, default: object) -> None:
    """``--debug`` and ``-q``; a command's copies default to SUPPRESS, so that leaving them out
    after the command keeps what was given before it."""
    parser.add_argument("--debug", action="store_true", default=default, help="show tracebacks for refused input")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="only warnings and errors")


def _cmd_train(args: argparse.Namespace) -> int:
    from mmtard.config import load_config
    from mmtard.methods import TEACHER_METHODS
    from mmtard.trainer import train

    config = load_config(args.config, args.overrides)
    if args.command == "train-teacher" and config.method.name not in TEACHER_METHODS:
        raise ConfigError(f"train-teacher trains with {', '.join(TEACHER_METHODS)}; the config says "
                          f"'{config.method.name}' (use `mmtard distill` for it)")
    path = train(config, args.out, force=args.force, show_progress=not args.quiet)
    if _finish_distributed():
        print(f"student written to {path}")
    return 0


def _finish_distributed() -> bool:
    """Leave the torchrun process group, if any; True on the rank that reports (rank 0)."""
    from mmtard.distributed import current_env, destroy

    is_main = current_env().is_main
    destroy()
    return is_main


def _cmd_world(args: argparse.Namespace) -> int:
    from mmtard.world import main_generate

    summary = main_generate(args.out, seed=args.seed, size=args.size, image_size=args.image_size)
    for key, value in summary.items():
        print(f"{key}: {value}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from mmtard.convert import convert

    if not args.out.endswith(".safetensors"):
        raise ConfigError(f"--out {args.out}: the converted model is written as safetensors; "
                          "end the name in .safetensors")
    path = convert(args.model, args.pretrained, args.out, visual=args.visual, lora_alpha=args.lora_alpha)
    print(f"wrote {path}: use it as pretrained: {path} with the architecture {args.model}")
    return 0


_ATTACKS = {"apgd-ce,apgd-t": "apgd", "apgd": "apgd", "standard": "standard", "pgd": "pgd"}


def _eval_models(args: argparse.Namespace) -> list:
    """--model/--pretrained/--name triplets and --run folders -> table rows."""
    from mmtard.evaluate import ModelEntry

    if len(args.pretrained) not in (0, len(args.model)):
        raise ConfigError("give one --pretrained per --model (or none)")
    named = len(args.model) + len(args.run)
    if len(args.name) not in (0, len(args.model), named):
        raise ConfigError(f"give one --name per --model, or one per --model and then per --run ({named} in all); "
                          f"got {len(args.name)}")
    names = iter(args.name)
    models = []
    weights_of = [args.pretrained[i] if args.pretrained else None for i in range(len(args.model))]
    defaults = [Path(w).stem if w else arch for arch, w in zip(args.model, weights_of)]
    for i, arch in enumerate(args.model):
        default = defaults[i]
        if defaults.count(default) > 1 and default != arch:  # ViT-B-32 and ViT-L-14 both 'openai'
            default = f"{arch}-{default}"
        name = next(names, None) or default
        models.append(ModelEntry(name, arch, weights_of[i], undefended=name == "undefended"))
    for run in map(Path, args.run):
        config, weights = run / "config.yaml", run / "student.safetensors"
        if not (config.is_file() and weights.is_file()):
            raise ConfigError(f"--run {run}: expected a finished run folder with config.yaml and student.safetensors")
        models.append(ModelEntry(next(names, None) or run.name, _run_student_name(config), str(weights)))
    if not models:
        raise ConfigError("give at least one --model or --run")
    rows = [m.row for m in models]
    duplicates = sorted({r for r in rows if rows.count(r) > 1})
    if duplicates:
        raise ConfigError(f"two models would both be row '{duplicates[0]}'; name them with --name (one per --model, "
                          "then one per --run)")
    return models


def _run_student_name(config: Path) -> str:
    """The student architecture a finished run's ``config.yaml`` names (only that key is read, so
    the runs of earlier versions, whose configs may hold retired keys, stay readable)."""
    import yaml

    try:
        data = yaml.safe_load(config.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    student = data.get("student") if isinstance(data, dict) else None
    name = student.get("name") if isinstance(student, dict) else None
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{config}: no student.name, so the run's architecture is unknown")
    return name


def _rows_by_input_size(models: list, specs: list[str]) -> dict[int, list]:
    """The rows grouped by the size ImageNet and the suite's sets of varied image sizes are resized
    to for them: each row's own input size, as CLIP's preprocessing (and the reference evaluation)
    does, so that eps is measured in the pixels the model sees, whatever other rows share the
    command. 224 for a row whose size is not known here (a hub model), with a warning where such
    a set is asked for; one group when no set needs a size."""
    from mmtard.eval_sets import NATIVE_SIZE_SETS
    from mmtard.models import input_size

    names = [spec.partition("=")[0] for spec in specs]
    if not any(n == "imagenet" or (n not in NATIVE_SIZE_SETS and not n.startswith("world")) for n in names):
        return {224: list(models)}
    groups: dict[int, list] = {}
    for model in models:
        size = input_size(model.arch)
        if size is None:
            size = 224
            log.warning("%s: the input size of %s is not known before loading it; ImageNet and the suite's sets of "
                        "varied image sizes are resized to 224 px for it", model.row, model.arch)
        groups.setdefault(size, []).append(model)
    return groups


def _eval_datasets(specs: list[str], image_size: int = 224) -> list:
    """NAME=ROOT arguments -> evaluation sets (imagenet, world, world-<set>, a zero-shot suite
    name); ImageNet and the suite's sets of varied image sizes resized to ``image_size``."""
    from mmtard.data import ZEROSHOT_SUITE
    from mmtard.eval_sets import imagenet_dataset, suite_datasets, world_datasets

    datasets = []
    for spec in specs:
        name, sep, root = spec.partition("=")
        if not sep or not root:
            raise ConfigError(f"--dataset '{spec}': expected NAME=ROOT, e.g. imagenet=/data/imagenet or world=DIR")
        if name == "imagenet":
            datasets.append(imagenet_dataset(root, image_size=image_size))
        elif name == "world":
            datasets.extend(world_datasets(root))
        elif name.startswith("world-"):
            datasets.extend(world_datasets(root, sets=[name]))
        elif name in ZEROSHOT_SUITE:
            datasets.extend(suite_datasets([name], root, variable_size=image_size))
        else:
            raise ConfigError(f"--dataset '{name}' is not one of imagenet, world, world-<set>, "
                              f"{', '.join(ZEROSHOT_SUITE)}")
    return datasets


def _sample_sizes(args: argparse.Namespace, datasets: list) -> dict[str, int | None]:
    """--n-samples for every set but ImageNet, whose 5 000-image list is the protocol itself;
    --imagenet-samples for that one."""
    return {d.name: args.imagenet_samples if d.name == "imagenet" else args.n_samples for d in datasets}


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from mmtard.autoattack import AttackSpec
    from mmtard.distributed import init_distributed, lost_ranks_reported
    from mmtard.evaluate import run_eval
    from mmtard.factory import resolve_device
    from mmtard.report import run_report

    attack = _ATTACKS.get(args.attack.replace(" ", "").lower())
    if attack is None:
        raise ConfigError(f"--attack '{args.attack}' is not one of apgd-ce,apgd-t | standard | pgd")
    device = resolve_device(args.device, "--device")
    env = init_distributed(device.type)  # under torchrun: each rank attacks its share of the batches
    if device.type == "cuda" and env.enabled:
        device = torch.device("cuda", env.local_rank)
    with lost_ranks_reported("run the same command again to resume"):
        spec = AttackSpec(name=attack, iterations=args.iterations, restarts=args.apgd_ce_restarts)
        for image_size, models in _rows_by_input_size(_eval_models(args), args.dataset).items():
            datasets = _eval_datasets(args.dataset, image_size)  # results.json merges the groups' rows
            run_eval(models, datasets, args.eps.split(","), attack=spec, n_samples=_sample_sizes(args, datasets),
                     batch_size=args.batch_size, out_dir=args.out, seed=args.seed, device=str(device),
                     progress=not args.quiet)
    if not _finish_distributed():
        return 0
    report = run_report([Path(args.out)], Path(args.out))
    print(f"results written to {Path(args.out) / 'results.json'}; report: {report}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mmtard.report import run_report

    path = run_report([Path(p) for p in args.inputs], Path(args.out))
    print(f"report written to {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mmtard.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, seeds=args.seeds, show_progress=not args.quiet)
    return 0


COMMANDS = {
    "demo": _cmd_demo,
    "train-teacher": _cmd_train,
    "distill": _cmd_train,
    "eval": _cmd_eval,
    "report": _cmd_report,
    "world": _cmd_world,
    "convert": _cmd_convert,
}


def _one_line(exc: BaseException) -> str:
    """The refusal as one line: an OSError as ``path: reason``; an error re-raised by a DataLoader
    worker (whose message embeds the worker's traceback) as the original message."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc).strip()
    if "Original Traceback" in text:  # torch.utils.data._utils.ExceptionWrapper.reraise
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if re.match(r"^[\w.]+: ", last) else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # key=value overrides may come before or after options such as --force
    if extras and not (hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras:
        args.overrides = list(args.overrides) + extras
    # open_clip logs its model-building steps on the root logger at INFO: keep the root at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("mmtard").setLevel(logging.WARNING if args.quiet else logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_random_init_notice)
    try:
        return COMMANDS[args.command](args)
    except (MmtardError, OSError) as exc:
        # OSError: a path the user gave cannot be read or written (missing, a file where a folder
        # is expected, disk full); its message names the path. Other exceptions are bugs.
        if args.debug:
            raise
        print(f"mmtard {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mmtard {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
