"""mmtard's forward-only attention with the class token apart (train.teacher_attention: split).

As for the short kernel, the Triton program runs in Triton's CPU interpreter (TRITON_INTERPRET=1,
read when Triton is imported), so those checks run in a subprocess: outputs against torch's
attention in fp32 (exact up to summation order) and fp16 (probabilities rounded to the inputs'
type, as flash attention does), and a rewritten ViT tower against open_clip's.
"""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from mmtard.config import load_config
from mmtard.errors import ConfigError
from mmtard.split_attention import SplitClassTokenAttention, applies
from mmtard.tower_rewrites import image_towers, split_class_token_attention, wants_split_attention
from mmtard.trainer import Trainer
from test_short_attention import run_in_triton_interpreter
from test_trainer import tiny_overrides

pytest.importorskip("triton")

_INTERPRETED_CHECKS = r'''
import torch
from open_clip.transformer import VisionTransformer
from mmtard.short_attention import INTERPRETED, reference_attention
from mmtard.split_attention import SplitClassTokenAttention, applies, split_attention
from mmtard.tower_rewrites import class_token_last_block, split_class_token_attention

assert INTERPRETED
torch.manual_seed(0)
# the kernel against torch's attention: 257 tokens (a 16 x 16 grid and the class token), lengths
# that leave a partial tile, a class token alone, every head size
for dtype, atol in ((torch.float32, 2e-6), (torch.float16, 3e-3)):
    for tokens, heads, dim in ((257, 2, 64), (1, 2, 32), (2, 1, 16), (70, 2, 128)):
        qkv = torch.randn(2, tokens, 3 * heads * dim, dtype=dtype)
        assert applies(qkv, heads)
        out = split_attention(qkv, heads)
        torch.testing.assert_close(out.double(), reference_attention(qkv.double(), heads), atol=atol, rtol=0)
# a strided view of a larger projection is read in place
wide = torch.randn(2, 9, 4 * 64)
torch.testing.assert_close(split_attention(wide[..., :192], 1), reference_attention(wide[..., :192], 1))
# torch's FLOP counter counts the kernel as it counts its own attention
from torch.utils.flop_counter import FlopCounterMode
with FlopCounterMode(display=False) as counter:
    split_attention(torch.randn(2, 70, 3 * 2 * 32), 2)
assert counter.get_total_flops() == 4 * 2 * 70 * 70 * 64, counter.get_total_flops()
# a call that wants a gradient is not served
needs_grad = torch.randn(1, 70, 192, requires_grad=True)
assert not applies(needs_grad, 1)
with torch.no_grad():
    assert applies(needs_grad, 1)

# a whole frozen tower of 82 tokens (9 x 9 patches and the class token), rewritten: open_clip's
# outputs without gradient (the kernel), and with one (torch's attention), also compiled, also
# with the class-token last block (whose separate query goes to the parent's forward)
visual = VisionTransformer(image_size=72, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0,
                           output_dim=32).eval()
x = torch.rand(3, 3, 72, 72, requires_grad=True)
ref = visual(x)
ref_grad, = torch.autograd.grad(ref.square().sum(), x)
keys = list(visual.state_dict())
assert split_class_token_attention([visual]) == 1 and list(visual.state_dict()) == keys
import mmtard.split_attention as split
calls = []
kernel = split.split_attention
split.split_attention = lambda qkv, heads: calls.append(qkv.shape) or kernel(qkv, heads)
for tower in (visual, torch.compile(visual, backend="aot_eager")):
    with torch.no_grad():
        torch.testing.assert_close(tower(x), ref, atol=1e-5, rtol=1e-5)
    out = tower(x)
    grad, = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-5)
assert len(calls) == 2 * 2, calls  # two blocks, eager and compiled, without gradient only
class_token_last_block([visual])
with torch.no_grad():
    torch.testing.assert_close(visual(x), ref, atol=1e-5, rtol=1e-5)
print("interpreted checks passed")
'''


def test_kernel_matches_torch_attention_in_the_interpreter(tmp_path):
    run_in_triton_interpreter(_INTERPRETED_CHECKS, tmp_path)


def test_without_a_gpu_the_rewritten_tower_is_open_clips():
    """On a CPU (no interpreter) the kernel does not apply: the rewritten tower computes open_clip's
    function through torch's attention, with and without gradient."""
    torch.manual_seed(0)
    visual = VisionTransformer(image_size=72, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0,
                               output_dim=32).eval()
    x = torch.rand(2, 3, 72, 72)
    with torch.no_grad():
        ref = visual(x)
        assert not applies(torch.randn(2, 82, 192), 2)
        split_class_token_attention([visual])
        assert all(type(b.attn) is SplitClassTokenAttention for b in visual.transformer.resblocks)
        torch.testing.assert_close(visual(x), ref, atol=1e-6, rtol=1e-5)


def test_short_towers_keep_their_attention():
    """Towers of at most 64 tokens (the short kernel's) are left to train.attention's choice."""
    short = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=32)
    assert split_class_token_attention([short]) == 0
    assert all(type(b.attn) is nn.MultiheadAttention for b in short.transformer.resblocks)


def test_auto_means_split_on_a_gpu_only(monkeypatch):
    """``auto`` runs the split kernel where the short kernel runs (an NVIDIA GPU of compute
    capability 8.0 or later), torch's attention on a CPU or an older GPU; ``torch`` never."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU as auto sees one
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert wants_split_attention("auto", cuda) and wants_split_attention("split", cpu)
    assert not wants_split_attention("auto", cpu) and not wants_split_attention("torch", cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert not wants_split_attention("auto", cuda) and wants_split_attention("split", cuda)


def test_train_teacher_attention_setting(world_dir, tmp_path, caplog):
    """``split`` is applied by the trainer to the frozen towers only: the test's small teachers
    (37 tokens) are short, so nothing changes and the trainer says why; ``auto`` on a CPU changes nothing."""
    with caplog.at_level("WARNING"):
        split = Trainer(load_config(None, tiny_overrides(world_dir, **{"train.teacher_attention": "split"})),
                        tmp_path / "split", show_progress=False)
    assert "train.teacher_attention=split: no teacher or reference tower" in caplog.text
    plain = Trainer(load_config(None, tiny_overrides(world_dir)), tmp_path / "auto", show_progress=False)
    for trainer in (split, plain):
        assert all(type(b.attn) is nn.MultiheadAttention for t in image_towers(trainer.method)
                   for b in t.transformer.resblocks)
    with pytest.raises(ConfigError, match="train.teacher_attention: 'fast' is not one of auto, torch, split"):
        load_config(None, tiny_overrides(world_dir, **{"train.teacher_attention": "fast"}))
