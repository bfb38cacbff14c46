"""Forward-only self-attention for frozen image towers, with the class token apart (``train.teacher_attention: split``).

A ViT-L-14 teacher at 224 px attends over 257 tokens: a class token and a 16 x 16 patch grid. Flash
attention kernels tile a sequence in blocks of 64 or 128 rows, so 257 tokens take three blocks of
128 on each side, the third holding one token: 9 tile products where 4 would hold the patches.
On an H200 torch's (cuDNN's) kernel took 231 us per teacher call at batch 128, about 150 TFLOP/s
of useful work, and 5.3 ms of the 129 ms compiled training step (``benchmarks/RESULTS.md``,
eighth session). This kernel tiles the patch tokens alone and handles the class token apart:

* the class token's key and value join every query block's online softmax as one extra column
  (a vector product per row, not a tile), which starts the running maximum and sum;
* the class token's query is computed by the program of each image and head's first query block,
  after its own rows, as a 16-row block (the smallest a tensor-core product takes) of which one
  row is stored; the key and value tiles it reads again were just read, so they come from L2.

Scores and the softmax are fp32 (base 2, the scale folded in); the probabilities are rounded to
the inputs' 16-bit type for the product with the values, as flash attention does. Like
:mod:`mmtard.short_attention` it reads the fused query-key-value projection ``[B, L, 3E]`` in place
and writes ``[B, L, E]``, heads side by side, so no transposes surround it.

Forward only: the frozen teachers run without gradient (the distillation targets). Wherever a
gradient is wanted (a reference model inside an attack loss) :class:`SplitClassTokenAttention`
leaves the call to :class:`mmtard.short_attention.ShortSequenceAttention`'s choice. On an H100 it
took 188 us per ViT-L-14 teacher call against torch's 227 (benchmarks/RESULTS.md), so
``train.teacher_attention: auto`` uses it on a GPU, as ``split`` does everywhere.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from mmtard import short_attention
from mmtard.short_attention import INTERPRETED, ShortSequenceAttention, _on, attention_flops, triton

#: rows of the class token's query block: one is stored; 16 is the smallest tensor-core product
CLASS_ROWS = 16

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rows_attention(q, base, length, qkv_stride_l, scale_log2, k0, v0, cols, EMBED: tl.constexpr,
                        HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """Attention of the query rows ``q`` [ROWS, HEAD_DIM] over every token of one image and
        head: the class token's key (``k0``, value ``v0``) opens the online softmax as its running
        maximum (probability 1, the value the running output), then the patch tokens follow tile by
        tile. Returns the output rows in fp32."""
        peak = tl.sum(q.to(tl.float32) * k0[None, :], 1) * scale_log2
        total = tl.zeros([ROWS], dtype=tl.float32) + 1.0
        acc = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32) + v0[None, :]
        for start in range(1, length, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_valid = keys < length
            at = base + keys[:, None] * qkv_stride_l + cols[None, :]
            k = tl.load(at + EMBED, mask=key_valid[:, None], other=0.0)
            v = tl.load(at + 2 * EMBED, mask=key_valid[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * scale_log2
            scores = tl.where(key_valid[None, :], scores, float("-inf"))
            new_peak = tl.maximum(peak, tl.max(scores, 1))
            rescale = tl.exp2(peak - new_peak)
            p = tl.exp2(scores - new_peak[:, None])
            total = total * rescale + tl.sum(p, 1)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            peak = new_peak
        return acc / total[:, None]

    @triton.jit
    def _split_forward_kernel(qkv, out, length, heads, qkv_stride_b, qkv_stride_l, out_stride_b, out_stride_l,
                              scale_log2, EMBED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, CLASS_ROWS: tl.constexpr):
        program, block = tl.program_id(0), tl.program_id(1)
        b, h = (program // heads).to(tl.int64), program % heads  # 64-bit offsets: B L 3E may pass 2^31
        cols = tl.arange(0, HEAD_DIM)
        base = qkv + b * qkv_stride_b + h * HEAD_DIM
        out_base = out + b * out_stride_b + h * HEAD_DIM
        k0 = tl.load(base + EMBED + cols).to(tl.float32)
        v0 = tl.load(base + 2 * EMBED + cols).to(tl.float32)
        # a block of patch tokens' queries: rows 1 + block * BLOCK_M ...
        rows = 1 + block * BLOCK_M + tl.arange(0, BLOCK_M)
        valid = rows < length
        q = tl.load(base + rows[:, None] * qkv_stride_l + cols[None, :], mask=valid[:, None], other=0.0)
        o = _rows_attention(q, base, length, qkv_stride_l, scale_log2, k0, v0, cols, EMBED, HEAD_DIM, BLOCK_M,
                            BLOCK_N)
        tl.store(out_base + rows[:, None] * out_stride_l + cols[None, :], o.to(out.dtype.element_ty),
                 mask=valid[:, None])
        if block == 0:  # the class token's query (row 0 of a small block), over the tiles just read;
            # names of its own: Triton's compiler refuses a name whose type differs inside an `if`
            class_rows = tl.arange(0, CLASS_ROWS)
            first = class_rows < 1
            q_class = tl.load(base + class_rows[:, None] * qkv_stride_l + cols[None, :], mask=first[:, None],
                              other=0.0)
            o_class = _rows_attention(q_class, base, length, qkv_stride_l, scale_log2, k0, v0, cols, EMBED,
                                      HEAD_DIM, CLASS_ROWS, BLOCK_N)
            tl.store(out_base + class_rows[:, None] * out_stride_l + cols[None, :],
                     o_class.to(out.dtype.element_ty), mask=first[:, None])

    #: tile shapes tried at the first call of each sequence length and head size (Triton's autotuner
    #: times each on the GPU at hand); the interpreter runs one. Key tiles are 64 in all of them:
    #: the online softmax's grouping of keys (so the rounding) must not depend on a timing
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": 64}, num_warps=w, num_stages=s)
                for m, w, s in ((128, 4, 3), (128, 8, 3), (64, 4, 3), (128, 4, 2))]
    _patch_rows_kernel = triton.autotune(configs=_CONFIGS[:1] if INTERPRETED else _CONFIGS,
                                         key=["length", "EMBED", "HEAD_DIM"])(_split_forward_kernel)

    # An opaque custom op (as mmtard::short_attention): torch.compile and CUDA graphs call it as it
    # is; no autograd is registered, so a call that needs a gradient is refused by torch, not wrong.
    @torch.library.custom_op("mmtard::split_attention", mutates_args=())
    def _split_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()  # the kernel reads rows of unit stride
        batch, length, three_embed = qkv.shape
        embed = three_embed // 3
        head_dim = embed // num_heads
        out = torch.empty(batch, length, embed, device=qkv.device, dtype=qkv.dtype)
        args = (qkv, out, length, num_heads, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
                math.log2(math.e) / math.sqrt(head_dim))
        with _on(qkv.device):
            _patch_rows_kernel[lambda meta: (batch * num_heads, max(1, triton.cdiv(length - 1, meta["BLOCK_M"])))](
                *args, EMBED=embed, HEAD_DIM=head_dim, CLASS_ROWS=CLASS_ROWS)
        return out

    @_split_attention.register_fake
    def _split_attention_fake(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        batch, length, three_embed = qkv.shape
        return qkv.new_empty(batch, length, three_embed // 3)

    @register_flop_formula(torch.ops.mmtard.split_attention)
    def _split_attention_flops(qkv_shape, num_heads, out_shape=None, **kwargs) -> int:
        return attention_flops(qkv_shape)  # the useful products, as torch counts its own attention


def applies(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether the kernel serves a fused projection ``qkv`` [B, L, 3E] in a call that wants no gradient."""
    return not (torch.is_grad_enabled() and qkv.requires_grad) and short_attention.kernel_takes(qkv, num_heads)


def split_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax self-attention of a fused projection ``qkv`` [B, L, 3E] whose token 0 is the class
    token (any L works; L - 1 a multiple of the tile is where it pays): the [B, L, E] output,
    heads side by side. Requires :func:`applies`."""
    if not applies(qkv, num_heads):
        raise ValueError(f"split_attention does not serve qkv {tuple(qkv.shape)} {qkv.dtype} on {qkv.device} "
                         f"with {num_heads} heads (requires_grad={qkv.requires_grad})")
    return _split_attention(qkv, num_heads)


class SplitClassTokenAttention(ShortSequenceAttention):
    """:class:`mmtard.short_attention.ShortSequenceAttention` whose gradient-free calls over
    sequences too long for the short kernel run :func:`split_attention`. Given to a frozen tower's
    attention modules in place by :func:`mmtard.tower_rewrites.split_class_token_attention`
    (parameters and state dict unchanged)."""

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        if not short_attention.applies(qkv, self.num_heads) and applies(qkv, self.num_heads):
            return split_attention(qkv, self.num_heads)
        return super().attend(qkv)
