"""The grouped LoRA ops on the Triton kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Forward: S = x·A_eᵀ (scaled) and y = x·W_eᵀ + S·B_eᵀ, two launches of
:func:`fastlora.kernels.grouped_lora.grouped_lora_matmul`. Backward: dS = dy·B_e (scaled) and dx = dy·W_e + dS·A_e
with the same kernel on transposed views, dB and dA with
:func:`fastlora.kernels.grouped_lora_weight_grad.grouped_weight_grad`. Signatures follow
:mod:`fastlora.backends.grouped_reference`. No host sync: the row tiles per expert are computed on the device.
``grouped_nf4_lora_forward``/``backward`` take W as an :class:`~fastlora.moe.nf4_experts.NF4ExpertStack`, decoded
inside the kernel (its absmax resolved once per call, a transient of 4 bytes per block).

Usage::

    y, s = grouped_lora_forward(x, offsets, w, a, b, [16], [2.0])
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora.backends.grouped_reference import rank_scales
from fastlora.kernels.grouped_lora import NF4Operand, grouped_lora_matmul
from fastlora.kernels.grouped_lora_weight_grad import grouped_weight_grad


def grouped_lora_forward(x: Tensor, offsets: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, ranks, scales):
    column_scale = rank_scales(ranks, scales, x.device)
    lora_s = grouped_lora_matmul(x, offsets, lora_a, col_scale=column_scale, out_dtype=torch.float32)
    return grouped_lora_matmul(x, offsets, weight, lora_s, lora_b), lora_s


def grouped_lora_backward(grad_out, x, lora_s, offsets, weight, lora_a, lora_b, ranks, scales, needs_input_grad: bool):
    column_scale = rank_scales(ranks, scales, x.device)
    grad_s = grouped_lora_matmul(grad_out, offsets, lora_b.transpose(1, 2), col_scale=column_scale, out_dtype=torch.float32)
    grad_b = grouped_weight_grad(grad_out, lora_s, offsets, grad_out.dtype)
    grad_a = grouped_weight_grad(grad_s, x, offsets, x.dtype)
    if needs_input_grad:
        w_t = weight._replace(transposed=True) if isinstance(weight, NF4Operand) else weight.transpose(1, 2)
        grad_x = grouped_lora_matmul(grad_out, offsets, w_t, grad_s, lora_a.transpose(1, 2))
    else:
        grad_x = grad_out.new_empty((0, x.shape[1]))
    return grad_x, grad_a, grad_b


def _nf4_operand(stack) -> NF4Operand:
    return NF4Operand(stack.packed, stack.resolved_absmax(), stack.layout.blocksize, stack.shape, False)


def grouped_nf4_lora_forward(x: Tensor, offsets: Tensor, stack, lora_a: Tensor, lora_b: Tensor, ranks, scales):
    return grouped_lora_forward(x, offsets, _nf4_operand(stack), lora_a, lora_b, ranks, scales)


def grouped_nf4_lora_backward(grad_out, x, lora_s, offsets, stack, lora_a, lora_b, ranks, scales, needs_input_grad: bool):
    operand = _nf4_operand(stack) if needs_input_grad else None  # dA, dB need no W
    return grouped_lora_backward(grad_out, x, lora_s, offsets, operand, lora_a, lora_b, ranks, scales, needs_input_grad)
