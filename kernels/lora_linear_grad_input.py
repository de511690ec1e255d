"""Fused LoRA linear backward for the input: ``dx = dy·W + Σ_a (dS_a·A_a) ⊙ keep_a / (1 - p_a)``, one store.

W (dense through its strides, or NF4 or 8-bit dequantized in registers) is read as stored, [N, K], which is
already the layout dy·W wants (reduction over N). Each adapter's term is masked with its dropout mask,
regenerated from its seed, inside the same fp32 tile. ``BASE=0`` adds only the LoRA terms onto a dx cuBLAS already wrote (the split path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels import common, dispatch
from fastlora.kernels.lora_linear import (
    BASE_IN_OUTPUT,
    BASE_NF4,
    DISPATCH_BASE,
    base_kind,
    kernel_weight,
    split_weight,
    weight_strides,
)


_config = common.gemm_config


# BLOCK_N is the reduction here, BLOCK_K the output columns. NF4 bytes run along K; BLOCK_K <= 64 keeps the
# tile inside one absmax block (one scale per row), and wider NF4 tiles exceed shared memory or registers. At
# decode-sized M the grid is one row of K / BLOCK_K programs: 64 for K=4096 at BLOCK_K=64, half of an H100's
# SMs, so the Hopper NF4 set also has 32- and 16-wide output tiles (128 and 256 programs) for the autotuner.
CONFIGS = {
    "hopper-nf4": [
        _config(256, 64, 64, 8, 3),
        _config(128, 64, 64, 8, 3),
        _config(64, 64, 64, 4, 4),
        _config(64, 32, 64, 4, 4),
        _config(32, 64, 64, 4, 3),
        _config(16, 32, 64, 4, 3),
        _config(16, 64, 32, 4, 4),
        _config(16, 128, 32, 8, 4),
        _config(16, 64, 16, 2, 4),
    ],
    "hopper-dense": [
        _config(128, 64, 128, 8, 3),
        _config(128, 64, 64, 8, 4),
        _config(64, 64, 128, 4, 4),
        _config(64, 64, 64, 4, 4),
        _config(32, 128, 64, 4, 4),
        _config(16, 128, 64, 4, 4),
        _config(16, 256, 32, 4, 3),
    ],
    "ampere-nf4": [_config(128, 32, 64, 8, 3), _config(64, 32, 64, 4, 4), _config(16, 64, 64, 4, 3)],
    "ampere-dense": [_config(128, 32, 128, 8, 3), _config(64, 32, 64, 4, 4), _config(16, 128, 64, 4, 3)],
    "fp32": [_config(64, 32, 64, 8, 3), _config(32, 32, 64, 4, 3), _config(16, 32, 32, 4, 3)],
}


config_set = common.config_set_by_base("dy_ptr", BASE_NF4)


INTERPRETER_CONFIG = _config(32, 32, 32, 4, 1, group_m=2)


@common.autotuned(
    CONFIGS, config_set, INTERPRETER_CONFIG, key=common.BASE_GEMM_KEY,
    hooks=common.TrialHooks(restore_value=["dx_ptr"], accumulates=lambda args: args["BASE"] == 0),  # adds onto dx
)  # fmt: skip
@triton.jit
def lora_linear_grad_input_kernel(
    dy_ptr, w_ptr, absmax_ptr, table_ptr, ds_ptr, a_ptr, groups_ptr, keep_scales_ptr, seeds_ptr, dx_ptr,
    M, N, K, R, N_GROUPS, M_BUCKET, stride_wn, stride_wk,
    BASE: tl.constexpr, R_BLOCK: tl.constexpr,
    BLOCKSIZE: tl.constexpr, EVEN_K: tl.constexpr, K_ALIGNED: tl.constexpr,
    PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = common.grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok, k_ok = rows < M, cols < K
    dx_ptrs = dx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    out_ok = m_ok[:, None] & k_ok[None, :]

    if BASE == 0:
        acc = tl.load(dx_ptrs, mask=out_ok, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            ns = n0 + tl.arange(0, BLOCK_N)
            n_ok = ns < N
            dy = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * N + ns[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
            if BASE == 1:
                w_ptrs = w_ptr + ns.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wk
                w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(dy.dtype)
            elif BASE == 3:
                w = common.int8_tile(w_ptr, absmax_ptr, ns, cols, N, K).to(dy.dtype)
            else:
                w = common.nf4_tile(
                    w_ptr, absmax_ptr, table_ptr, ns, pid_k * BLOCK_K, N, K,
                    BLOCKSIZE, BLOCK_K, EVEN_K, K_ALIGNED and BLOCKSIZE % BLOCK_K == 0,
                ).to(dy.dtype)  # fmt: skip
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)

    # One (masked) low-rank term per adapter group. A group row: (first rank, rank, threshold, adapter).
    ranks = tl.arange(0, R_BLOCK)
    for g in range(N_GROUPS):
        first, rank = tl.load(groups_ptr + g * 4), tl.load(groups_ptr + g * 4 + 1)
        threshold, adapter = tl.load(groups_ptr + g * 4 + 2), tl.load(groups_ptr + g * 4 + 3)
        r_ok = ranks < rank
        ds = tl.load(ds_ptr + rows.to(tl.int64)[:, None] * R + (first + ranks)[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        a = tl.load(a_ptr + (first + ranks).to(tl.int64)[:, None] * K + cols[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        lora = tl.dot(ds.to(tl.float32), a.to(tl.float32), input_precision=LORA_PRECISION)
        if threshold > 0:
            keep = common.dropout_keep(seeds_ptr + adapter, rows, cols, K, threshold)
            lora = tl.where(keep, lora * tl.load(keep_scales_ptr + g), 0.0)
        acc += lora
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=out_ok)


def _launch(grad_out, weight, absmax, blocksize, grad_s, lora_a, ranks, seeds, dropout_p, dx, base: int):
    m, n = grad_out.shape
    k = lora_a.shape[1]
    r = lora_a.shape[0]
    groups, keep_scales, widest = common.adapter_groups(ranks, dropout_p, dx.device) if r else (None, None, 0)
    grid = lambda meta: (common.cdiv(m, meta["BLOCK_M"]) * common.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    bucket, r_block = common.m_bucket(m), common.rank_block(widest)
    common.launch(
        lora_linear_grad_input_kernel, grid, (dx.device, dx.dtype, weight.dtype, bucket, n, k, r_block, base),
        grad_out, weight, absmax if absmax is not None else dx, common.nf4_decode_table(dx.device), grad_s, lora_a,
        groups if r else dx, keep_scales if r else dx, seeds, dx,
        m, n, k, r, groups.shape[0] if r else 0, bucket, *weight_strides(weight),
        BASE=base, R_BLOCK=r_block, **common.base_gemm_constexprs(blocksize, k, dx.dtype),
    )  # fmt: skip
    return dx


def lora_linear_grad_input(
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
    """``dx[M, K] = dy·W + Σ_a (dS_a·A_a) ⊙ keep_a / (1 - p_a)`` in dy's dtype; W dense (any strides), NF4 or 8-bit
    (given ``absmax``; see :func:`fastlora.kernels.lora_linear.base_kind`).

    ``path`` forces "fused" or "split"; by default :func:`fastlora.kernels.dispatch.choice` decides.

    Usage: ``dx = lora_linear_grad_input(dy, packed, absmax, 64, ds, a, [16], seeds, [0.1])``
    """
    m, n = grad_out.shape
    k = lora_a.shape[1]
    kind = base_kind(weight, absmax)
    grad_out, grad_s, lora_a = grad_out.contiguous(), grad_s.contiguous(), lora_a.contiguous()
    weight = kernel_weight(weight, kind)
    path = path or dispatch.choice("grad_input", DISPATCH_BASE[kind], m, n, k, grad_out.dtype).path
    dx = torch.empty((m, k), dtype=grad_out.dtype, device=grad_out.device)
    args = (blocksize, grad_s, lora_a, ranks, seeds, dropout_p, dx)
    if path == "fused":
        return _launch(grad_out, weight, absmax, *args, kind)
    torch.matmul(grad_out, split_weight(weight, absmax, blocksize, n, k, dx.dtype, kind), out=dx)
    return _launch(grad_out, weight, None, *args, BASE_IN_OUTPUT)
