"""Fused LoRA linear forward: ``y = x·Wᵀ + bias + S·Bᵀ`` with W dense, NF4 or 8-bit, one store of y; with a
per-column scale c (DoRA's m/‖W + s·B·A‖), ``y = c ⊙ (x·Wᵀ + S·Bᵀ) + bias`` in the same epilogue.

NF4 and 8-bit W are dequantized in registers tile by tile and never written to memory (a dense W is read through
its strides, so a transposed view such as GPT-2's Conv1D weight is never copied); the base GEMM and the low-rank
epilogue (S = s·drop(x)·Aᵀ from :mod:`fastlora.kernels.lora_down`, with the LoRA scales, and B) accumulate
in one fp32 tile. The same kernel with ``BASE=0`` is the epilogue alone, adding bias + S·Bᵀ onto a y that
cuBLAS already holds: that is the "split" path :mod:`fastlora.kernels.dispatch` picks where it measures faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels import common, dispatch
from fastlora.kernels.int8_dequantize import int8_dequantize
from fastlora.kernels.nf4_dequantize import nf4_dequantize

#: Values of the BASE constexpr: where x·Wᵀ comes from.
BASE_IN_OUTPUT, BASE_DENSE, BASE_NF4, BASE_INT8 = 0, 1, 2, 3
#: The base name :func:`fastlora.kernels.dispatch.choice` knows per kind. 8-bit has no default rule of its own there
#: yet: like NF4, its fused kernel saves the dequantized copy of W, so it shares NF4's guessed crossover.
DISPATCH_BASE = {BASE_DENSE: "dense", BASE_NF4: "nf4", BASE_INT8: "nf4"}


def base_kind(weight: torch.Tensor, absmax: torch.Tensor | None) -> int:
    """The BASE kind of the op arguments: dense without ``absmax``, 8-bit for int8 codes with their per-row scales
    in ``absmax``, else NF4. Usage: ``base_kind(layer.weight, layer.state.SCB)  # BASE_INT8``"""
    if absmax is None:
        return BASE_DENSE
    return BASE_INT8 if weight.dtype == torch.int8 else BASE_NF4


def kernel_weight(weight: torch.Tensor, kind: int) -> torch.Tensor:
    """W as the kernels index it: NF4 as flat bytes, 8-bit codes row-major, dense as given (read through its
    strides). Usage: ``weight = kernel_weight(weight, base_kind(weight, absmax))``"""
    if kind == BASE_NF4:
        return common.packed_bytes(weight)
    return weight.contiguous() if kind == BASE_INT8 else weight


def weight_strides(weight: torch.Tensor) -> tuple[int, int]:
    """(row, column) strides of a dense or 8-bit W [N, K]; (0, 0) for NF4's flat bytes (nf4_tile indexes them
    itself). Usage: ``stride_wn, stride_wk = weight_strides(conv1d.weight.T)  # (1, N)``"""
    return (weight.stride(0), weight.stride(1)) if weight.dim() == 2 else (0, 0)


def split_weight(weight, absmax, blocksize: int, n: int, k: int, dtype: torch.dtype, kind: int) -> torch.Tensor:
    """W [N, K] for the split path's cuBLAS GEMM: quantized kinds dequantized into the reused buffer, dense as given.
    Usage: ``torch.matmul(x, split_weight(weight, absmax, 64, n, k, x.dtype, kind).T, out=y)``"""
    if kind == BASE_DENSE:
        return weight.to(dtype)
    buffer = dispatch.dequant_buffer(n, k, dtype, weight.device)
    if kind == BASE_INT8:
        return int8_dequantize(weight, absmax, dtype, out=buffer)
    return nf4_dequantize(weight, absmax, blocksize, n, k, dtype, out=buffer)


_config = common.gemm_config


# Config sets, chosen per launch by GPU generation, base kind and dtype (``config_set``). Hopper: large tiles
# for compute-bound M; narrow N tiles at small M so a 4096-wide layer still spreads over 132 SMs while
# streaming W (decode is bound by reading W). NF4 keeps BLOCK_K=64: the tile stays inside one absmax block
# (one scale per row) and the unpacked tile plus its gathers fit registers; wider K tiles spill. NF4 decoding
# costs issue slots per W element, so its share per multiply-add falls as 1/BLOCK_M: the 256-row tile is the one
# whose SASS issues in about half the clocks its wgmmas take (bench/results/static-sm90-*).
CONFIGS = {
    "hopper-nf4": [
        _config(256, 128, 64, 8, 3),
        _config(128, 128, 64, 8, 3),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        _config(64, 64, 64, 4, 4),
        _config(32, 64, 64, 4, 4),
        _config(16, 64, 64, 4, 4),
        _config(16, 32, 64, 4, 4),
        _config(16, 16, 64, 2, 4),
    ],
    "hopper-dense": [
        _config(128, 128, 64, 8, 3),
        _config(128, 64, 64, 4, 4),
        _config(64, 128, 64, 4, 4),
        _config(64, 64, 64, 4, 4),
        _config(32, 64, 128, 4, 4),
        _config(16, 64, 128, 4, 4),
        _config(16, 32, 256, 4, 3),
        _config(16, 16, 256, 2, 4),
    ],
    "ampere-nf4": [
        _config(128, 128, 32, 8, 3),
        _config(128, 64, 32, 4, 4),
        _config(64, 64, 32, 4, 4),
        _config(16, 64, 64, 4, 3),
        _config(16, 32, 64, 4, 3),
    ],
    "ampere-dense": [
        _config(128, 128, 32, 8, 3),
        _config(128, 64, 32, 4, 4),
        _config(64, 64, 32, 4, 4),
        _config(16, 64, 128, 4, 3),
        _config(16, 32, 128, 4, 3),
    ],
    "fp32": [_config(64, 64, 32, 8, 3), _config(32, 64, 32, 4, 3), _config(16, 32, 32, 4, 3)],
}


config_set = common.config_set_by_base("x_ptr", BASE_NF4)


#: Small tiles so interpreter tests cross tile edges in every dimension.
INTERPRETER_CONFIG = _config(32, 32, 32, 4, 1, group_m=2)


@common.autotuned(
    CONFIGS, config_set, INTERPRETER_CONFIG, key=common.BASE_GEMM_KEY,
    hooks=common.TrialHooks(restore_value=["y_ptr"], accumulates=lambda args: args["BASE"] == 0),  # adds onto y
)  # fmt: skip
@triton.jit
def lora_linear_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, bias_ptr, s_ptr, b_ptr, scale_ptr, y_ptr,
    M, N, K, R, M_BUCKET, stride_wn, stride_wk,
    BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    R_BLOCK: tl.constexpr,
    BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = common.grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rows_m < M, rows_n < N
    y_ptrs = y_ptr + rows_m.to(tl.int64)[:, None] * N + rows_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]

    if BASE == 0:
        acc = tl.load(y_ptrs, mask=out_ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            k_ok = cols < K
            x = tl.load(x_ptr + rows_m.to(tl.int64)[:, None] * K + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if BASE == 1:
                w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wk
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(x.dtype)
            elif BASE == 3:
                w = common.int8_tile(w_ptr, absmax_ptr, rows_n, cols, N, K).to(x.dtype)
            else:
                w = common.nf4_tile(
                    w_ptr, absmax_ptr, table_ptr, rows_n, k0, N, K,
                    BLOCKSIZE, BLOCK_K, EVEN_K, K_ALIGNED and BLOCKSIZE % BLOCK_K == 0,
                ).to(x.dtype)  # fmt: skip
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)

    if HAS_LORA:
        ranks = tl.arange(0, R_BLOCK)
        r_ok = ranks < R
        s = tl.load(s_ptr + rows_m.to(tl.int64)[:, None] * R + ranks[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        b = tl.load(b_ptr + rows_n.to(tl.int64)[:, None] * R + ranks[None, :], mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(s.to(tl.float32), tl.trans(b.to(tl.float32)), acc, input_precision=LORA_PRECISION)
    if HAS_COL_SCALE:  # scales base and LoRA terms, not the bias
        acc *= tl.load(scale_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def _launch(x, weight, absmax, blocksize, bias, lora_s, lora_b, col_scale, y, base: int) -> torch.Tensor:
    m, k = x.shape
    n, r = lora_b.shape
    grid = lambda meta: (common.cdiv(m, meta["BLOCK_M"]) * common.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    bucket, r_block = common.m_bucket(m), common.rank_block(r)
    common.launch(
        lora_linear_kernel, grid, (x.device, x.dtype, weight.dtype, bucket, n, k, r_block, base),
        x, weight, absmax if absmax is not None else y, common.nf4_decode_table(x.device),
        bias if bias is not None else y, lora_s, lora_b, col_scale if col_scale is not None else y, y,
        m, n, k, r, bucket, *weight_strides(weight),
        BASE=base, HAS_BIAS=bias is not None, HAS_LORA=r > 0, HAS_COL_SCALE=col_scale is not None, R_BLOCK=r_block,
        **common.base_gemm_constexprs(blocksize, k, x.dtype),
    )  # fmt: skip
    return y


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    blocksize: int,
    bias: torch.Tensor | None,
    lora_s: torch.Tensor,
    lora_b: torch.Tensor,
    col_scale: torch.Tensor | None = None,
    path: str | None = None,
) -> torch.Tensor:
    """``y[M, N] = x·Wᵀ + bias + S·Bᵀ`` in x's dtype; W dense [N, K] (any strides), or with ``absmax`` NF4-packed
    u8 or 8-bit int8 [N, K] (``absmax`` = per-row SCB) (:func:`base_kind`).
    With ``col_scale`` (fp32 [N]): ``y = col_scale ⊙ (x·Wᵀ + S·Bᵀ) + bias``.

    ``path`` forces "fused" or "split"; by default :func:`fastlora.kernels.dispatch.choice` decides.

    Usage: ``y = lora_linear(x, packed, absmax, 64, None, s, b)``
    """
    m, k = x.shape
    n = lora_b.shape[0]
    kind = base_kind(weight, absmax)
    x, lora_s, lora_b = x.contiguous(), lora_s.contiguous(), lora_b.contiguous()
    weight = kernel_weight(weight, kind)
    path = path or dispatch.choice("forward", DISPATCH_BASE[kind], m, n, k, x.dtype).path
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if path == "fused":
        return _launch(x, weight, absmax, blocksize, bias, lora_s, lora_b, col_scale, y, kind)
    weight = split_weight(weight, absmax, blocksize, n, k, x.dtype, kind)
    torch.matmul(x, weight.T, out=y)
    return _launch(x, weight, None, blocksize, bias, lora_s, lora_b, col_scale, y, BASE_IN_OUTPUT)
