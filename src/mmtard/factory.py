"""From a resolved config to objects: student, teachers, reference model, dataset and method.

Kept apart from the loop so the trainer reads as a training step, and so the benchmark and the
demo build exactly what a real run builds.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from torch import nn

from mmtard import short_attention, speed, tower_rewrites
from mmtard.config import DATA_SOURCES, Config, DataConfig, ModelConfig
from mmtard.errors import ConfigError, ModelError
from mmtard.lora import add_lora
from mmtard.methods import METHODS, Method, Teacher
from mmtard.models import CLIPClassifier, ModelSpec, create_clip, freeze, train_only_image_tower
from mmtard.zeroshot import text_weights

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where text embeddings are cached across runs (``MMTARD_CACHE_DIR`` overrides)."""
    return Path(os.environ.get("MMTARD_CACHE_DIR", Path.home() / ".cache" / "mmtard"))


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """``auto`` (a GPU if there is one), or a torch device name; ``key`` names the setting in errors."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"{key}: '{name}' is not a device; use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        # torch knows mps, xpu, meta and more, but mmtard's precision, compile and distributed
        # paths are written for CPUs and CUDA GPUs only; refuse here rather than fail mid-run.
        raise ConfigError(f"{key}: '{name}' is a {device.type} device; mmtard runs on cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: '{name}' requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}: '{name}' requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPU, fp32 on CPU (METHOD: deterministic CPU runs), unless told otherwise."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16


def build_dataset(data: DataConfig):
    """The training set named by ``data.source``; labels index ``dataset.classnames``."""
    from mmtard.data import ImageFolderDataset, imagenet_folder
    from mmtard.world import load_world

    if not data.root:
        raise ConfigError("data.root is empty: set it to the dataset folder (or the world folder)")
    if data.source == "world":
        return load_world(data.root).classification(data.split, image_size=data.image_size,
                                                    augment=data.augment, strict=data.strict)
    if data.source == "imagenet":
        return imagenet_folder(data.root, data.split, image_size=data.image_size or 224,
                               augment=data.augment, strict=data.strict)
    classnames = read_classnames_file(data.classnames) if data.classnames else None
    if data.source == "imagefolder":
        return ImageFolderDataset(data.root, image_size=data.image_size, augment=data.augment, strict=data.strict,
                                  classnames=classnames, classnames_file=data.classnames)
    if data.source == "shards":
        from mmtard.data.shard_index import IndexedShardDataset

        return IndexedShardDataset(data.root, image_size=data.image_size or 224, augment=data.augment,
                                   strict=data.strict, classnames=classnames, index_dir=cache_root() / "shard-index")
    raise ConfigError(f"data.source: '{data.source}' is not one of {', '.join(DATA_SOURCES)}")


def read_classnames_file(path: str) -> list[str]:
    """``data.classnames``: one class name per line, in label order (:func:`mmtard.data.base.read_classnames`)."""
    from mmtard.data.base import read_classnames

    return read_classnames(path, ConfigError, "data.classnames: ")


def build_classifier(model_cfg: ModelConfig, classnames: list[str], templates: list[str],
                     device: torch.device, scale: float | None, key: str = "") -> CLIPClassifier:
    """``key`` (``student``, ``teachers[0]``...) names the config entry in a refusal."""
    try:
        clip = create_clip(ModelSpec(model_cfg.name, model_cfg.pretrained), device)
    except ModelError as exc:
        raise ModelError(f"{key}: {exc}" if key else str(exc)) from exc
    weights = text_weights(clip, model_cfg.name, classnames, templates, cache_dir=cache_root() / "text")
    return CLIPClassifier(clip, weights, scale=scale).to(device)


def build_teachers(config: Config, classnames: list[str], device: torch.device) -> list[Teacher]:
    teachers = []
    for i, teacher_cfg in enumerate(config.teachers):
        model = build_classifier(ModelConfig(teacher_cfg.name, teacher_cfg.pretrained), classnames,
                                 config.data.templates, device, config.train.logit_scale, key=f"teachers[{i}]")
        teachers.append(Teacher(freeze(model), teacher_cfg.role, teacher_cfg.weight, name=f"teacher{i}-{teacher_cfg.role}"))
    return teachers


def build_student(config: Config, classnames: list[str], device: torch.device) -> tuple[CLIPClassifier, nn.Module | None]:
    """The trainable student and, for methods that need one, a frozen copy of its initial self."""
    student = build_classifier(config.student, classnames, config.data.templates, device, config.train.logit_scale,
                               key="student")
    reference = None
    if METHODS[config.method.name].needs_reference:
        if config.method.reference is not None:
            reference = build_classifier(config.method.reference, classnames, config.data.templates,
                                         device, config.train.logit_scale, key="method.reference")
        else:
            reference = copy.deepcopy(student)
        freeze(reference)
    if config.train.lora:
        add_lora(student.clip, config.train.lora_rank, config.train.lora_alpha, config.train.lora_dropout)
    else:
        train_only_image_tower(student.clip)
    return student, reference


def build_method(config: Config, student: CLIPClassifier, teachers: list[Teacher],
                 reference: CLIPClassifier | None, amp: torch.dtype | None) -> Method:
    cls = METHODS[config.method.name]
    method = cls(student, teachers, config.attack.pgd(), config.method, reference=reference, autocast_dtype=amp)
    train = config.train
    device = next(student.parameters()).device
    # exact rewrites, before compiling so that the compiled towers trace them
    done = tower_rewrites.rewrite_towers(method, device, train.patch_embed, train.last_block, train.attention,
                                         train.teacher_attention)
    if train.attention == "short" and not done["student_attention"]:
        log.warning("train.attention=short: the student's image tower is not an open_clip ViT of at most %d "
                    "tokens, so it keeps torch's attention", short_attention.MAX_TOKENS)
    if train.teacher_attention == "split" and not done["teacher_attention"]:
        log.warning("train.teacher_attention=split: no teacher or reference tower is an open_clip ViT of more than %d "
                    "tokens, so they keep train.attention's choice", short_attention.MAX_TOKENS)
    if train.compile or train.compile_attack:
        speed.tag_compile_caches(train.attention)  # both trace the attention kernel into graphs
    if train.compile:  # in place: parameter names, checkpoints and exports are unchanged
        speed.compile_method(method, mode=train.compile_mode)
    if train.compile_attack and method.adversarial:
        method.attack_iteration = speed.compile_attack_iteration(mode=train.compile_mode)
    elif train.compile and method.adversarial:
        method.attack_iteration = speed.fused_update_iteration()
    return method
