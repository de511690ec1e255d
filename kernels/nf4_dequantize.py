"""NF4 dequantization: packed bitsandbytes codes + fp32 absmax -> W[N, K] in bf16/fp16/fp32.

Bit-identical to ``bitsandbytes.functional.dequantize_4bit``: value = table[code] * absmax in fp32, then one
cast. Used by the split path (dequantize into a reused buffer, then cuBLAS) and as an op of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels import common

CONFIGS = {
    "hopper": [triton.Config({"BLOCK": 2048}, num_warps=4), triton.Config({"BLOCK": 4096}, num_warps=8)],
    "ampere": [triton.Config({"BLOCK": 1024}, num_warps=4), triton.Config({"BLOCK": 2048}, num_warps=4)],
}
INTERPRETER_CONFIG = triton.Config({"BLOCK": 256}, num_warps=4)


@common.autotuned(CONFIGS, common.by_generation, INTERPRETER_CONFIG, key=["NUMEL", "BLOCKSIZE"])
@triton.jit
def nf4_dequantize_kernel(packed_ptr, absmax_ptr, table_ptr, out_ptr, NUMEL, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    # One program unpacks BLOCK flat elements from BLOCK // 2 bytes (element 2i: high nibble of byte i).
    first = tl.program_id(0).to(tl.int64) * BLOCK
    byte_idx = first // 2 + tl.arange(0, BLOCK // 2)
    byte = tl.load(packed_ptr + byte_idx, mask=byte_idx * 2 < NUMEL, other=0).to(tl.int32)
    codes = tl.interleave(byte >> 4, byte & 0xF)
    flat = first + tl.arange(0, BLOCK)
    ok = flat < NUMEL
    scale = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=ok, other=0.0)
    tl.store(out_ptr + flat, (tl.load(table_ptr + codes) * scale).to(out_ptr.dtype.element_ty), mask=ok)


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """W[n, k] in ``dtype`` from flat packed u8 codes and fp32 absmax (one per ``blocksize`` flat elements).

    ``out`` (contiguous, n*k elements of ``dtype``) is filled and returned instead of a fresh tensor.

    Usage: ``w = nf4_dequantize(packed, absmax, 64, 4096, 4096, torch.bfloat16)``
    """
    out = torch.empty((n, k), dtype=dtype, device=packed.device) if out is None else out.view(n, k)
    numel = n * k
    grid = lambda meta: (common.cdiv(numel, meta["BLOCK"]),)  # noqa: E731
    common.launch(
        nf4_dequantize_kernel, grid, (packed.device, out.dtype, numel, blocksize),
        common.packed_bytes(packed), absmax, common.table(packed.device), out, numel, BLOCKSIZE=blocksize,
    )  # fmt: skip
    return out
