"""Fused LoRA linear input gradient for few tokens, computed transposed:
``dxᵀ = Wᵀ·dyᵀ + Σ_a (A_aᵀ·dS_aᵀ) ⊙ keep_aᵀ / (1 - p_a)`` (W dense or NF4).

The same operation as :func:`fastlora.kernels.lora_linear_grad_input.lora_linear_grad_input`, tiled the other
way round for M <= 64 tokens, for the reason :mod:`fastlora.kernels.lora_linear_transposed` gives: the W tile
[BLOCK_N, BLOCK_K], transposed in registers to [BLOCK_K >= 64, BLOCK_N], is wgmma's left operand and the tokens
its N side. A 4096-column dx at M <= 16 has only 64 such tiles for 132 SMs, so the reduction over N is split over
``SPLIT_N`` programs per tile, whose fp32 partials the last to finish sums in split order
(:mod:`fastlora.kernels.split_reduce`) before the LoRA terms. ``bench/results/static-sm90-*/report.md`` has the
compiled code's figures; no GPU has timed it yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels import common, split_reduce
from fastlora.kernels.lora_linear import BASE_NF4
from fastlora.kernels.lora_linear_transposed import few_token_operands


def _config(bk: int, bm: int, bn: int, warps: int, stages: int, split_n: int = 1) -> triton.Config:
    kwargs = {"BLOCK_K": bk, "BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_N": split_n}
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


# BLOCK_K (output columns of dx) is the wgmma M side, BLOCK_N the reduction. NF4 keeps BLOCK_K=64: a W row's tile
# then lies inside one absmax block (one scale per row). K=4096 at M <= 16 gives 64 tiles: split N in 2 or 4.
CONFIGS = {
    "hopper-nf4": [
        _config(64, 16, 64, 4, 4),
        _config(64, 16, 64, 4, 4, split_n=2),
        _config(64, 16, 64, 4, 4, split_n=4),
        _config(64, 32, 64, 4, 4, split_n=2),
    ],
    "hopper-dense": [
        _config(64, 16, 128, 4, 4),
        _config(64, 16, 128, 4, 4, split_n=2),
        _config(64, 16, 128, 4, 4, split_n=4),
        _config(64, 32, 64, 4, 4, split_n=2),
    ],
    "ampere-nf4": [_config(64, 16, 64, 4, 3, split_n=2), _config(32, 16, 64, 4, 3)],
    "ampere-dense": [_config(64, 16, 64, 4, 3, split_n=2), _config(32, 16, 128, 4, 3)],
    "fp32": [_config(32, 16, 32, 4, 3)],
}
#: The launcher's workspace holds this many fp32 partials of dx.
MAX_SPLIT_N = max(cfg.kwargs["SPLIT_N"] for configs in CONFIGS.values() for cfg in configs)


config_set = common.config_set_by_base("dy_ptr", BASE_NF4)


#: Small tiles so interpreter tests cross tile edges in every dimension, and two N splits to test their sum.
INTERPRETER_CONFIG = _config(32, 16, 32, 4, 1, split_n=2)


@common.autotuned(
    CONFIGS, config_set, INTERPRETER_CONFIG, key=common.BASE_GEMM_KEY,
    hooks=common.TrialHooks(reset_to_zero=["count_ptr"]),  # each trial's split sums count arrivals from zero
)  # fmt: skip
@triton.jit
def lora_linear_grad_input_transposed_kernel(
    dy_ptr, w_ptr, absmax_ptr, table_ptr, ds_ptr, a_ptr, groups_ptr, keep_scales_ptr, seeds_ptr, dx_ptr,
    partial_ptr, count_ptr,
    M, N, K, R, N_GROUPS, M_BUCKET,
    BASE: tl.constexpr, R_BLOCK: tl.constexpr, BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
):  # fmt: skip
    k0 = tl.program_id(0) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_ok, m_ok = cols < K, rows < M
    out_ok = k_ok[:, None] & m_ok[None, :]
    dxt_offsets = rows.to(tl.int64)[None, :] * K + cols[:, None]  # dx[m, k] at acc[k, m]
    row_scale: tl.constexpr = K_ALIGNED and BLOCKSIZE % BLOCK_K == 0
    n_span = tl.cdiv(tl.cdiv(N, BLOCK_N), SPLIT_N) * BLOCK_N
    n_start = tl.program_id(2) * n_span
    acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
    for n0 in range(n_start, min(n_start + n_span, N), BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        dy_t = tl.load(dy_ptr + rows.to(tl.int64)[None, :] * N + ns[:, None], mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        if BASE == 1:  # BASE_DENSE (a module global is not a constexpr inside @triton.jit)
            w = tl.load(w_ptr + ns.to(tl.int64)[:, None] * K + cols[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            w = common.nf4_tile(w_ptr, absmax_ptr, table_ptr, ns, k0, N, K, BLOCKSIZE, BLOCK_K, EVEN_K, row_scale)
        acc = tl.dot(tl.trans(w.to(dy_t.dtype)), dy_t, acc, input_precision=PRECISION)

    last = True
    if SPLIT_N > 1:
        tile = count_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        acc, last = split_reduce.sum_splits(acc, partial_ptr, tile, tl.program_id(2), dxt_offsets, out_ok, M * K, SPLIT_N)
    if last:
        # One (masked) low-rank term per adapter group. A group row: (first rank, rank, threshold, adapter).
        ranks = tl.arange(0, R_BLOCK)
        for g in range(N_GROUPS):
            first, rank = tl.load(groups_ptr + g * 4), tl.load(groups_ptr + g * 4 + 1)
            threshold, adapter = tl.load(groups_ptr + g * 4 + 2), tl.load(groups_ptr + g * 4 + 3)
            r_ok = ranks < rank
            a_ptrs = a_ptr + (first + ranks).to(tl.int64)[None, :] * K + cols[:, None]
            a_t = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            ds_ptrs = ds_ptr + rows.to(tl.int64)[None, :] * R + (first + ranks)[:, None]
            ds_t = tl.load(ds_ptrs, mask=r_ok[:, None] & m_ok[None, :], other=0.0)
            lora = tl.dot(a_t.to(tl.float32), ds_t.to(tl.float32), input_precision=LORA_PRECISION)
            if threshold > 0:
                keep = tl.trans(common.dropout_keep(seeds_ptr + adapter, rows, cols, K, threshold))
                lora = tl.where(keep, lora * tl.load(keep_scales_ptr + g), 0.0)
            acc += lora
        tl.store(dx_ptr + dxt_offsets, acc.to(dx_ptr.dtype.element_ty), mask=out_ok)


def lora_linear_grad_input_transposed(
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor | None,
    blocksize: int,
    grad_s: torch.Tensor,
    lora_a: torch.Tensor,
    ranks: list[int],
    seeds: torch.Tensor,
    dropout_p: list[float],
    path: str | None = None,
) -> torch.Tensor:
    """``dx[M, K] = dy·W + Σ_a (dS_a·A_a) ⊙ keep_a / (1 - p_a)``, as
    :func:`fastlora.kernels.lora_linear_grad_input.lora_linear_grad_input` computes it, in one fused kernel tiled
    for few tokens. A candidate for M <= 64 tokens (:data:`common.MAX_FEW_TOKENS`), dense or NF4 W (not 8-bit);
    ``path`` may only be None or "fused".

    Usage: ``dx = lora_linear_grad_input_transposed(dy, packed, absmax, 64, ds, a, [16], seeds, [0.1])``
    """
    m, n = grad_out.shape
    r, k = lora_a.shape
    weight, base = few_token_operands("lora_linear_grad_input_transposed", path, weight, absmax, m)
    grad_out, grad_s, lora_a = grad_out.contiguous(), grad_s.contiguous(), lora_a.contiguous()
    dx = torch.empty((m, k), dtype=grad_out.dtype, device=grad_out.device)
    groups, keep_scales, widest = common.adapter_groups(ranks, dropout_p, dx.device) if r else (None, None, 0)
    partials = torch.empty((MAX_SPLIT_N, m, k), dtype=torch.float32, device=dx.device)
    counters = split_reduce.tile_counters(common.cdiv(k, 16) * common.cdiv(m, 16), dx.device)  # the smallest tiles
    grid = lambda meta: (common.cdiv(k, meta["BLOCK_K"]), common.cdiv(m, meta["BLOCK_M"]), meta["SPLIT_N"])  # noqa: E731
    bucket, r_block = common.m_bucket(m), common.rank_block(widest)
    common.launch(
        lora_linear_grad_input_transposed_kernel, grid, (dx.device, dx.dtype, weight.dtype, bucket, n, k, r_block, base),
        grad_out, weight, absmax if absmax is not None else dx, common.nf4_decode_table(dx.device),
        grad_s, lora_a, groups if r else dx, keep_scales if r else dx, seeds, dx, partials, counters,
        m, n, k, r, groups.shape[0] if r else 0, bucket,
        BASE=base, R_BLOCK=r_block, **common.base_gemm_constexprs(blocksize, k, dx.dtype),
    )  # fmt: skip
    return dx
