"""Per-expert weight gradient of a grouped product: out[e] = P_eᵀ·Q_e over the rows of expert e.

One program per (expert, output row tile, output column tile) streams its expert's rows (``offsets``) in chunks and
accumulates in fp32. It gives the grouped LoRA gradients dB_e = dy_eᵀ·S_e (P := dy, Q := S) and
dA_e = dS_eᵀ·x_e (P := dS, Q := x). Experts without rows get zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels import common

BLOCK_I, BLOCK_J, BLOCK_T = 32, 64, 32
INTERPRETER_BLOCKS = (16, 32, 16)


@triton.jit
def grouped_weight_grad_kernel(
    p_ptr, q_ptr, out_ptr, offsets_ptr, I, J,
    stride_pt, stride_pi, stride_qt, stride_qj, stride_oe, stride_oi, stride_oj,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_T: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    expert = tl.program_id(0)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int32)
    end = tl.load(offsets_ptr + expert).to(tl.int32)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    j = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok, j_ok = i < I, j < J
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < end
        t64 = t.to(tl.int64)
        p = tl.load(p_ptr + t64[None, :] * stride_pt + i[:, None] * stride_pi, mask=i_ok[:, None] & t_ok[None, :], other=0.0)
        q = tl.load(q_ptr + t64[:, None] * stride_qt + j[None, :] * stride_qj, mask=t_ok[:, None] & j_ok[None, :], other=0.0)
        acc += tl.dot(p.to(tl.float32), q.to(tl.float32), input_precision=PRECISION)
    out = out_ptr + expert.to(tl.int64) * stride_oe + i[:, None] * stride_oi + j[None, :] * stride_oj
    tl.store(out, acc, mask=i_ok[:, None] & j_ok[None, :])


def grouped_weight_grad(p: torch.Tensor, q: torch.Tensor, offsets: torch.Tensor, precision_dtype: torch.dtype) -> torch.Tensor:
    """fp32 [E, I, J]: per expert e, P_eᵀ·Q_e over its rows of P [S, I] and Q [S, J].

    Usage: ``grad_b = grouped_weight_grad(dy, lora_s, offsets, dy.dtype)``
    """
    experts, i_size, j_size = offsets.shape[0], p.shape[1], q.shape[1]
    out = torch.empty((experts, i_size, j_size), dtype=torch.float32, device=p.device)
    if out.numel() == 0:
        return out
    block_i, block_j, block_t = INTERPRETER_BLOCKS if common.interpreting() else (BLOCK_I, BLOCK_J, BLOCK_T)
    grid = (experts, common.cdiv(i_size, block_i), common.cdiv(j_size, block_j))
    grouped_weight_grad_kernel[grid](
        p, q, out, offsets, i_size, j_size,
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_T=block_t, PRECISION=common.dot_precision(precision_dtype),
    )  # fmt: skip
    return out
