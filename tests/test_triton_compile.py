"""mmtard's Triton kernels compile for the GPUs they are meant for, without a GPU.

Triton's CPU interpreter (the other kernel tests) runs a kernel's arithmetic but not its compiler:
a type that changes inside a loop or an ``if``, a block shape the tensor cores do not take, or a
layout ptxas cannot fit surface only when the kernel is compiled for a GPU. Triton compiles ahead
of time for a named target with the ptxas it ships, so these are checked here, for Hopper (sm_90:
where the kernels were timed) and Ampere (sm_80: the oldest ``train.attention: auto`` takes), in
bf16, at the shapes the paper's models give them, and for every tile shape the autotuner may pick.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mmtard import short_attention, split_attention  # noqa: E402

TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
#: shared memory one program may use, per target architecture (H100: 227 KiB, A100: 163 KiB)
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def _compile(kernel, pointers: dict[str, str], constexprs: dict[str, int], target, num_warps: int,
             num_stages: int = 3):
    """Compile ``kernel`` for ``target``: pointer arguments of the given element types, ``scale*``
    arguments fp32, the other runtime arguments i32. Returns the compiled kernel's metadata."""
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
        else:
            signature[name] = "fp32" if name.startswith("scale") else "i32"
    # as a real launch specialises them: pointers and strides divisible by 16
    divisible = [name for name in names if name in pointers or "stride" in name]
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()},
                       attrs={(names.index(name),): [["tt.divisibility", 16]] for name in divisible})
    compiled = triton.compile(source, target=target, options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.asm["cubin"], "no machine code"
    return compiled.metadata


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t.arch}")
def test_short_attention_kernels_compile(target):
    """The student's kernels at ViT-B-32's heads (64 wide) and the ViT-L-14's (the 64-token block)."""
    shape = {"EMBED": 768, "HEAD_DIM": 64, "BLOCK": short_attention.MAX_TOKENS}
    _compile(short_attention._forward_kernel, {"qkv": "bf16", "out": "bf16", "lse": "fp32"}, shape, target,
             short_attention.FORWARD_WARPS)
    _compile(short_attention._backward_kernel,
             {"qkv": "bf16", "grad_out": "bf16", "lse": "fp32", "grad_qkv": "bf16"}, shape, target,
             short_attention.BACKWARD_WARPS)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t.arch}")
def test_split_attention_kernel_compiles_for_every_autotuned_tile(target):
    """A ViT-L-14 teacher's attention (16 heads of 64), each tile shape the autotuner tries."""
    for config in split_attention._CONFIGS:
        meta = _compile(split_attention._split_forward_kernel, {"qkv": "bf16", "out": "bf16"},
                        {"EMBED": 1024, "HEAD_DIM": 64, "CLASS_ROWS": split_attention.CLASS_ROWS, **config.kwargs},
                        target, config.num_warps, config.num_stages)
        assert meta.shared <= SHARED_LIMIT[target.arch], (config, meta.shared)
