"""Grouped GEMM over expert-sorted rows with a LoRA epilogue: one program per (expert row tile, output column tile).

For rows t of expert e (rows ``offsets[e-1]:offsets[e]``):

    out[t, n] = col_scale[n] · (Σ_k X[t, k]·W[e, n, k] + Σ_r S[t, r]·B[e, n, r])

W and B are read through their strides, so one kernel serves the four row-wise products of the grouped LoRA ops:
y = x·W_eᵀ + S·B_eᵀ; S = x·A_eᵀ (W := A, column scales = LoRA scales, no epilogue); dS = dy·B_e (W := B_eᵀ);
dx = dy·W_e + dS·A_e (W := W_eᵀ, B := A_eᵀ). Row tiles are laid out per expert from ``tile_ends`` (the cumulative
tile counts, computed on the device: no host sync); a program finds its expert by counting the ends at or below
its tile index, and programs past the last tile exit. x is read in its dtype, accumulation is fp32, one store.

W may be NF4 (:class:`NF4Operand`: bitsandbytes' codes and resolved absmax per expert, as
:mod:`fastlora.moe.nf4_experts` stores them): each W tile is decoded in registers (``common.nf4_tile``, as the
dense NF4 kernels do) and rounded to x's dtype, which is what ``dequantize_4bit`` to that dtype gives; for dx the
tile of W_eᵀ is read as rows of W_e (``W_TRANSPOSED``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from typing import NamedTuple, Optional

from fastlora.kernels import common

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
INTERPRETER_BLOCKS = (16, 32, 32)


@triton.jit
def grouped_lora_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, scale_ptr, out_ptr, offsets_ptr, tile_ends_ptr, absmax_ptr, table_ptr,
    N, K, R, E,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_sm, stride_sr, stride_be, stride_bn, stride_br,
    stride_om, stride_on, stride_ae,
    HAS_LORA: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    NF4: tl.constexpr, W_TRANSPOSED: tl.constexpr, BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, ROW_SCALE: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    tile_ends = tl.load(tile_ends_ptr + experts, mask=experts < E, other=2**30)
    expert = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
    if expert >= E:
        return
    first_tile = tl.sum(tl.where(experts == expert - 1, tile_ends, 0), axis=0)
    group_start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int32)
    group_end = tl.load(offsets_ptr + expert).to(tl.int32)
    rows = group_start + (tile - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < group_end, cols < N
    rows64 = rows.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    absmax_base = absmax_ptr + expert.to(tl.int64) * stride_ae
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if NF4:
            if W_TRANSPOSED:  # W_eᵀ (dx): rows ks, columns cols of W_e [K, N]
                w = common.nf4_tile(w_base, absmax_base, table_ptr, ks, tl.program_id(1) * BLOCK_N, K, N,
                                    BLOCKSIZE, BLOCK_N, EVEN_K, ROW_SCALE)  # fmt: skip
            else:
                w = tl.trans(common.nf4_tile(w_base, absmax_base, table_ptr, cols, k0, N, K, BLOCKSIZE, BLOCK_K, EVEN_K, ROW_SCALE))
            w = w.to(x.dtype)
        else:
            w = tl.load(w_base + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # mixed or fp32 operands; two 16-bit operands of one dtype go to tensor cores as they are
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(x, w)
    if HAS_LORA:
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            r_ok = rs < R
            s = tl.load(s_ptr + rows64[:, None] * stride_sm + rs[None, :] * stride_sr, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b_base + rs[:, None] * stride_br + cols[None, :] * stride_bn, mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.dot(s.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    out = out_ptr + rows64[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def tile_ends(offsets: torch.Tensor, block_m: int) -> torch.Tensor:
    """Cumulative row-tile counts per expert (int32, on the device: no host sync)."""
    counts = torch.diff(offsets.to(torch.int64), prepend=offsets.new_zeros(1, dtype=torch.int64))
    return torch.cumsum((counts + block_m - 1) // block_m, dim=0).to(torch.int32)


#: The NF4 constexprs of a dense W.
DENSE_W = dict(NF4=False, W_TRANSPOSED=False, BLOCKSIZE=1, EVEN_K=False, ROW_SCALE=False)


class NF4Operand(NamedTuple):
    """W as NF4 codes: ``packed`` u8 [E, ceil(N'·K'/2)] and fp32 ``absmax`` [E, ceil(N'·K'/blocksize)] per expert
    of W_e [N', K'] (``shape`` = (E, N', K')); ``transposed`` makes the operand W_eᵀ [K', N']."""

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: tuple[int, int, int]
    transposed: bool


def _nf4_arguments(nf4: Optional[NF4Operand], x: torch.Tensor, weight: torch.Tensor, block_n: int, block_k: int):
    """(W pointer, absmax pointer, table, its expert stride, constexprs) of the kernel for a dense or NF4 W."""
    if nf4 is None:
        return weight, weight, weight, 0, DENSE_W
    w_cols = nf4.shape[2]
    tile = block_n if nf4.transposed else block_k
    constexprs = dict(NF4=True, W_TRANSPOSED=nf4.transposed, BLOCKSIZE=nf4.blocksize, EVEN_K=w_cols % 2 == 0,
                      ROW_SCALE=w_cols % nf4.blocksize == 0 and nf4.blocksize % tile == 0)  # fmt: skip
    return nf4.packed, nf4.absmax, common.nf4_decode_table(x.device), nf4.absmax.stride(0), constexprs


def grouped_lora_matmul(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor | NF4Operand,
    lora_s: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """out [S, N] = col_scale ⊙ (x·W_eᵀ + S·B_eᵀ) per expert group; W [E, N, K] (any strides) or an
    :class:`NF4Operand`, B [E, N, R] (any strides).

    Usage: ``y = grouped_lora_matmul(x, offsets, w, s, b)``
    """
    rows, k = x.shape
    nf4 = weight if isinstance(weight, NF4Operand) else None
    if nf4 is not None:
        experts, n = nf4.shape[0], nf4.shape[1 if not nf4.transposed else 2]
        weight = nf4.packed
    else:
        experts, n = weight.shape[0], weight.shape[1]
    block_m, block_n, block_k = INTERPRETER_BLOCKS if common.interpreting() else (BLOCK_M, BLOCK_N, BLOCK_K)
    out = torch.zeros((rows, n), dtype=out_dtype or x.dtype, device=x.device)
    rank = 0 if lora_s is None else lora_s.shape[1]
    if rows == 0 or n == 0:
        return out
    has_lora = rank > 0
    s, b = (lora_s, lora_b) if has_lora else (out, weight)  # unused pointers when there is no LoRA term
    b_strides = (b.stride(0), b.stride(1), b.stride(2)) if has_lora else (0, 0, 0)
    scale = col_scale if col_scale is not None else out
    grid = (common.cdiv(rows, block_m) + experts, common.cdiv(n, block_n))
    w, absmax, table, stride_ae, nf4_constexprs = _nf4_arguments(nf4, x, weight, block_n, block_k)
    w_strides = (w.stride(0), 0, 0) if nf4 is not None else (w.stride(0), w.stride(1), w.stride(2))
    grouped_lora_kernel[grid](
        x, w, s, b, scale, out, offsets, tile_ends(offsets, block_m), absmax, table,
        n, k, rank, experts,
        x.stride(0), x.stride(1), *w_strides,
        s.stride(0), s.stride(1), *b_strides, out.stride(0), out.stride(1), stride_ae,
        HAS_LORA=has_lora, HAS_SCALE=col_scale is not None, BLOCK_E=common.next_power_of_2(max(experts, 2)),
        BLOCK_R=common.rank_block(rank), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=common.dot_precision(x.dtype),
        UPCAST=x.dtype == torch.float32 or (nf4 is None and x.dtype != weight.dtype), **nf4_constexprs,
    )  # fmt: skip
    return out
