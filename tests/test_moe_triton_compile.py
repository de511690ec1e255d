"""The grouped LoRA Triton kernels compile for Hopper (sm_90) without a GPU, in fp32 and bf16, with and without
the LoRA epilogue and column scales; static checks only (shared memory within the per-block limit)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="static compilation needs Triton without the interpreter"
)
triton = pytest.importorskip("triton")

from fastlora.kernels import grouped_lora, grouped_lora_weight_grad  # noqa: E402

SHARED_LIMIT_SM90 = 232448


def _compile(fn, pointer_types: dict, constexprs: dict, num_warps=4, num_stages=3):
    from triton.backends.compiler import GPUTarget

    signature = {}
    for param in fn.params:
        name = param.name
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
        else:
            signature[name] = "i32"
    source = triton.compiler.ASTSource(fn, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("has_lora,has_scale", [(True, False), (False, True)])
def test_grouped_lora_kernel_compiles_for_sm90(dtype, has_lora, has_scale):
    pointers = {"x_ptr": dtype, "w_ptr": dtype, "out_ptr": dtype, "offsets_ptr": "i32", "tile_ends_ptr": "i32"}
    constexprs = dict(HAS_LORA=has_lora, HAS_SCALE=has_scale, BLOCK_E=128, BLOCK_R=16, BLOCK_M=grouped_lora.BLOCK_M,
                      BLOCK_N=grouped_lora.BLOCK_N, BLOCK_K=grouped_lora.BLOCK_K,
                      PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=dtype == "fp32", **grouped_lora.DENSE_W)  # fmt: skip
    compiled = _compile(grouped_lora.grouped_lora_kernel, pointers, constexprs)
    assert compiled.asm["cubin"] and compiled.metadata.shared <= SHARED_LIMIT_SM90


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weight_grad_kernel_compiles_for_sm90(dtype):
    m = grouped_lora_weight_grad
    pointers = {"p_ptr": dtype, "q_ptr": "fp32", "out_ptr": "fp32", "offsets_ptr": "i32"}
    constexprs = dict(BLOCK_I=m.BLOCK_I, BLOCK_J=m.BLOCK_J, BLOCK_T=m.BLOCK_T, PRECISION="tf32")
    compiled = _compile(m.grouped_weight_grad_kernel, pointers, constexprs)
    assert compiled.asm["cubin"] and compiled.metadata.shared <= SHARED_LIMIT_SM90
