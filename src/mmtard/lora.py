"""LoRA students through peft: low-rank adapters on the image encoder's attention.

open_clip's ViT blocks use ``nn.MultiheadAttention``; targeting the ``attn`` modules gives peft's
LoRA for multi-head attention, which adapts both the fused qkv input projection and the output
projection, as the release does, for any width (nothing here knows the embedding size).

peft implements LoRA on ``nn.MultiheadAttention`` by merging the adapters into the base weights
for each forward and unmerging them afterwards; the frozen base weights therefore drift by float
rounding (about 1e-8 per step) although no optimiser ever updates them.
"""

from __future__ import annotations

import copy

from torch import nn

from mmtard.errors import ModelError


def add_lora(clip: nn.Module, rank: int = 16, alpha: int = 16, dropout: float = 0.1) -> nn.Module:
    """Wrap ``clip.visual`` with LoRA adapters; only the adapters train, the base stays frozen."""
    from peft import LoraConfig, get_peft_model

    targets = [name for name, module in clip.visual.named_modules() if isinstance(module, nn.MultiheadAttention)]
    if not targets:
        raise ModelError("LoRA needs a ViT image encoder with nn.MultiheadAttention blocks; this model has none")
    for parameter in clip.parameters():
        parameter.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
    clip.visual = get_peft_model(clip.visual, config)
    return clip


def has_lora(clip: nn.Module) -> bool:
    return hasattr(clip.visual, "merge_and_unload")


def merged_copy(clip: nn.Module) -> nn.Module:
    """A plain open_clip CLIP with the adapters folded into the base weights (for export)."""
    if not has_lora(clip):
        return clip
    merged = copy.deepcopy(clip)
    merged.visual = merged.visual.merge_and_unload()
    return merged
