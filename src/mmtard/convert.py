"""Turn other tools' checkpoints into the full-CLIP safetensors files every mmtard command loads.

The robust CLIPs researchers compare with are mostly saved as an image encoder alone: RobustVLM's
TeCoA and FARE training and the MMT-ARD release save ``model.visual.state_dict()`` (TeCoA's own
code wraps it as ``{"vision_encoder_state_dict": ...}``) and load it over OpenAI's CLIP, whose text
encoder the zero-shot head needs. :func:`convert` does that once, explicitly: the base model's
text tower and settings, the file's image tower, written with mmtard's metadata (normalisation,
QuickGELU), so the result is an ordinary weights file for teachers, students and evaluation.
A LoRA image encoder as the release saves it (peft's ``base_model.model.`` keys around its plain
attention with ``qkv``/``proj`` projections) is merged into plain weights first, W + (alpha/r) B A,
and its projections renamed to open_clip's. Without an image-encoder file the command just writes
the base model (a pretrained tag or hub id turned into a local file, for a machine that is offline).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from mmtard.errors import ModelError
from mmtard.models import (ModelSpec, activation_guessed, create_clip, export_open_clip, load_state_checked,
                           read_weights_file, strip_module_prefix)

log = logging.getLogger(__name__)

#: keys under which other tools wrap an image encoder's state dict
_WRAPPERS = ("vision_encoder_state_dict", "state_dict", "visual", "model")
#: the release's plain attention (``qkv``, ``proj`` linears) in open_clip's ``nn.MultiheadAttention`` names
_ATTENTION_NAMES = {"attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
                    "attn.proj.weight": "attn.out_proj.weight", "attn.proj.bias": "attn.out_proj.bias"}
_LORA_A = re.compile(r"^(.*)\.lora_A\.([^.]+)\.weight$")


def image_tower_state(path: str | Path, lora_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The image-encoder state dict in ``path``, keys relative to ``clip.visual``.

    Accepts a bare ``visual`` state dict, one wrapped under a known key, a full CLIP (its
    ``visual.*`` entries are taken, the rest ignored with a note), or a peft LoRA image encoder
    (merged with ``lora_alpha``; by default alpha = r, the release's 16 and 16).
    """
    state = _unwrap(read_weights_file(path), path)
    if any(_LORA_A.match(k) for k in state):
        state = merge_lora(state, lora_alpha, path)
    elif lora_alpha is not None:
        raise ModelError(f"--lora-alpha {lora_alpha}: {path} holds no LoRA adapters (no lora_A weights)")
    visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if visual:
        if len(visual) < len(state):
            log.info("%s: a full model; its %d image-encoder tensors are taken, %d others ignored",
                     path, len(visual), len(state) - len(visual))
        return visual
    return state


def _unwrap(state: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of tensors inside a checkpoint: the file's top level or a known wrapper key."""
    if isinstance(state, dict):
        for key in _WRAPPERS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = ", ".join(sorted(map(str, state))[:6]) if isinstance(state, dict) else type(state).__name__
        raise ModelError(f"{path} holds no image-encoder state dict of tensors (top level: {keys}); "
                         f"expected a visual state dict or one under {', '.join(_WRAPPERS)}")
    return strip_module_prefix(state)


def merge_lora(state: dict[str, torch.Tensor], lora_alpha: float | None, path: str | Path) -> dict[str, torch.Tensor]:
    """Plain weights from a peft LoRA state dict: W + (alpha / r) B A per adapted layer, peft's
    ``base_model.model.`` prefix and ``base_layer`` level dropped, the release's ``qkv``/``proj``
    attention renamed to open_clip's."""
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    unknown = [k for k in state if ".lora_" in k and not re.search(r"\.lora_[AB]\.[^.]+\.weight$", k)]
    if unknown:  # DoRA magnitudes, LoRA embeddings: not a plain W + (alpha/r) B A
        raise ModelError(f"{path}: LoRA tensors this merge does not cover (first: {unknown[:3]}); only plain "
                         "lora_A / lora_B adapters of linear layers are merged")
    merged = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    for key, down in state.items():
        match = _LORA_A.match(key)
        if match is None:
            continue
        layer, adapter = match.groups()
        up, base = state.get(f"{layer}.lora_B.{adapter}.weight"), merged.get(f"{layer}.weight")
        if up is None or base is None:
            raise ModelError(f"{path}: LoRA layer '{layer}' lacks its lora_B or base weight")
        scale = (lora_alpha if lora_alpha is not None else down.shape[0]) / down.shape[0]
        merged[f"{layer}.weight"] = (base.float() + scale * (up.float() @ down.float())).to(base.dtype)  # one rounding
    renamed = {}
    for key, value in merged.items():
        for plain, ours in _ATTENTION_NAMES.items():
            if key.endswith(plain):
                key = key[: -len(plain)] + ours
                break
        renamed[key] = value
    return renamed


def convert(name: str, pretrained: str | None, out: str | Path, visual: str | Path | None = None,
            lora_alpha: float | None = None) -> Path:
    """Write ``out``: the CLIP ``name``/``pretrained``, its image encoder replaced by ``visual``'s."""
    if not pretrained and not name.startswith(("hf-hub:", "local-dir:")):
        raise ModelError(f"convert '{name}': no --pretrained base, so its text encoder would be random; give the "
                         "weights the image encoder was trained from (e.g. --pretrained openai, or a file)")
    for source in (pretrained, visual):
        if source and Path(out).exists() and Path(source).exists() and os.path.samefile(source, out):
            raise ModelError(f"convert: --out {out} is the input {source}; write the result to another file")
    spec = ModelSpec(name, pretrained)
    clip = create_clip(spec)
    if visual is not None:
        load_state_checked(clip.visual, image_tower_state(visual, lora_alpha), visual,
                           f"is not an image encoder of '{name}'")
    return export_open_clip(clip, out, record_activation=not activation_guessed(spec, clip))
