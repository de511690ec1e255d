"""Fused LoRA linear forward for few tokens, computed transposed: ``yᵀ = W·xᵀ + bias + B·Sᵀ`` (W dense or NF4).

The same operation as :func:`fastlora.kernels.lora_linear.lora_linear`, tiled the other way round. With M <= 64
tokens, ``x·Wᵀ`` puts the tokens on the matrix instruction's M side, which Hopper's wgmma needs to be >= 64 rows
per warpgroup, so Triton falls back to mma.sync and stages the unpacked W tile through shared memory. Here the W
tile [BLOCK_N >= 64, BLOCK_K] is the left operand: Triton emits wgmma with W straight from registers (no
register -> shared round trip), and the tokens are the instruction's N side (16 to 64). NF4 with an even K is
decoded a byte at a time (:func:`fastlora.kernels.common.nf4_tile`).

At M <= 16 a 4096-row W has only 64 such tiles for 132 SMs, so K is split over ``SPLIT_K`` programs per tile:
the last to finish sums their fp32 partials in split order (:mod:`fastlora.kernels.split_reduce`) and applies the
epilogue. One launch, and the same bits on every run.
``bench/results/static-sm90-*/report.md`` has the compiled code's figures; no GPU has timed it yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels import common, split_reduce
from fastlora.kernels.lora_linear import BASE_DENSE, BASE_NF4


def _config(bn: int, bm: int, bk: int, warps: int, stages: int, split_k: int = 1) -> triton.Config:
    kwargs = {"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "SPLIT_K": split_k}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


# BLOCK_N (W rows) is the wgmma M side: 64 per warpgroup. BLOCK_M (tokens) is its N side. NF4 keeps BLOCK_K=64 so
# a tile row lies inside one absmax block (one scale per row). A 4096-row W at M <= 16 gives 64 tiles of 64 rows:
# split K in 2 or 4 to occupy 128 or 256 programs on 132 SMs.
CONFIGS = {
    "hopper-nf4": [
        _config(64, 16, 64, 4, 4),
        _config(64, 16, 64, 4, 4, split_k=2),
        _config(64, 16, 64, 4, 4, split_k=4),
        _config(64, 32, 64, 4, 4, split_k=2),
        _config(64, 64, 64, 4, 3),
    ],
    "hopper-dense": [
        _config(64, 16, 128, 4, 4),
        _config(64, 16, 128, 4, 4, split_k=2),
        _config(64, 16, 128, 4, 4, split_k=4),
        _config(64, 32, 128, 4, 4, split_k=2),
        _config(64, 64, 64, 4, 4),
    ],
    "ampere-nf4": [_config(64, 16, 64, 4, 3, split_k=2), _config(32, 16, 64, 4, 3)],
    "ampere-dense": [_config(64, 16, 128, 4, 3, split_k=2), _config(32, 16, 128, 4, 3)],
    "fp32": [_config(32, 16, 32, 4, 3)],
}
#: The launcher's workspace holds this many fp32 partials of y.
MAX_SPLIT_K = max(cfg.kwargs["SPLIT_K"] for configs in CONFIGS.values() for cfg in configs)


config_set = common.config_set_by_base("x_ptr", BASE_NF4)


#: Small tiles so interpreter tests cross tile edges in every dimension, and two K splits to test their sum.
INTERPRETER_CONFIG = _config(32, 16, 32, 4, 1, split_k=2)


@common.autotuned(
    CONFIGS, config_set, INTERPRETER_CONFIG, key=common.BASE_GEMM_KEY,
    hooks=common.TrialHooks(reset_to_zero=["count_ptr"]),  # each trial's split sums count arrivals from zero
)  # fmt: skip
@triton.jit
def lora_linear_transposed_kernel(
    x_ptr, w_ptr, absmax_ptr, table_ptr, bias_ptr, s_ptr, b_ptr, scale_ptr, y_ptr,
    partial_ptr, count_ptr,
    M, N, K, R, M_BUCKET,
    BASE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    R_BLOCK: tl.constexpr, BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok, m_ok = rows_n < N, rows_m < M
    out_ok = n_ok[:, None] & m_ok[None, :]
    yt_offsets = rows_m.to(tl.int64)[None, :] * N + rows_n[:, None]  # y[m, n] at acc[n, m]
    row_scale: tl.constexpr = K_ALIGNED and BLOCKSIZE % BLOCK_K == 0
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = tl.program_id(2) * k_span
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, min(k_start + k_span, K), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < K
        x_t = tl.load(x_ptr + rows_m.to(tl.int64)[None, :] * K + cols[:, None], mask=k_ok[:, None] & m_ok[None, :], other=0.0)
        if BASE == 1:  # BASE_DENSE (a module global is not a constexpr inside @triton.jit)
            w_ptrs = w_ptr + rows_n.to(tl.int64)[:, None] * K + cols[None, :]
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            w = common.nf4_tile(w_ptr, absmax_ptr, table_ptr, rows_n, k0, N, K, BLOCKSIZE, BLOCK_K, EVEN_K, row_scale)
        acc = tl.dot(w.to(x_t.dtype), x_t, acc, input_precision=PRECISION)

    last = True
    if SPLIT_K > 1:
        tile = count_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        acc, last = split_reduce.sum_splits(acc, partial_ptr, tile, tl.program_id(2), yt_offsets, out_ok, M * N, SPLIT_K)
    if last:
        if HAS_LORA:
            ranks = tl.arange(0, R_BLOCK)
            r_ok = ranks < R
            b_ptrs = b_ptr + rows_n.to(tl.int64)[:, None] * R + ranks[None, :]
            b = tl.load(b_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)
            s_ptrs = s_ptr + rows_m.to(tl.int64)[None, :] * R + ranks[:, None]
            s_t = tl.load(s_ptrs, mask=r_ok[:, None] & m_ok[None, :], other=0.0)
            acc = tl.dot(b.to(tl.float32), s_t.to(tl.float32), acc, input_precision=LORA_PRECISION)
        if HAS_COL_SCALE:  # scales base and LoRA terms, not the bias
            acc *= tl.load(scale_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + yt_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


def few_token_operands(
    op: str, path: str | None, weight: torch.Tensor, absmax: torch.Tensor | None, m: int
) -> tuple[torch.Tensor, int]:
    """``(W as the transposed kernels index it, BASE)`` for a call of ``op`` on ``m`` tokens; a clear error for what
    these kernels do not take: a path other than "fused", 8-bit W, more than :data:`common.MAX_FEW_TOKENS` tokens.

    Usage: ``weight, base = few_token_operands("lora_linear_transposed", None, packed, absmax, 8)``
    """
    if path not in (None, "fused"):
        raise ValueError(f"{op} is a fused kernel only, not path={path!r}")
    if absmax is not None and weight.dtype == torch.int8:
        raise ValueError(f"{op} reads dense or NF4 W, not 8-bit codes")
    if m > common.MAX_FEW_TOKENS:
        raise ValueError(f"{op} takes at most {common.MAX_FEW_TOKENS} tokens (a decode-size kernel), not {m}")
    if absmax is not None:
        return common.packed_bytes(weight), BASE_NF4
    return weight.contiguous(), BASE_DENSE  # indexed with row stride K


def lora_linear_transposed(
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
    """``y[M, N] = x·Wᵀ + bias + S·Bᵀ`` (with ``col_scale``: ``col_scale ⊙ (x·Wᵀ + S·Bᵀ) + bias``), as
    :func:`fastlora.kernels.lora_linear.lora_linear` computes it, in one fused kernel tiled for few tokens.

    A candidate for M <= 64 tokens (:data:`common.MAX_FEW_TOKENS`), dense or NF4 W (not 8-bit). It is one fused
    path: ``path`` may only be None or "fused".

    Usage: ``y = lora_linear_transposed(x, packed, absmax, 64, None, s, b)``
    """
    m, k = x.shape
    n, r = lora_b.shape
    weight, base = few_token_operands("lora_linear_transposed", path, weight, absmax, m)
    x, lora_s, lora_b = x.contiguous(), lora_s.contiguous(), lora_b.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partials = torch.empty((MAX_SPLIT_K, m, n), dtype=torch.float32, device=x.device)
    counters = split_reduce.tile_counters(common.cdiv(n, 16) * common.cdiv(m, 16), x.device)  # enough for the smallest tiles
    grid = lambda meta: (common.cdiv(n, meta["BLOCK_N"]), common.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_K"])  # noqa: E731
    bucket, r_block = common.m_bucket(m), common.rank_block(r)
    common.launch(
        lora_linear_transposed_kernel, grid, (x.device, x.dtype, weight.dtype, bucket, n, k, r_block, base),
        x, weight, absmax if absmax is not None else y, common.nf4_decode_table(x.device),
        bias if bias is not None else y, lora_s, lora_b, col_scale if col_scale is not None else y, y,
        partials, counters,
        m, n, k, r, bucket,
        BASE=base, HAS_BIAS=bias is not None, HAS_LORA=r > 0, HAS_COL_SCALE=col_scale is not None, R_BLOCK=r_block,
        **common.base_gemm_constexprs(blocksize, k, x.dtype),
    )  # fmt: skip
    return y
