"""Gradient of the LoRA down-projection: ``dA_a = dS_aᵀ·drop_a(x)`` in fp32, one launch for all adapters.

A thin GEMM that reduces over M (tokens): with only K / BLOCK_K output tiles per adapter, M is also split
across programs, each writing an fp32 partial that a deterministic sum folds (no atomics, so runs repeat
bit for bit). The same kernel computes ``dyᵀ·S`` (the gradient of B) for
:func:`fastlora.kernels.lora_up_grad.lora_up_grad`, writing transposed via strides.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels import common

CONFIGS = {
    "hopper": [
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    ],
    "ampere": [
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    ],
    # fp32 x: IEEE tl.dot runs on FMAs, so smaller tiles keep its operands in registers.
    "fp32": [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3)],
    # Rank tiles of 256 (common.WIDE_RANK_BLOCK): dS's [R_BLOCK, BLOCK_M] fp32 tile per stage outgrows shared memory
    # (>= 303 KB at rank 256 above), so narrow M tiles and two stages; the 8 warps hold the [R_BLOCK, BLOCK_K] sum.
    "hopper-wide": [
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
    ],
    "ampere-wide": [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=8, num_stages=2)],
    "fp32-wide": [triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2)],
}


INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)
#: Rows of M one program reduces, in multiples of this; sized so each split still streams a long stretch.
SPLIT_GRANULE = 512


@common.autotuned(CONFIGS, common.config_set_by_x_dtype, INTERPRETER_CONFIG, key=["M_BUCKET", "K", "R_BLOCK"])
@triton.jit
def lora_down_grad_kernel(
    g_ptr, x_ptr, groups_ptr, keep_scales_ptr, seeds_ptr, out_ptr,
    M, K, stride_gm, stride_gr, stride_or, stride_ok, stride_split, rows_per_split, M_BUCKET,
    R_BLOCK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Program (column tile, adapter group, row split). A group row: (first rank, rank, threshold, adapter).
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    group = groups_ptr + tl.program_id(1) * 4
    first, rank, threshold, adapter = tl.load(group), tl.load(group + 1), tl.load(group + 2), tl.load(group + 3)
    scale = tl.load(keep_scales_ptr + tl.program_id(1))
    ranks = tl.arange(0, R_BLOCK)
    k_ok, r_ok = cols < K, ranks < rank
    row_start = tl.program_id(2) * rows_per_split
    row_end = min(row_start + rows_per_split, M)
    acc = tl.zeros((R_BLOCK, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        m_ok = rows < row_end
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        if threshold > 0:
            x = tl.where(common.dropout_keep(seeds_ptr + adapter, rows, cols, K, threshold), x * scale, 0.0)
        g_ptrs = g_ptr + (first + ranks)[:, None] * stride_gr + rows.to(tl.int64)[None, :] * stride_gm
        g_t = tl.load(g_ptrs, mask=r_ok[:, None] & m_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(g_t, x, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + tl.program_id(2) * stride_split + (first + ranks)[:, None] * stride_or + cols[None, :] * stride_ok
    tl.store(out_ptrs, acc, mask=r_ok[:, None] & k_ok[None, :])


def thin_grad(
    g: torch.Tensor,
    x: torch.Tensor,
    ranks: list[int],
    seeds: torch.Tensor,
    dropout_p: list[float],
    out: torch.Tensor,
    rows_per_split: int | None = None,
) -> torch.Tensor:
    """Fill ``out`` (any-strided fp32 [R, K], e.g. ``dB.T``) with ``gᵀ·drop(x)`` for g [M, R], x [M, K]."""
    m, k = x.shape
    r = g.shape[1]
    if r == 0 or k == 0:
        return out
    if m == 0:
        return out.zero_()
    x = x.contiguous()
    groups, keep_scales, widest = common.adapter_groups(ranks, dropout_p, x.device)
    if rows_per_split is None:
        # Enough splits that (column tiles x groups x splits) fills the GPU about twice over.
        wanted = common.cdiv(2 * common.sm_count(x.device), common.cdiv(k, 64) * groups.shape[0])
        rows_per_split = max(SPLIT_GRANULE, common.cdiv(common.cdiv(m, wanted), SPLIT_GRANULE) * SPLIT_GRANULE)
    splits = common.cdiv(m, rows_per_split)
    target = out if splits == 1 else torch.empty((splits, r, k), dtype=torch.float32, device=x.device)
    stride_or, stride_ok = (out.stride(0), out.stride(1)) if splits == 1 else (k, 1)
    grid = lambda meta: (common.cdiv(k, meta["BLOCK_K"]), groups.shape[0], splits)  # noqa: E731
    bucket, r_block = common.m_bucket(m), common.rank_block(widest)
    common.launch(
        lora_down_grad_kernel, grid, (x.device, x.dtype, g.dtype, bucket, k, r_block),
        g, x, groups, keep_scales, seeds, target,
        m, k, g.stride(0), g.stride(1), stride_or, stride_ok, r * k, rows_per_split, bucket,
        R_BLOCK=r_block, PRECISION=common.dot_precision(x.dtype),
    )  # fmt: skip
    if splits > 1:
        out.copy_(target.sum(dim=0))
    return out


def lora_down_grad(
    grad_s: torch.Tensor,
    x: torch.Tensor,
    ranks: list[int],
    seeds: torch.Tensor,
    dropout_p: list[float],
    rows_per_split: int | None = None,
) -> torch.Tensor:
    """``dA[R, K]`` (fp32): adapter a's rows are ``dS_aᵀ·drop_a(x)``, its mask regenerated from ``seeds[a]``.

    ``rows_per_split`` overrides how many tokens one program reduces (tests use it to exercise the split sum).

    Usage: ``da = lora_down_grad(ds, x, [16], seeds, [0.1])``
    """
    out = torch.empty((grad_s.shape[1], x.shape[1]), dtype=torch.float32, device=x.device)
    return thin_grad(grad_s, x, ranks, seeds, dropout_p, out, rows_per_split)
