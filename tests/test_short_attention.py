"""mmtard's short-sequence attention kernel (train.attention: short).

The kernels are Triton programs; without a GPU they run in Triton's CPU interpreter
(TRITON_INTERPRET=1, read when Triton is imported), so those checks run in a subprocess. They
compare outputs and input gradients with torch's attention in fp32 (exact up to summation order)
and fp16 (the kernel rounds the probabilities to the inputs' type, as flash attention does).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmtard.short_attention import ShortSequenceAttention, applies, reference_attention

triton = pytest.importorskip("triton")

_INTERPRETED_CHECKS = r'''
import torch
from torch import nn
from mmtard.models import ModelSpec, create_clip
from mmtard.short_attention import INTERPRETED, ShortSequenceAttention, applies, reference_attention, short_attention
from mmtard.tower_rewrites import class_token_last_block, short_sequence_attention

assert INTERPRETED
torch.manual_seed(0)
# the kernel against torch's attention: outputs and the gradient of the fused projection
for dtype, atol in ((torch.float32, 2e-6), (torch.float16, 3e-3)):
    for tokens, heads, dim in ((50, 3, 64), (1, 2, 32), (64, 2, 16), (7, 2, 128)):
        qkv = torch.randn(2, tokens, 3 * heads * dim, dtype=dtype, requires_grad=True)
        assert applies(qkv, heads)
        out = short_attention(qkv, heads)
        grad_out = torch.randn_like(out)
        grad, = torch.autograd.grad(out, qkv, grad_out)
        exact = qkv.detach().double().requires_grad_(True)
        ref = reference_attention(exact, heads)
        ref_grad, = torch.autograd.grad(ref, exact, grad_out.double())
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
        torch.testing.assert_close(grad.double(), ref_grad, atol=4 * atol, rtol=0)
# torch's FLOP counter counts the kernels as it counts its own attention: backward twice the forward
from torch.utils.flop_counter import FlopCounterMode
qkv = torch.randn(2, 50, 3 * 2 * 32, requires_grad=True)
with FlopCounterMode(display=False) as counter:
    torch.autograd.grad(short_attention(qkv, 2).sum(), qkv)
assert counter.get_total_flops() == 3 * 4 * 2 * 50 * 50 * 64, counter.get_total_flops()
# a strided view of a larger projection is read in place
wide = torch.randn(2, 9, 4 * 64)
torch.testing.assert_close(short_attention(wide[..., :192], 1), reference_attention(wide[..., :192], 1))
# too long, or a head size the kernel has no block for: torch's attention instead
assert not applies(torch.randn(1, 65, 192), 1) and not applies(torch.randn(1, 8, 3 * 48), 1)

# a whole image tower, rewritten, gives open_clip's outputs and input gradients, also traced by
# torch.compile and with the class-token last block (whose separate query falls back)
clip = create_clip(ModelSpec("mmtard-tiny-vit")).float()
visual = clip.visual
x = torch.rand(3, 3, 32, 32, requires_grad=True)
ref = visual(x)
ref_grad, = torch.autograd.grad(ref.square().sum(), x)
keys = list(visual.state_dict())
assert short_sequence_attention([visual]) == 1
assert list(visual.state_dict()) == keys
assert sum(type(m) is ShortSequenceAttention for m in visual.modules()) == len(visual.transformer.resblocks)
for tower in (visual, torch.compile(visual, backend="aot_eager")):
    out = tower(x)
    grad, = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
class_token_last_block([visual])
out = visual(x)
torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

# a LoRA student: peft adapts ProjectedAttention's projections, and the kernel runs between them
import mmtard.lora as lora
calls = []
kernel = lora.short_attention
lora.short_attention = lambda qkv, heads: calls.append(qkv.shape) or kernel(qkv, heads)
adapted = lora.add_lora(create_clip(ModelSpec("mmtard-tiny-vit")).float(), dropout=0.0)
ref = adapted.visual(x)
ref_grad, = torch.autograd.grad(ref.square().sum(), x)
assert not calls and short_sequence_attention([adapted.visual]) == 1
out = adapted.visual(x)
grad, = torch.autograd.grad(out.square().sum(), x)
assert len(calls) == len(visual.transformer.resblocks), calls
torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
print("interpreted checks passed")
'''


def run_in_triton_interpreter(checks: str, tmp_path: Path) -> None:
    """Run the script ``checks`` with Triton's interpreter on (read when Triton is imported, so in
    a process of its own); it must end by printing "interpreted checks passed"."""
    script = tmp_path / "checks.py"
    script.write_text(checks)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "interpreted checks passed" in proc.stdout


def test_kernel_matches_torch_attention_in_the_interpreter(tmp_path):
    run_in_triton_interpreter(_INTERPRETED_CHECKS, tmp_path)


def test_without_a_gpu_the_module_is_torch_attention():
    """On a CPU (no interpreter) the kernel does not apply and the rewritten module computes
    nn.MultiheadAttention's function through torch's attention, with its parameters."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 10, 64, requires_grad=True)
    ref, _ = mha(x, x, x, need_weights=False)
    ref_grad, = torch.autograd.grad(ref.sum(), x)
    assert not applies(torch.randn(2, 10, 192), 4)
    mha.__class__ = ShortSequenceAttention
    out, _ = mha(x, x, x, need_weights=False)
    grad, = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    # what the kernel does not cover goes to nn.MultiheadAttention's own forward
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[:, -1] = True
    masked, weights = mha(x, x, x, attn_mask=mask)
    assert weights.shape == (2, 10, 10) and torch.all(weights[..., -1] == 0)
    assert reference_attention(torch.cat([x] * 3, -1), 4).shape == (2, 10, 64)
