"""One ``torch.autograd.Function`` for the grouped expert LoRA linear, free of model knowledge.

Forward saves the expert-sorted x, the offsets and the thin ``S = x·A_eᵀ`` (scaled) [S, R]; never a weight delta.
Backward returns dx, dA and dB (W is frozen: the caller checks it needs no gradient).

Usage::

    y = grouped_lora_linear(x_sorted, offsets, w, [(a, b, 2.0)], "cpp")
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastlora import grouped_ops as moe_ops


class GroupedLoRAFunction(torch.autograd.Function):
    """y = x·W_eᵀ + S·B_eᵀ per expert group; A [E, R, K] and B [E, N, R] are the stacked adapters."""

    @staticmethod
    def forward(ctx, x, offsets, weight, lora_a, lora_b, ranks, scales, backend):
        impl = moe_ops.implementation(backend, x.device.type)
        y, lora_s = impl.grouped_lora_forward(x, offsets, weight, lora_a, lora_b, list(ranks), list(scales))
        ctx.save_for_backward(x, offsets, weight, lora_a, lora_b, lora_s)
        ctx.config = (ranks, scales, backend)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, offsets, weight, lora_a, lora_b, lora_s = ctx.saved_tensors
        ranks, scales, backend = ctx.config
        impl = moe_ops.implementation(backend, grad_out.device.type)
        needs_x = ctx.needs_input_grad[0]
        grad_x, grad_a, grad_b = impl.grouped_lora_backward(
            grad_out.contiguous(), x, lora_s, offsets, weight, lora_a, lora_b, list(ranks), list(scales), needs_x
        )
        return input_gradients(ctx, grad_x, grad_a, grad_b, lora_a, lora_b)


def input_gradients(ctx, grad_x, grad_a, grad_b, lora_a, lora_b) -> tuple:
    """What ``backward`` returns for the arguments (x, offsets, weight, lora_a, lora_b, ranks, scales, backend)."""
    needs = ctx.needs_input_grad
    grad_a = grad_a.to(lora_a.dtype) if needs[3] else None
    return (grad_x if needs[0] else None, None, None, grad_a, grad_b.to(lora_b.dtype) if needs[4] else None, None, None, None)


def grouped_lora_linear(
    x: Tensor, offsets: Tensor, weight: Tensor, adapters: Sequence[tuple[Tensor, Tensor, float]], backend: str
) -> Tensor:
    """Per expert group of the expert-sorted x [S, K]: x·W_eᵀ + Σ_a s_a·(x·A_a,eᵀ)·B_a,eᵀ, with W [E, N, K] (any
    strides) and each adapter's (A [E, r, K], B [E, N, r], s). Without adapters, the plain grouped GEMM.

    Usage: ``y = grouped_lora_linear(x, offsets, w, [(a, b, 2.0)], "torch")``
    """
    return GroupedLoRAFunction.apply(x, offsets, weight, *stacked_adapters(x, weight.shape, adapters), backend)


def stacked_adapters(x: Tensor, shape: Sequence[int], adapters: Sequence[tuple[Tensor, Tensor, float]]) -> tuple:
    """(A [E, R, K], B [E, N, R], ranks, scales) of the adapters stacked along the rank, for W of ``shape``
    [E, N, K]; R = 0 (empty A and B) without adapters."""
    experts, n, k = shape
    if not adapters:
        return x.new_zeros((experts, 0, k)), x.new_zeros((experts, n, 0)), (), ()
    lora_a = adapters[0][0] if len(adapters) == 1 else torch.cat([a for a, _, _ in adapters], dim=1)
    lora_b = adapters[0][1] if len(adapters) == 1 else torch.cat([b for _, b, _ in adapters], dim=2)
    return lora_a, lora_b, tuple(a.shape[1] for a, _, _ in adapters), tuple(float(s) for _, _, s in adapters)
