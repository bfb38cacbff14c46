"""LoRA students through peft: low-rank adapters on the image encoder's attention projections.

open_clip's ViT blocks use ``nn.MultiheadAttention``, whose input projection is a bare parameter.
peft's LoRA for that module merges the adapters into the base weights for every forward, so its
dropout never runs (checked: two train-mode forwards with dropout 0.5 were identical), while the
paper's LoRA variant has dropout 0.1 on the qkv and output projections (METHOD.md §7). So each
image-encoder attention becomes a :class:`ProjectedAttention`, the same attention with its two
projections as ``nn.Linear`` layers, and peft adapts those, with its dropout on the adapter's
input. :func:`merged_copy` folds the adapters in and turns the attention back into open_clip's
``nn.MultiheadAttention``, so the exported student is a plain open_clip model.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mmtard.errors import ModelError
from mmtard.short_attention import applies, short_attention


class ProjectedAttention(nn.Module):
    """A batch-first ``nn.MultiheadAttention`` (self-attention, or one query set attending to one
    key/value set) with its input projection as ``in_proj: nn.Linear(D, 3D)`` and its output
    projection as ``out_proj``, computing the same function over the same weights. With
    ``short_sequence`` set (``train.attention: short``, or ``auto`` on a GPU;
    :mod:`mmtard.tower_rewrites`), its self-attention runs
    :func:`mmtard.short_attention.short_attention` where that applies."""

    short_sequence = False

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha.batch_first or not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ModelError(f"LoRA: unsupported attention layout {mha}")
        dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.dropout = mha.dropout
        self.in_proj = nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None,
                                 device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                self.in_proj.bias.copy_(mha.in_proj_bias)
        self.in_proj.weight.requires_grad_(mha.in_proj_weight.requires_grad)
        if self.in_proj.bias is not None:
            self.in_proj.bias.requires_grad_(mha.in_proj_bias.requires_grad)
        self.out_proj = mha.out_proj

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        if need_weights or value is not key:
            raise ModelError("ProjectedAttention: attention weights and separate key/value inputs are not supported")
        dim = self.out_proj.in_features
        if query is key:
            qkv = self.in_proj(query)
            if (self.short_sequence and attn_mask is None and not (self.training and self.dropout > 0)
                    and applies(qkv, self.num_heads)):
                return self.out_proj(short_attention(qkv, self.num_heads)), None
            q, k, v = qkv.split(dim, dim=-1)
        else:  # through the adapted projection (a slice of its weight would bypass the adapter)
            q = self.in_proj(query)[..., :dim]
            k, v = self.in_proj(key)[..., dim:].split(dim, dim=-1)
        batch, length = q.shape[:2]
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # nn.MultiheadAttention: True = masked; SDPA: True = kept
                attn_mask = ~attn_mask
            if attn_mask.dim() == 3:  # [B * heads, L, S]
                attn_mask = attn_mask.view(batch, self.num_heads, *attn_mask.shape[1:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim)), None

    def to_multihead(self) -> nn.MultiheadAttention:
        """open_clip's module again, over these weights (after the adapters were merged)."""
        dim = self.out_proj.in_features
        mha = nn.MultiheadAttention(dim, self.num_heads, dropout=self.dropout, bias=self.in_proj.bias is not None,
                                    batch_first=True, device=self.in_proj.weight.device,
                                    dtype=self.in_proj.weight.dtype)
        with torch.no_grad():
            mha.in_proj_weight.copy_(self.in_proj.weight)
            if self.in_proj.bias is not None:
                mha.in_proj_bias.copy_(self.in_proj.bias)
        mha.out_proj = self.out_proj
        return mha


def _swap_attention(root: nn.Module, kind: type, convert) -> list[str]:
    """Replace every ``kind`` submodule of ``root`` by ``convert(module)``; returns their names."""
    names = [name for name, module in root.named_modules() if type(module) is kind]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, convert(getattr(parent, child)))
    return names


def add_lora(clip: nn.Module, rank: int = 16, alpha: int = 16, dropout: float = 0.1) -> nn.Module:
    """Wrap ``clip.visual`` with LoRA adapters (with dropout) on every attention's qkv and output
    projections; only the adapters train, the base stays frozen."""
    from peft import LoraConfig, get_peft_model

    attentions = _swap_attention(clip.visual, nn.MultiheadAttention, ProjectedAttention)
    if not attentions:
        raise ModelError("LoRA needs a ViT image encoder with nn.MultiheadAttention blocks; this model has none")
    for parameter in clip.parameters():
        parameter.requires_grad_(False)
    targets = [f"{name}.{proj}" for name in attentions for proj in ("in_proj", "out_proj")]
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
    _swap_attention(merged.visual, ProjectedAttention, ProjectedAttention.to_multihead)
    return merged
