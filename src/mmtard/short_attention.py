"""Self-attention over short sequences as one Triton program per (image, head) (``train.attention: short``).

The student's attention (ViT-B-32 at 224 px: 50 tokens, 12 heads of 64) runs about 130 times per
training step, 120 of them in the PGD loop with an input gradient. torch's fused kernels are built
for long sequences: on an H200 they reach about 31 TFLOP/s at 50 tokens (forward + backward, 112 us
per call at batch 128, replayed as a CUDA graph; this kernel: 51 us with its backward at 8 warps,
which made the compiled training step 11.7 % faster, and 45 us at 4; ``benchmarks/RESULTS.md``). A
head's whole problem fits in one program's registers: queries, keys and values are 50 x 64 each, so
one program computes the scores, the softmax and the output, and the backward recomputes the scores
from the saved log-sum-exp, as flash attention does, without the tiling and online softmax that
long sequences need (nor the output: the backward's row sums come from the probabilities and their
gradient).

The kernels read the fused query-key-value projection ``[B, L, 3E]`` in place and write the output
``[B, L, E]`` (and the backward's ``[B, L, 3E]`` gradient) in the layout the projections use, so no
transposes or copies surround them. Scores and softmax are fp32; as in flash attention, the
probabilities are rounded to the inputs' 16-bit type for the product with the values.

:class:`ShortSequenceAttention` is ``nn.MultiheadAttention`` with this kernel (same parameters,
state dict and function); it falls back to torch's attention wherever the kernel does not apply:
sequences over :data:`MAX_TOKENS`, masks, attention dropout, separate keys, fp32, or a CPU (unless
Triton's interpreter is on: ``TRITON_INTERPRET=1``, which the tests use).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

#: the longest sequence the kernel takes (one block of rows); longer ones use torch's attention
MAX_TOKENS = 64
#: warps per program (a Hopper warpgroup is 4), module constants that
#: ``benchmarks/attention_kernels.py`` varies; on an H200 (eighth session) a backward of 4 warps
#: took 44.5 us per student call against 51.4 with 8 (forward included, replayed as a CUDA graph)
FORWARD_WARPS, BACKWARD_WARPS = 4, 4
_HEAD_DIMS = (16, 32, 64, 128)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton comes with torch's CUDA wheels
    triton = None


#: Triton runs its kernels in its CPU interpreter (``TRITON_INTERPRET=1``, read when Triton and
#: this module are imported): the kernel then also serves fp32 and fp16 on a CPU, for the tests
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def suits_gpu(device: torch.device) -> bool:
    """Whether ``train.attention: auto`` runs the kernel on ``device``: an NVIDIA GPU with bf16
    tensor cores (compute capability 8.0 or later; it was measured on Hopper), not ROCm, where
    torch also names the device ``cuda``. ``short`` asks for the kernel anywhere."""
    if device.type != "cuda" or triton is None or torch.version.hip is not None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def kernel_takes(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether mmtard's attention kernels (this one and :mod:`mmtard.split_attention`) can read a
    fused projection ``qkv`` [B, L, 3E]: Triton present, a head size they have a block for, rows of
    unit stride, and a 16-bit tensor on a GPU (any float type in Triton's interpreter)."""
    if triton is None or qkv.dim() != 3 or qkv.shape[-1] % (3 * num_heads):
        return False
    head_dim = qkv.shape[-1] // (3 * num_heads)
    on_device = (qkv.is_cuda and qkv.dtype in (torch.bfloat16, torch.float16)) or (
        INTERPRETED and qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.float16))
    return on_device and qkv.shape[1] >= 1 and head_dim in _HEAD_DIMS and qkv.stride(-1) == 1


def applies(qkv: torch.Tensor, num_heads: int) -> bool:
    """Whether the kernel serves a fused projection ``qkv`` of shape [B, L, 3E]."""
    return kernel_takes(qkv, num_heads) and qkv.shape[1] <= MAX_TOKENS


if triton is not None:

    @triton.jit
    def _load_head(qkv, b, h, rows, cols, valid, qkv_stride_b, qkv_stride_l, EMBED: tl.constexpr,
                   HEAD_DIM: tl.constexpr):
        """Head ``h`` of image ``b``: its query, key and value tiles [BLOCK, HEAD_DIM] from the fused
        projection, rows past the sequence zero."""
        at = qkv + b * qkv_stride_b + h * HEAD_DIM + rows[:, None] * qkv_stride_l + cols[None, :]
        q = tl.load(at, mask=valid[:, None], other=0.0)
        k = tl.load(at + EMBED, mask=valid[:, None], other=0.0)
        v = tl.load(at + 2 * EMBED, mask=valid[:, None], other=0.0)
        return q, k, v

    @triton.jit
    def _forward_kernel(qkv, out, lse, length, heads, qkv_stride_b, qkv_stride_l, out_stride_b, out_stride_l,
                        scale, EMBED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0)
        b, h = program // heads, program % heads
        rows, cols = tl.arange(0, BLOCK), tl.arange(0, HEAD_DIM)
        valid = rows < length
        q, k, v = _load_head(qkv, b, h, rows, cols, valid, qkv_stride_b, qkv_stride_l, EMBED, HEAD_DIM)
        scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        peak = tl.max(scores, 1)
        p = tl.exp(scores - peak[:, None])
        total = tl.sum(p, 1)
        o = tl.dot(p.to(v.dtype), v) / total[:, None]
        tl.store(out + b * out_stride_b + h * HEAD_DIM + rows[:, None] * out_stride_l + cols[None, :],
                 o.to(out.dtype.element_ty), mask=valid[:, None])
        tl.store(lse + program * BLOCK + rows, peak + tl.log(total))

    @triton.jit
    def _backward_kernel(qkv, grad_out, lse, grad_qkv, length, heads, qkv_stride_b, qkv_stride_l,
                         out_stride_b, out_stride_l, grad_stride_b, grad_stride_l, scale,
                         EMBED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
        program = tl.program_id(0)
        b, h = program // heads, program % heads
        rows, cols = tl.arange(0, BLOCK), tl.arange(0, HEAD_DIM)
        valid = rows < length
        q, k, v = _load_head(qkv, b, h, rows, cols, valid, qkv_stride_b, qkv_stride_l, EMBED, HEAD_DIM)
        do = tl.load(grad_out + b * out_stride_b + h * HEAD_DIM + rows[:, None] * out_stride_l + cols[None, :],
                     mask=valid[:, None], other=0.0)
        log_total = tl.load(lse + program * BLOCK + rows)
        scores = tl.dot(q, tl.trans(k)) * scale
        p = tl.exp(scores - log_total[:, None])
        p = tl.where(valid[:, None] & valid[None, :], p, 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        # sum_j P_ij dP_ij = dO_i . O_i, from what is at hand: the output need not be kept
        delta = tl.sum(p * dp, 1)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k) * scale
        dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale
        grad_at = grad_qkv + b * grad_stride_b + h * HEAD_DIM + rows[:, None] * grad_stride_l + cols[None, :]
        kind = grad_qkv.dtype.element_ty
        tl.store(grad_at, dq.to(kind), mask=valid[:, None])
        tl.store(grad_at + EMBED, dk.to(kind), mask=valid[:, None])
        tl.store(grad_at + 2 * EMBED, dv.to(kind), mask=valid[:, None])

    # Opaque custom ops (not triton_op): torch.compile and CUDA graphs call them as they are, and
    # their fake implementations give the shapes without running a kernel.
    @torch.library.custom_op("mmtard::short_attention", mutates_args=())
    def _short_attention(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()  # the kernels read rows of unit stride
        batch, length, three_embed = qkv.shape
        embed = three_embed // 3
        head_dim = embed // num_heads
        out = torch.empty(batch, length, embed, device=qkv.device, dtype=qkv.dtype)
        lse = torch.empty(batch * num_heads, MAX_TOKENS, device=qkv.device, dtype=torch.float32)
        with _on(qkv.device):
            _forward_kernel[(batch * num_heads,)](
                qkv, out, lse, length, num_heads, qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1),
                1.0 / math.sqrt(head_dim), EMBED=embed, HEAD_DIM=head_dim, BLOCK=MAX_TOKENS,
                num_warps=FORWARD_WARPS)
        return out, lse

    @torch.library.custom_op("mmtard::short_attention_backward", mutates_args=())
    def _short_attention_backward(qkv: torch.Tensor, grad_out: torch.Tensor, lse: torch.Tensor,
                                  num_heads: int) -> torch.Tensor:
        qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        batch, length, three_embed = qkv.shape
        embed = three_embed // 3
        head_dim = embed // num_heads
        grad_qkv = torch.empty(batch, length, three_embed, device=qkv.device, dtype=qkv.dtype)
        with _on(qkv.device):
            _backward_kernel[(batch * num_heads,)](
                qkv, grad_out, lse, grad_qkv, length, num_heads, qkv.stride(0), qkv.stride(1), grad_out.stride(0),
                grad_out.stride(1), grad_qkv.stride(0), grad_qkv.stride(1), 1.0 / math.sqrt(head_dim),
                EMBED=embed, HEAD_DIM=head_dim, BLOCK=MAX_TOKENS, num_warps=BACKWARD_WARPS)
        return grad_qkv

    @_short_attention.register_fake
    def _short_attention_fake(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length, three_embed = qkv.shape
        return (qkv.new_empty(batch, length, three_embed // 3),
                qkv.new_empty(batch * num_heads, MAX_TOKENS, dtype=torch.float32))

    @_short_attention_backward.register_fake
    def _short_attention_backward_fake(qkv, grad_out, lse, num_heads):
        return qkv.new_empty(qkv.shape)  # contiguous, as the real one

    def _setup_context(ctx, inputs, output) -> None:
        qkv, num_heads = inputs
        _, lse = output
        ctx.save_for_backward(qkv, lse)  # not the output: the backward does without it
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero gradient is made for lse
        ctx.num_heads = num_heads

    def _backward(ctx, grad_out, _grad_lse):
        qkv, lse = ctx.saved_tensors
        return _short_attention_backward(qkv, grad_out, lse, ctx.num_heads), None

    _short_attention.register_autograd(_backward, setup_context=_setup_context)

    # torch's FLOP counter (benchmarks/step_throughput.py) counts these as it counts its own
    # attention: 4 B L^2 E forward (two products), twice that backward (four)
    @register_flop_formula(torch.ops.mmtard.short_attention)
    def _short_attention_flops(qkv_shape, num_heads, out_shape=None, **kwargs) -> int:
        return attention_flops(qkv_shape)

    @register_flop_formula(torch.ops.mmtard.short_attention_backward)
    def _short_attention_backward_flops(qkv_shape, grad_out_shape, lse_shape, num_heads, out_shape=None,
                                        **kwargs) -> int:
        return 2 * attention_flops(qkv_shape)


def attention_flops(qkv_shape) -> int:
    """FLOPs of softmax self-attention's two products over a fused projection of shape [B, L, 3E]."""
    batch, length, three_embed = qkv_shape
    return 4 * batch * length * length * (three_embed // 3)


def short_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Softmax self-attention of a fused projection ``qkv`` [B, L, 3E] (queries, keys, values, each
    E = num_heads x head_dim, heads side by side as ``nn.MultiheadAttention`` packs them): the
    [B, L, E] output, heads side by side. Requires :func:`applies`."""
    if not applies(qkv, num_heads):
        raise ValueError(f"short_attention does not serve qkv {tuple(qkv.shape)} {qkv.dtype} on {qkv.device} "
                         f"with {num_heads} heads")
    return _short_attention(qkv, num_heads)[0]


def reference_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What :func:`short_attention` computes, through torch's attention: the fallback and the tests' reference."""
    batch, length, three_embed = qkv.shape
    q, k, v = (t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, three_embed // 3)


class ShortSequenceAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose batch-first self-attention runs :func:`short_attention` where
    it applies, torch's attention over the same projections elsewhere, and the parent's forward for
what it does not cover (masks, attention weights, separate keys, attention dropout). Not built directly:
    :func:`mmtard.tower_rewrites.short_sequence_attention` gives an existing module this class, so
    it keeps its parameters, their names and the state dict."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True,
                is_causal: bool = False):
        plain = (self.batch_first and query is key and key is value and key_padding_mask is None
                 and attn_mask is None and not need_weights and not is_causal and self._qkv_same_embed_dim
                 and self.bias_k is None and not self.add_zero_attn and not (self.training and self.dropout > 0))
        if plain:  # the parent's packed projection, attention and output projection, without its copies
            qkv = F.linear(query, self.in_proj_weight, self.in_proj_bias)
            return self.out_proj(self.attend(qkv)), None
        return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """The attention of the fused projection: this kernel where it applies, torch's elsewhere
        (:class:`mmtard.split_attention.SplitClassTokenAttention` adds its own)."""
        return (short_attention if applies(qkv, self.num_heads) else reference_attention)(qkv, self.num_heads)
