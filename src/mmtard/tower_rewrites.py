"""Exact rewrites of open_clip's ViT image tower that do less work for the same outputs.

Each rewrite computes the function open_clip's own forward computes (the same sums, perhaps in
another order) over the same parameters, so parameter names, optimizer state, checkpoints and
exports are those of an unmodified model. :func:`mmtard.factory.build_method` applies them in
place to the method's :func:`image_towers`, before ``torch.compile``, so compiled towers trace them.

* :func:`matmul_patch_embedding` (``train.patch_embed``): the patch-embedding convolution as one
  matrix product over flattened patches. Under 1 % of the FLOPs, yet cuDNN ran it (with the
  NCHW-to-NHWC copies around it and, above all, the input gradient every PGD iteration needs) in
  31 ms of a 186 ms compiled step on an H200 (``--profile`` of ``benchmarks/step_throughput.py``);
  with the product that step ran 20 % faster.
* :func:`class_token_last_block` (``train.last_block: class_token``): the last transformer block
  computes the class token alone. A ViT that pools its class token reads nothing else from the
  last block, yet open_clip computes all L tokens there: per remaining token the query
  projection, the attention output projection and the MLP, about 5/6 of the block's matrix
  products. Skipping them is about 1/depth x 5/6 of a tower's work; counted by torch's FLOP
  counter, 6.7 % of a ViT-B-32 (12 blocks), forward and backward, so of all ten PGD iterations,
  and 3.4 % of a ViT-L-14 teacher (``benchmarks/tower_passes.py``). 5.4 % faster step on an H200.
* :func:`short_sequence_attention` (``train.attention: short``, and ``auto`` on a GPU): towers of at most 64 tokens run
  their self-attention through :mod:`mmtard.short_attention`, one Triton program per image and
  head, instead of torch's kernels built for long sequences.
* :func:`split_class_token_attention` (``train.teacher_attention: split``, and ``auto`` on a GPU): the frozen towers'
  gradient-free attention over longer sequences (a ViT-L-14 teacher: 257 tokens) runs through
  :mod:`mmtard.split_attention`, which tiles the patch tokens alone and takes the class token apart.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import torch
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

log = logging.getLogger(__name__)


def classifiers(method: nn.Module) -> list[nn.Module]:
    """The classifiers a method runs each step: student, teachers, reference (if any)."""
    models = [method.student, *method.teachers]
    if getattr(method, "reference", None) is not None:
        models.append(method.reference)
    return models


def image_towers(method: nn.Module) -> list[nn.Module]:
    """The image encoders a method runs each step: student, teachers, reference (if any)."""
    return [model.clip.visual for model in classifiers(method)]


def rewrite_towers(method: nn.Module, device: torch.device, patch_embed: str = "auto", last_block: str = "auto",
                   attention: str = "auto", teacher_attention: str = "auto") -> dict[str, int]:
    """Apply, in place, the rewrites that ``train.patch_embed``, ``train.last_block``,
    ``train.attention`` and ``train.teacher_attention`` ask for on ``device``; returns how many
    towers each rewrote (``student_attention``: the student's tower alone, 0 or 1). Run before
    ``torch.compile``, so compiled towers trace them."""
    towers = image_towers(method)
    done: dict[str, int] = {}
    if wants_matmul_patch_embedding(patch_embed, device):
        done["patch_embed"] = matmul_patch_embedding(towers)
    if wants_class_token_last_block(last_block, device):
        done["last_block"] = class_token_last_block(towers)
    if wants_short_attention(attention, device):
        done["student_attention"] = short_sequence_attention(towers[:1])
        done["attention"] = done["student_attention"] + short_sequence_attention(towers[1:])
        log.info("short-sequence attention in %d image towers (the student's: %s)", done["attention"],
                 "yes" if done["student_attention"] else "no")
    if wants_split_attention(teacher_attention, device):
        done["teacher_attention"] = split_class_token_attention(towers[1:])
    return done


# ---------------------------------------------------------------------------------------------- patch embedding
class PatchEmbedding(nn.Module):
    """A ViT patch embedding, ``Conv2d(C, D, kernel_size=P, stride=P)``, as one matrix product.

    Cut the image into P x P patches, flatten each to C*P*P values and multiply by the weight
    flattened the same way: exactly the sums the convolution makes, in another order (fp32
    results agree to rounding). ``weight`` (and ``bias``) are the convolution's own parameters, so
    the parameter names, the optimizer's state and every checkpoint stay those of the
    convolution. The output has the convolution's shape [B, D, H/P, W/P] (a view of a [B, L, D]
    product: the tower's reshape to tokens copies nothing); rows and columns past the last whole
    patch are dropped, as the convolution drops them.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_patch_convolution(conv):
            raise ValueError(f"not a patch-embedding convolution (kernel == stride, no padding): {conv}")
        self.patch = conv.kernel_size[0]
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        gh, gw = h // p, w // p
        patches = x[:, :, :gh * p, :gw * p].reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        tokens = patches.reshape(b, gh * gw, c * p * p)
        weight = self.weight.reshape(self.weight.shape[0], -1)
        out = nn.functional.linear(tokens, weight, self.bias)  # [B, L, D]
        return out.transpose(1, 2).reshape(b, -1, gh, gw)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[1]}, out={self.weight.shape[0]}, patch={self.patch}"


def is_patch_convolution(module: nn.Module) -> bool:
    """A plain 2-D convolution with a square kernel (larger than 1) equal to its stride: the shape of
    a patch embedding."""
    return (type(module) is nn.Conv2d and module.kernel_size[0] == module.kernel_size[1] > 1
            and tuple(module.stride) == tuple(module.kernel_size) and tuple(module.padding) == (0, 0)
            and tuple(module.dilation) == (1, 1) and module.groups == 1 and module.padding_mode == "zeros")


def wants_matmul_patch_embedding(setting: str, device: torch.device) -> bool:
    """``train.patch_embed``: ``matmul`` always, ``auto`` on a GPU only (CPU runs, the demo and its
    published numbers, keep open_clip's convolution bit for bit), ``conv`` never."""
    return setting == "matmul" or (setting == "auto" and device.type == "cuda")


def matmul_patch_embedding(towers: Iterable[nn.Module]) -> int:
    """Replace, in place, the patch-embedding convolution (``conv1``) of every image tower in
    ``towers`` by a :class:`PatchEmbedding` over the same parameters; returns how many.

    Only a ViT's own ``conv1`` (the module holding it also holds the positional embedding; a
    ResNet's blocks have ``conv1`` layers too). It is replaced in that module: under LoRA the tower
    is peft's wrapper, which forwards ``conv1`` reads to the wrapped ViT but would keep a ``conv1``
    written to it as a module of its own that nothing calls."""
    swapped = 0
    for tower in towers:
        for owner in tower.modules():
            conv = owner._modules.get("conv1")
            if conv is not None and hasattr(owner, "positional_embedding") and is_patch_convolution(conv):
                owner.conv1 = PatchEmbedding(conv)
                swapped += 1
    log.info("patch embedding as a matrix product in %d image towers", swapped)
    return swapped


# ---------------------------------------------------------------------------------------------- last block
class ClassTokenBlock(ResidualAttentionBlock):
    """open_clip's ``ResidualAttentionBlock`` computing its class token (token 0) alone.

    The class token's output is ``x0 + attn(ln_1(x0), ln_1(x), ln_1(x))`` followed by its own MLP
    residual: its query attends to every token's key and value, which are all still computed, but
    no other token's query, attention output or MLP is. Not built directly:
    :func:`class_token_last_block` gives an existing block this class (``__class__`` assignment,
    so the block keeps its submodules, parameters and their names). Input [B, L, D] (batch
    first), output [B, 1, D]: what the tower's class-token pooling reads. open_clip calls that read
    the other tokens (``output_tokens``, ``forward_intermediates``) get none from a rewritten tower;
    nothing in mmtard makes them, and saved weights are unaffected. Under LoRA in train mode the
    class token's query draws its own adapter-dropout mask (:class:`mmtard.lora.ProjectedAttention`
    projects it apart from the keys): the same distribution, not the same draw.
    """

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise ValueError("ClassTokenBlock is a self-attention block: k_x and v_x must be None")
        normed = self.ln_1(q_x)
        if attn_mask is not None:  # [.., L, L]: the class token's row only
            attn_mask = attn_mask[..., :1, :]
        x = q_x[:, :1] + self.ls_1(self.attention(q_x=normed[:, :1], k_x=normed, v_x=normed, attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


def reads_class_token_only(vit: nn.Module) -> bool:
    """Whether ``vit`` is an open_clip ViT that reads nothing of its last block but the class token,
    and that block is open_clip's plain self-attention block in batch-first layout."""
    if type(vit) is not VisionTransformer:  # a subclass may pool otherwise
        return False
    transformer = vit.transformer
    if not (vit.pool_type == "tok" and vit.attn_pool is None and not vit.output_tokens
            and transformer.batch_first and len(transformer.resblocks) > 0):
        return False
    last = transformer.resblocks[-1]
    return type(last) in (ResidualAttentionBlock, ClassTokenBlock) and not hasattr(last, "ln_1_kv")


def wants_class_token_last_block(setting: str, device: torch.device) -> bool:
    """``train.last_block``: ``class_token`` always, ``auto`` on a GPU only (where it made the
    step 5 % faster; CPU runs, the demo and its published numbers, keep open_clip's block bit for
    bit), ``full`` never."""
    return setting == "class_token" or (setting == "auto" and device.type == "cuda")


def class_token_last_block(towers: Iterable[nn.Module]) -> int:
    """Make the last block of every image tower in ``towers`` that pools its class token a
    :class:`ClassTokenBlock`, in place; returns how many towers (idempotent)."""
    changed = 0
    for tower in towers:
        for vit in tower.modules():  # under LoRA the tower is peft's wrapper around the ViT
            if reads_class_token_only(vit):
                vit.transformer.resblocks[-1].__class__ = ClassTokenBlock
                changed += 1
    log.info("last block computes the class token alone in %d image towers", changed)
    return changed


# ---------------------------------------------------------------------------------------------- attention
def wants_short_attention(setting: str, device: torch.device) -> bool:
    """``train.attention``: ``short`` always, ``auto`` on an NVIDIA GPU of compute capability 8.0
    or later (:func:`mmtard.short_attention.suits_gpu`; on an H200 it made the compiled step
    11.7 % faster; on a CPU the module would only fall back to torch's attention), never for
    ``torch`` or a forced torch kernel."""
    from mmtard.short_attention import suits_gpu

    return setting == "short" or (setting == "auto" and suits_gpu(device))


def _attention_modules(towers: Iterable[nn.Module], short: bool, kinds: tuple[type, ...]) -> Iterator[list[nn.Module]]:
    """Per open_clip ViT in ``towers`` whose sequences fit :data:`mmtard.short_attention.MAX_TOKENS`
    (``short``) or exceed it (not ``short``), its attention modules of the types ``kinds``. Under
    LoRA the tower is peft's wrapper around the ViT."""
    from mmtard.short_attention import MAX_TOKENS

    for tower in towers:
        for vit in tower.modules():
            if isinstance(vit, VisionTransformer) and (vit.positional_embedding.shape[0] <= MAX_TOKENS) == short:
                yield [m for m in vit.transformer.modules() if type(m) in kinds]


def short_sequence_attention(towers: Iterable[nn.Module]) -> int:
    """Give every ``nn.MultiheadAttention`` of the image towers in ``towers`` whose sequences fit
    :data:`mmtard.short_attention.MAX_TOKENS` the class
    :class:`mmtard.short_attention.ShortSequenceAttention`, in place (parameters and state dict
    unchanged), and switch a LoRA student's :class:`mmtard.lora.ProjectedAttention` to the same
    kernel; returns how many towers (:func:`rewrite_towers` logs them). Longer towers (a ViT-L-14
    teacher: 257 tokens) keep torch's attention."""
    from mmtard.lora import ProjectedAttention
    from mmtard.short_attention import ShortSequenceAttention

    changed = 0
    for attentions in _attention_modules(towers, short=True, kinds=(nn.MultiheadAttention, ProjectedAttention)):
        for attention in attentions:
            if type(attention) is ProjectedAttention:  # a LoRA student's: peft adapts its projections
                attention.short_sequence = True
            else:
                attention.__class__ = ShortSequenceAttention
        changed += bool(attentions)
    return changed


def wants_split_attention(setting: str, device: torch.device) -> bool:
    """``train.teacher_attention``: ``split`` always, ``auto`` on an NVIDIA GPU of compute
    capability 8.0 or later (:func:`mmtard.short_attention.suits_gpu`: the kernel is Triton's, as
    the short one is): on an H100 it took a ViT-L-14 teacher's attention call from 227 to 188 us
    and the compiled release step from 974 to 1005 images/s (benchmarks/RESULTS.md, tenth
    session); ``torch`` keeps torch's attention in the frozen towers."""
    from mmtard.short_attention import suits_gpu

    return setting == "split" or (setting == "auto" and suits_gpu(device))


def split_class_token_attention(towers: Iterable[nn.Module]) -> int:
    """Give every attention module of the open_clip ViTs in ``towers`` (frozen ones: teachers,
    reference) the class :class:`mmtard.split_attention.SplitClassTokenAttention`, in place
    (parameters and state dict unchanged) where the ViT has more than
    :data:`mmtard.short_attention.MAX_TOKENS` tokens; returns how many towers. Their
    gradient-free calls run the split kernel, the others torch's attention; shorter towers keep
    ``train.attention``'s choice."""
    from mmtard.short_attention import ShortSequenceAttention
    from mmtard.split_attention import SplitClassTokenAttention

    changed = 0
    kinds = (nn.MultiheadAttention, ShortSequenceAttention, SplitClassTokenAttention)
    for attentions in _attention_modules(towers, short=False, kinds=kinds):  # short towers: train.attention's
        for attention in attentions:
            attention.__class__ = SplitClassTokenAttention
        changed += bool(attentions)
    log.info("split class-token attention in %d frozen image towers", changed)
    return changed
