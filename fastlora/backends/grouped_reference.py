"""Plain-PyTorch grouped LoRA ops: the oracle the C++ and Triton paths are tested against, and the fallback.

Tokens arrive sorted by expert: rows ``offsets[e-1]:offsets[e]`` of x belong to expert e (``offsets`` holds the
cumulative row counts, as transformers' ``grouped_mm`` takes them). Per expert, with W_e [N, K] (any strides,
e.g. gpt-oss's [K, N] storage transposed), A_e [R, K], B_e [N, R] and per-adapter scales s_a on slices of R:

    y_e  = x_e·W_eᵀ + S_e·B_eᵀ                     S_e = x_e·A_eᵀ, column slice a scaled by s_a
    dS_e = dy_e·B_e (slice a scaled by s_a)        dx_e = dy_e·W_e + dS_e·A_e
    dA_e = dS_eᵀ·x_e                               dB_e = dy_eᵀ·S_e

Everything is computed in fp32 (inputs upcast) and rounded once. No [E, N, K] delta is built.

Usage::

    y, s = grouped_lora_forward(x, offsets, w, a, b, [16], [2.0])
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_ranges(offsets: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert with tokens; reads the offsets on the host (one sync)."""
    ends = offsets.tolist()
    ranges, start = [], 0
    for expert, end in enumerate(ends):
        if end > start:
            ranges.append((expert, start, end))
        start = end
    return ranges


def rank_scales(ranks: list[int], scales: list[float], device: torch.device) -> Tensor:
    """fp32 [R]: each adapter's LoRA scale repeated over its rank slice."""
    return torch.tensor([s for r, s in zip(ranks, scales) for _ in range(r)], dtype=torch.float32, device=device)


def grouped_lora_forward(
    x: Tensor, offsets: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, ranks: list[int], scales: list[float]
) -> tuple[Tensor, Tensor]:
    """(y x.dtype [S, N], lora_s f32 [S, R]) for x [S, K] sorted by expert, W [E, N, K], A [E, R, K], B [E, N, R]."""
    rows, n, r = x.shape[0], weight.shape[1], lora_a.shape[1]
    y = x.new_zeros((rows, n), dtype=torch.float32)
    lora_s = x.new_zeros((rows, r), dtype=torch.float32)
    column_scale = rank_scales(ranks, scales, x.device)
    for expert, start, end in expert_ranges(offsets):
        x_e = x[start:end].float()
        s_e = (x_e @ lora_a[expert].float().T) * column_scale
        lora_s[start:end] = s_e
        y[start:end] = torch.addmm(x_e @ weight[expert].float().T, s_e, lora_b[expert].float().T)
    return y.to(x.dtype), lora_s


def grouped_lora_backward(
    grad_out: Tensor,
    x: Tensor,
    lora_s: Tensor,
    offsets: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: list[int],
    scales: list[float],
    needs_input_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx grad_out.dtype [S, K] (empty [0, K] unless ``needs_input_grad``), dA f32 [E, R, K], dB f32 [E, N, R])."""
    rows, k = x.shape
    grad_x = grad_out.new_zeros((rows if needs_input_grad else 0, k), dtype=torch.float32)
    grad_a = torch.zeros(lora_a.shape, dtype=torch.float32, device=x.device)
    grad_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=x.device)
    column_scale = rank_scales(ranks, scales, x.device)
    for expert, start, end in expert_ranges(offsets):
        dy_e, x_e = grad_out[start:end].float(), x[start:end].float()
        a_e, b_e = lora_a[expert].float(), lora_b[expert].float()
        ds_e = (dy_e @ b_e) * column_scale
        grad_b[expert] = dy_e.T @ lora_s[start:end].float()
        grad_a[expert] = ds_e.T @ x_e
        if needs_input_grad:
            grad_x[start:end] = torch.addmm(dy_e @ weight[expert].float(), ds_e, a_e)
    return grad_x.to(grad_out.dtype), grad_a, grad_b
