"""Run configuration: dataclasses are the one source of truth, YAML gives values, ``key=value``
overrides win, and the resolved config is written beside every run and into every checkpoint.

Unknown keys and wrong types are refused with the valid names, so a typo never silently falls
back to a default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmtard.attacks import PGDConfig, parse_eps
from mmtard.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """An open_clip architecture and its weights: a tag (``openai``), a local file, or none."""

    name: str = "mmtard-tiny-vit"
    pretrained: str | None = None


@dataclass
class TeacherConfig:
    """One frozen teacher (METHOD.md §6): a full CLIP with its own text encoder. ``name`` is
    required: a default architecture would quietly stand in for a forgotten one."""

    name: str = ""
    pretrained: str | None = None
    role: str = "robust"
    weight: float = 1.0


DATA_SOURCES = ("world", "imagefolder", "imagenet", "shards")
#: train.patch_embed: the image towers' patch embedding as cuDNN's convolution or as one matrix
#: product (same linear map, mmtard.tower_rewrites.PatchEmbedding); auto: the product on a GPU only
PATCH_EMBEDS = ("auto", "conv", "matmul")
#: train.last_block: the image towers' last block computes every token (open_clip) or the class
#: token alone, all a class-token pooling reads (mmtard.tower_rewrites.ClassTokenBlock); auto: the
#: class token alone on a GPU (5 % faster step on an H200), open_clip's block on a CPU
LAST_BLOCKS = ("auto", "full", "class_token")
#: train.attention: short is mmtard's own kernel for image towers of at most 64 tokens on a GPU
#: (mmtard.short_attention; the compiled step 11.7 % faster on an H200), torch's choice elsewhere;
#: torch leaves torch's choice everywhere; flash ... math force one of torch's kernels
#: (mmtard.speed.attention_kernel); auto: short on a GPU, torch on a CPU
ATTENTION_KERNELS = ("auto", "torch", "short", "flash", "efficient", "cudnn", "math")
#: train.teacher_attention: split runs the frozen towers' (teachers', reference's) gradient-free
#: attention over more than 64 tokens through mmtard's kernel that takes the class token apart
#: (mmtard.split_attention: 257 tokens tile as 256 + 1); auto: split on an NVIDIA GPU of compute
#: capability 8.0 or later (the compiled step 3 % faster on an H100), torch's attention elsewhere;
#: torch keeps train.attention's choice there
TEACHER_ATTENTION = ("auto", "torch", "split")


@dataclass
class DataConfig:
    """Where training images come from. ``source``: world | imagefolder | imagenet | shards.

    ``shards``: ``root`` is a webdataset brace pattern of local uncompressed tars (image + ``.cls``),
    read by random access (:mod:`mmtard.data.shard_index`). ``classnames``: a text file with one
    class name per line in label order (shards and imagefolder; ImageNet's names are the default
    for 1 000 classes).
    """

    source: str = "world"
    root: str = ""
    split: str = "train"
    image_size: int | None = None
    augment: bool = False
    num_workers: int = 0
    templates: list[str] = field(default_factory=lambda: ["This is a photo of a {}"])
    strict: bool = False
    classnames: str | None = None


@dataclass
class AttackConfig:
    """The training attack (METHOD.md §2); eps and step size accept ``2/255`` strings."""

    eps: str = "2/255"
    step_size: str = "1/255"
    steps: int = 10
    norm: str = "linf"
    momentum: float = 0.9
    random_start: bool = True

    def pgd(self) -> PGDConfig:
        return PGDConfig(
            eps=parse_eps(self.eps, "attack.eps"),
            step_size=parse_eps(self.step_size, "attack.step_size"),
            steps=self.steps,
            norm=self.norm,
            random_start=self.random_start,
            momentum=self.momentum,
        )


@dataclass
class MethodConfig:
    """The loss. Every knob of METHOD.md §4-5; each method reads the ones it needs."""

    name: str = "mmt_ard"
    recipe: str = "paper"
    confidence: str = "auto"  # auto: cosine for the release recipe (as the code), probability for paper
    use_confidence: bool = True
    use_balance: bool = True
    use_clean: bool = True
    use_robust: bool = True
    kappa: float = 1.0
    lambda_r: float = 1.0
    lambda_c: float = 1.0
    release_w_robust: float = 50.0
    release_w_clean: float = 5.0
    pmg_alpha: float = 1.0
    pmg_beta: float = 1.0
    mtard_eta_tau: float = 0.001
    mtard_eta_w: float = 0.025
    reference: ModelConfig | None = None


@dataclass
class TrainConfig:
    """Optimisation. ``global_batch`` stays the global batch whatever the number of ranks;
    ``micro_batch`` (per rank) and the accumulation steps are derived from it."""

    steps: int = 100
    global_batch: int = 32
    micro_batch: int | None = None
    lr: float = 2e-5
    weight_decay: float = 1e-4
    warmup_frac: float = 0.07
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    logit_scale: float = 100.0
    log_every: int = 10
    ckpt_every: int = 50
    keep_checkpoints: int = 2
    clean_teacher_cache: bool = True
    compile: bool = False
    compile_mode: str | None = None
    compile_attack: bool = False
    patch_embed: str = "auto"
    last_block: str = "auto"
    attention: str = "auto"
    teacher_attention: str = "auto"


@dataclass
class Config:
    """A whole training run: student, teachers, data, attack, method, optimisation."""

    student: ModelConfig = field(default_factory=ModelConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def teachers_with_role(self, role: str) -> list[TeacherConfig]:
        return [t for t in self.teachers if t.role == role]


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass, with errors that name the key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if isinstance(value, _OverrideText) and value.strip() in ("null", "~", "None") and tp is not str:
        value = None
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, _OverrideText) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ConfigError(f"{where}: expected true or false, got {str(value)!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, _OverrideText) and re.fullmatch(r"[-+]?\d+", value.strip()):
            return int(value.strip(), 10)  # decimal, whatever its leading zeros
        raise ConfigError(f"{where}: expected an integer, got {str(value)!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string; overrides are text
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {str(value)!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, refusing unknown keys with the valid names."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'.{hint} Valid keys: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


class _OverrideText(str):
    """A plain override value, kept as typed: :func:`_coerce` reads it as the field's type. Parsed
    as YAML 1.1 it could change silently (``0777`` -> 511, ``1.10`` -> 1.1, ``a #2`` -> ``a``)."""


def _override_value(key: str, raw: str) -> Any:
    """Lists, mappings and quoted strings are YAML; every other value stays text until its field's
    type is known."""
    if not raw.lstrip().startswith(("[", "{", '"', "'")):
        return _OverrideText(raw)
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"override '{key}': cannot read {raw!r} as YAML ({reason})") from exc


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings (list items by index: ``teachers.0.x``). A plain value is read
    as its field's type (``train.steps=10``, ``train.lora=true``, ``student.pretrained=null``);
    lists and mappings (``data.templates=[...]``) and quoted strings as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        value = _override_value(key, raw)
        node: Any = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override '{key}': '{part}' is not an index of a list of {len(node)}")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            else:
                if not isinstance(node, dict):
                    raise ConfigError(f"override '{key}': the part before '{part}' is a value, not a mapping")
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
                    if node is None:
                        raise ConfigError(f"override '{key}': '{part}' is empty")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping, where YAML readers silently keep
    the last (a second ``train:`` section would drop every value of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`, flattened by the base class
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):  # the base class names that error
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path | None, overrides: list[str] | None = None, cls: type = Config) -> Any:
    """Read a YAML config (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{where}: {reason}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    where = str(path) if path else "config"
    overridden = apply_overrides(copy.deepcopy(data), overrides or [])
    if overrides:  # the file alone first, so that an error names the file or the command line rightly
        from_dict(cls, data, where)
        where = "command line"
    config = from_dict(cls, overridden, where)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that cross fields; per-field type checks happen in :func:`from_dict`."""
    from mmtard.methods import METHODS  # methods import config: import here to avoid a cycle

    method = config.method
    if method.name not in METHODS:
        raise ConfigError(f"method.name: unknown method '{method.name}'. Valid: {', '.join(sorted(METHODS))}")
    if method.recipe not in ("paper", "release"):
        raise ConfigError(f"method.recipe: '{method.recipe}' is not one of paper, release")
    if method.confidence not in ("auto", "cosine", "probability"):
        raise ConfigError(f"method.confidence: '{method.confidence}' is not one of auto, cosine, probability")
    for i, teacher in enumerate(config.teachers):
        if teacher.role not in ("clean", "robust"):
            raise ConfigError(f"teachers[{i}].role: '{teacher.role}' is not one of clean, robust")
        if teacher.weight < 0:
            raise ConfigError(f"teachers[{i}].weight: {teacher.weight} must be >= 0")
    if config.data.source not in DATA_SOURCES:
        raise ConfigError(f"data.source: '{config.data.source}' is not one of {', '.join(DATA_SOURCES)}")
    if config.data.classnames and config.data.source not in ("shards", "imagefolder"):
        raise ConfigError(f"data.classnames: applies to data.source shards and imagefolder, not "
                          f"'{config.data.source}' (which names its classes itself)")
    for key, model in _model_configs(config):
        if model.pretrained is not None and not str(model.pretrained).strip():
            raise ConfigError(f"{key}.pretrained: empty (an unset variable?); give a tag such as openai, a weights "
                              "file, or leave the key out for random weights")
        if not str(model.name).strip():
            raise ConfigError(f"{key}.name: missing or empty; give an open_clip architecture such as ViT-L-14")
    config.attack.pgd()  # parses eps and step size
    train = config.train
    for key in ("steps", "global_batch"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key}: {getattr(train, key)} must be >= 1")
    if train.micro_batch is not None and train.micro_batch < 1:
        raise ConfigError("train.micro_batch must be >= 1")
    if train.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision: '{train.precision}' is not one of auto, fp32, bf16")
    if not 0 <= train.warmup_frac < 1:
        raise ConfigError(f"train.warmup_frac: {train.warmup_frac} must be in [0, 1)")
    _check_ranges(config)
    if train.patch_embed not in PATCH_EMBEDS:
        raise ConfigError(f"train.patch_embed: '{train.patch_embed}' is not one of {', '.join(PATCH_EMBEDS)}")
    if train.last_block not in LAST_BLOCKS:
        raise ConfigError(f"train.last_block: '{train.last_block}' is not one of {', '.join(LAST_BLOCKS)}")
    if train.attention not in ATTENTION_KERNELS:
        raise ConfigError(f"train.attention: '{train.attention}' is not one of {', '.join(ATTENTION_KERNELS)}")
    if train.teacher_attention not in TEACHER_ATTENTION:
        raise ConfigError(f"train.teacher_attention: '{train.teacher_attention}' is not one of "
                          f"{', '.join(TEACHER_ATTENTION)}")
    METHODS[method.name].check_config(config)
    _warn_unused(config)


def _model_configs(config: Config) -> list[tuple[str, object]]:
    """(key, model config) of every model a config names: student, teachers, reference."""
    models = [("student", config.student)] + [(f"teachers[{i}]", t) for i, t in enumerate(config.teachers)]
    if config.method.reference is not None:
        models.append(("method.reference", config.method.reference))
    return models


def _warn_unused(config: Config) -> None:
    """Settings the run will not use: said by key, since a silently ignored one looks like a choice."""
    from mmtard.methods import METHODS

    cls = METHODS[config.method.name]
    train = config.train
    unused = []
    if config.teachers and not cls.required_roles:
        unused.append(f"teachers: method '{config.method.name}' uses no teacher; the {len(config.teachers)} "
                      "listed are ignored")
    if config.method.reference is not None and not cls.needs_reference:
        unused.append(f"method.reference: method '{config.method.name}' uses no reference model")
    if train.compile_attack and not cls.adversarial:
        unused.append(f"train.compile_attack: method '{config.method.name}' runs no attack")
    if train.compile_mode and not (train.compile or train.compile_attack):
        unused.append("train.compile_mode: applies with train.compile or train.compile_attack, both off")
    for message in unused:
        log.warning("%s", message)


#: torch.compile's modes (train.compile_mode; null is torch's default)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_ranges(config: Config) -> None:
    """Values that would otherwise fail deep in torch, peft or the data loader, or only once a
    --force run had cleared the old one."""
    train, data = config.train, config.data
    at_least = {"train.log_every": (train.log_every, 1), "train.ckpt_every": (train.ckpt_every, 1),
                "train.keep_checkpoints": (train.keep_checkpoints, 1), "train.lr": (train.lr, 0.0),
                "train.weight_decay": (train.weight_decay, 0.0),
                "data.num_workers": (data.num_workers, 0)}
    # loss weights and rates: a negative one would turn a term or an update around
    method = config.method
    at_least.update({f"method.{key}": (getattr(method, key), 0.0)
                     for key in ("kappa", "lambda_r", "lambda_c", "release_w_robust", "release_w_clean", "pmg_alpha",
                                 "pmg_beta", "mtard_eta_tau", "mtard_eta_w")})
    if train.lora:
        at_least.update({"train.lora_rank": (train.lora_rank, 1), "train.lora_alpha": (train.lora_alpha, 1)})
    if data.image_size is not None:
        at_least["data.image_size"] = (data.image_size, 1)
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key}: {value} must be >= {low}")
    if train.logit_scale <= 0:
        raise ConfigError(f"train.logit_scale: {train.logit_scale} must be > 0")
    if train.lora and not 0 <= train.lora_dropout < 1:
        raise ConfigError(f"train.lora_dropout: {train.lora_dropout} must be in [0, 1)")
    if train.compile_mode is not None and train.compile_mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode: '{train.compile_mode}' is not one of {', '.join(COMPILE_MODES)} "
                          "(or null)")
    if not data.templates:
        raise ConfigError("data.templates: at least one template is needed")
    for i, template in enumerate(data.templates):
        check_class_template(template, f"data.templates[{i}]")


def check_class_template(template: str, where: str) -> None:
    """A zero-shot prompt template must have exactly one class slot ``{}`` (or ``{0}``, repeatable)
    and format cleanly:
    without one, every class gets the same prompt and the zero-shot head cannot tell them apart."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ConfigError(f"{where}: {template!r} is not a format string ({exc})") from None
    if fields != [""] and (not fields or set(fields) != {"0"}):  # "{0}" may repeat: one class name
        found = ", ".join("{" + name + "}" for name in fields) or "none"
        raise ConfigError(f"{where}: {template!r} must have exactly one class slot {{}} (or {{0}}, which may "
                          f"repeat); it has {found}")
    try:
        template.format("x")
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{where}: {template!r} does not format with a class name ({exc})") from None


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config; through a temporary file and a durable rename, so that a run
    killed while writing it (or a machine that lost power) still finds a whole config to compare
    against when resumed."""
    from mmtard.checkpoint import atomic_write_text

    atomic_write_text(yaml.safe_dump(to_dict(config), sort_keys=False), path)
