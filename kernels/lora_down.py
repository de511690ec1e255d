"""LoRA down-projection of stacked adapters: ``S[:, a] = s_a·drop_a(x)·A_aᵀ`` in fp32, one launch for all adapters.

A thin GEMM ([M, K]·[K, R], R = total rank): bound by reading x, so x is read in its own dtype and upcast in
registers, and each adapter's dropout mask is regenerated from its seed instead of being read. The same
kernel computes ``s·dy·B`` for :func:`fastlora.kernels.lora_up_grad.lora_up_grad` (A := Bᵀ via strides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels import common
from fastlora.tensor_cache import column_scales

# At decode-sized M the grid is one program per adapter group, streaming all of x and A (or dy and B, for
# lora_up_grad: ~1.4 MB at N=14336) through one SM, whose bandwidth is bounded by the bytes it has in flight:
# the wide-K, deep-pipeline configs (128-136 KB of shared memory) are for that case. Unmeasured on a GPU;
# autotuning keeps whichever config is fastest per (M bucket, K, rank).
CONFIGS = {
    "hopper": [
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 16, "BLOCK_K": 256}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_K": 512}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_K": 256}, num_warps=8, num_stages=6),
    ],
    "ampere": [
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    ],
    # fp32 x: IEEE tl.dot runs on FMAs, so smaller tiles keep its operands in registers.
    "fp32": [triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3)],
    # Rank tiles of 256 (common.WIDE_RANK_BLOCK): A's [BLOCK_K, R_BLOCK] fp32 tile per stage outgrows shared memory
    # (the sets above need >= 319 KB at rank 256), so narrow K tiles and two stages: 39-82 KB, fits sm_86/89 too.
    "hopper-wide": [
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    ],
    "ampere-wide": [
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    ],
    "fp32-wide": [triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=8, num_stages=2)],
}


INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)


@common.autotuned(CONFIGS, common.config_set_by_x_dtype, INTERPRETER_CONFIG, key=["M_BUCKET", "K", "R_BLOCK"])
@triton.jit
def lora_down_kernel(
    x_ptr, a_ptr, groups_ptr, keep_scales_ptr, col_scales_ptr, seeds_ptr, s_ptr,
    M, K, stride_ar, stride_ak, stride_sm, M_BUCKET,
    R_BLOCK: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Program (row tile, adapter group). A group row: (first rank column, rank, drop threshold, adapter index).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = groups_ptr + tl.program_id(1) * 4
    first, rank, threshold, adapter = tl.load(group), tl.load(group + 1), tl.load(group + 2), tl.load(group + 3)
    keep_scale = tl.load(keep_scales_ptr + tl.program_id(1))
    ranks = tl.arange(0, R_BLOCK)
    m_ok, r_ok = rows < M, ranks < rank
    acc = tl.zeros((BLOCK_M, R_BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < K
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        if threshold > 0:
            x = tl.where(common.dropout_keep(seeds_ptr + adapter, rows, cols, K, threshold), x * keep_scale, 0.0)
        a_ptrs = a_ptr + (first + ranks)[None, :] * stride_ar + cols[:, None] * stride_ak
        a_t = tl.load(a_ptrs, mask=r_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)
        acc = tl.dot(x, a_t, acc, input_precision=PRECISION)
    acc *= tl.load(col_scales_ptr + first + ranks, mask=r_ok, other=0.0)[None, :]  # the LoRA scales
    s_ptrs = s_ptr + rows.to(tl.int64)[:, None] * stride_sm + (first + ranks)[None, :]
    tl.store(s_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


def thin_down(
    x: torch.Tensor, a: torch.Tensor, ranks: list[int], seeds: torch.Tensor, dropout_p: list[float], scales: list[float]
) -> torch.Tensor:
    """fp32 ``[M, R] = s·drop(x)·aᵀ`` per adapter, for x [M, K] and ``a`` any-strided [R, K] (e.g. ``B.T`` for
    ``dy·B``)."""
    m, k = x.shape
    x = x.contiguous()
    s = torch.empty((m, a.shape[0]), dtype=torch.float32, device=x.device)
    if a.shape[0] == 0:
        return s
    groups, keep_scales, widest = common.adapter_groups(ranks, dropout_p, x.device)
    col_scales = column_scales(ranks, scales, x.device)
    grid = lambda meta: (common.cdiv(m, meta["BLOCK_M"]), groups.shape[0])  # noqa: E731
    bucket, r_block = common.m_bucket(m), common.rank_block(widest)
    common.launch(
        lora_down_kernel, grid, (x.device, x.dtype, a.dtype, bucket, k, r_block),
        x, a, groups, keep_scales, col_scales, seeds, s, m, k, a.stride(0), a.stride(1), s.stride(0), bucket,
        R_BLOCK=r_block, PRECISION=common.dot_precision(x.dtype),
    )  # fmt: skip
    return s


def lora_down(
    x: torch.Tensor, lora_a: torch.Tensor, ranks: list[int], seeds: torch.Tensor, dropout_p: list[float], scales: list[float]
) -> torch.Tensor:
    """``S[M, R]`` (fp32): adapter a's columns are ``s_a·drop_a(x)·A_aᵀ``, its mask from ``seeds[a]`` and
    ``dropout_p[a]``, its LoRA scale ``scales[a]``.

    Usage: ``s = lora_down(x, torch.cat([a1, a2]), [16, 16], seeds, [0.1, 0.0], [2.0, 0.5])``
    """
    return thin_down(x, lora_a, ranks, seeds, dropout_p, scales)
