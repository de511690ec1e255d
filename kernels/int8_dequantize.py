"""bitsandbytes 8-bit dequantization: int8 codes W[N, K] + per-row fp32 SCB [N] -> W[N, K] in bf16/fp16/fp32.

Bit-identical to ``bitsandbytes.functional.int8_vectorwise_dequant`` followed by one cast: ``code * SCB[row] *
(1/127)`` in fp32 (:func:`fastlora.kernels.common.int8_tile`). Used by the split path (dequantize into a reused
buffer, then cuBLAS) for 8-bit bases.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels import common


def _config(block_n: int, block_k: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps)


# A program writes BLOCK_N rows x BLOCK_K columns: wide K tiles keep the int8 reads and the stores contiguous.
CONFIGS = {"hopper": [_config(8, 512, 4), _config(16, 512, 8)], "ampere": [_config(4, 512, 4), _config(8, 256, 4)]}
#: Small tiles so interpreter tests cross tile edges in both dimensions.
INTERPRETER_CONFIG = _config(8, 32, 4)


@common.autotuned(CONFIGS, common.by_generation, INTERPRETER_CONFIG, key=["N", "K"])
@triton.jit
def int8_dequantize_kernel(codes_ptr, scb_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    w = common.int8_tile(codes_ptr, scb_ptr, rows, cols, N, K)
    ok = (rows < N)[:, None] & (cols < K)[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def int8_dequantize(
    codes: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """W[n, k] in ``dtype`` from int8 codes [n, k] (row-major) and their fp32 per-row scales SCB [n].

    ``out`` (contiguous, n*k elements of ``dtype``) is filled and returned instead of a fresh tensor.

    Usage: ``w = int8_dequantize(layer.weight, layer.state.SCB, torch.bfloat16)``
    """
    n, k = codes.shape
    out = torch.empty((n, k), dtype=dtype, device=codes.device) if out is None else out.view(n, k)
    grid = lambda meta: (common.cdiv(n, meta["BLOCK_N"]), common.cdiv(k, meta["BLOCK_K"]))  # noqa: E731
    common.launch(
        int8_dequantize_kernel, grid, (codes.device, out.dtype, n, k), codes.contiguous(), scb, out, n, k,
    )  # fmt: skip
    return out
