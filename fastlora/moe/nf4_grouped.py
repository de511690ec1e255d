"""The grouped expert LoRA linear over NF4 expert weights (:mod:`fastlora.moe.nf4_experts`), forward and backward.

Same product and gradients as :mod:`fastlora.moe.autograd` (y = x·W_eᵀ + S·B_eᵀ; dx, dA, dB; W frozen), with W_e
decoded from its NF4 codes:

- triton: inside the grouped kernel (:func:`fastlora.backends.grouped_triton.grouped_nf4_lora_forward`), from the packed codes
  and the per-call resolved absmax: no dequantized W;
- torch and cpp (CPU): runs of consecutive experts that have tokens, at most :data:`CHUNK_ELEMENTS` weights each,
  are dequantized (``nf4_dequantize`` of the backend, bit-identical to bitsandbytes) into a transient W and run
  through that backend's dense grouped op. Backward dequantizes again (nothing the size of W is saved).

Usage::

    y = nf4_grouped_lora_linear(x_sorted, offsets, expert_stack(experts, "down_proj"), [(a, b, 2.0)], "cpp")
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastlora import grouped_ops as moe_ops
from fastlora.moe.autograd import input_gradients, stacked_adapters
from fastlora.moe.nf4_experts import NF4ExpertStack

#: Dequantized weights per run of experts on the CPU paths (in W's dtype): bounds the transient W.
CHUNK_ELEMENTS = 1 << 24


def expert_runs(offsets: Tensor, per_expert: int) -> list[tuple[int, int, int, int]]:
    """(first expert, end expert, first row, end row) of runs of consecutive experts that have rows, each of at
    most ``CHUNK_ELEMENTS // per_expert`` experts (at least one); reads the offsets on the host (one sync)."""
    limit = max(1, CHUNK_ELEMENTS // max(per_expert, 1))
    runs, start = [], 0
    for expert, end in enumerate(offsets.tolist()):
        if end > start:
            if runs and runs[-1][1] == expert and expert - runs[-1][0] < limit:
                runs[-1] = (runs[-1][0], expert + 1, runs[-1][2], end)
            else:
                runs.append((expert, expert + 1, start, end))
        start = end
    return runs


def _dequantize_backend(backend: str) -> str:
    return "cpp" if backend == "cpp" else "torch"


def _run_offsets(offsets: Tensor, first: int, end: int, row: int) -> Tensor:
    return offsets[first:end] - row


def chunked_forward(x, offsets, stack: NF4ExpertStack, lora_a, lora_b, ranks, scales, backend: str):
    """(y, S) as the dense grouped forward of ``backend`` gives them, W dequantized per run of experts."""
    impl = moe_ops.implementation(backend, x.device.type)
    y = x.new_zeros((x.shape[0], stack.shape[1]))
    lora_s = x.new_zeros((x.shape[0], lora_a.shape[1]), dtype=torch.float32)
    for first, end, row, row_end in expert_runs(offsets, stack.shape[1] * stack.shape[2]):
        w = stack.dequantize(first, end, backend=_dequantize_backend(backend))
        y[row:row_end], lora_s[row:row_end] = impl.grouped_lora_forward(
            x[row:row_end], _run_offsets(offsets, first, end, row), w, lora_a[first:end], lora_b[first:end], ranks, scales
        )
    return y, lora_s


def chunked_backward(grad_out, x, lora_s, offsets, stack: NF4ExpertStack, lora_a, lora_b, ranks, scales, needs_x, backend):
    """(dx, dA, dB) as the dense grouped backward of ``backend`` gives them, W dequantized per run of experts."""
    impl = moe_ops.implementation(backend, x.device.type)
    grad_x = grad_out.new_zeros((x.shape[0] if needs_x else 0, x.shape[1]))
    grad_a = torch.zeros(lora_a.shape, dtype=torch.float32, device=x.device)
    grad_b = torch.zeros(lora_b.shape, dtype=torch.float32, device=x.device)
    for first, end, row, row_end in expert_runs(offsets, stack.shape[1] * stack.shape[2]):
        # dA and dB need no W: without dx, the dense op gets a stride-0 stand-in rather than a dequantized W.
        if needs_x:
            w = stack.dequantize(first, end, backend=_dequantize_backend(backend))
        else:
            w = x.new_zeros((), dtype=stack.dtype).expand(end - first, stack.shape[1], stack.shape[2])
        dx, grad_a[first:end], grad_b[first:end] = impl.grouped_lora_backward(
            grad_out[row:row_end], x[row:row_end], lora_s[row:row_end], _run_offsets(offsets, first, end, row), w,
            lora_a[first:end], lora_b[first:end], ranks, scales, needs_x,
        )  # fmt: skip
        if needs_x:
            grad_x[row:row_end] = dx
    return grad_x, grad_a, grad_b


def _forward(backend, x, offsets, stack, lora_a, lora_b, ranks, scales):
    if backend == "triton":
        from fastlora.backends import grouped_triton as moe_triton

        return moe_triton.grouped_nf4_lora_forward(x, offsets, stack, lora_a, lora_b, ranks, scales)
    return chunked_forward(x, offsets, stack, lora_a, lora_b, ranks, scales, backend)


def _backward(backend, grad_out, x, lora_s, offsets, stack, lora_a, lora_b, ranks, scales, needs_x):
    if backend == "triton":
        from fastlora.backends import grouped_triton as moe_triton

        return moe_triton.grouped_nf4_lora_backward(grad_out, x, lora_s, offsets, stack, lora_a, lora_b, ranks, scales, needs_x)
    return chunked_backward(grad_out, x, lora_s, offsets, stack, lora_a, lora_b, ranks, scales, needs_x, backend)


class NF4GroupedLoRAFunction(torch.autograd.Function):
    """y = x·W_eᵀ + S·B_eᵀ per expert group with W_e NF4; saves x, the offsets and S (no weight)."""

    @staticmethod
    def forward(ctx, x, offsets, stack, lora_a, lora_b, ranks, scales, backend):
        y, lora_s = _forward(backend, x, offsets, stack, lora_a, lora_b, list(ranks), list(scales))
        ctx.save_for_backward(x, offsets, lora_a, lora_b, lora_s)
        ctx.config = (stack, ranks, scales, backend)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, offsets, lora_a, lora_b, lora_s = ctx.saved_tensors
        stack, ranks, scales, backend = ctx.config
        needs_x = ctx.needs_input_grad[0]
        grad_x, grad_a, grad_b = _backward(
            backend, grad_out.contiguous(), x, lora_s, offsets, stack, lora_a, lora_b, list(ranks), list(scales), needs_x
        )
        return input_gradients(ctx, grad_x, grad_a, grad_b, lora_a, lora_b)


def nf4_grouped_lora_linear(
    x: Tensor, offsets: Tensor, stack: NF4ExpertStack, adapters: Sequence[tuple[Tensor, Tensor, float]], backend: str
) -> Tensor:
    """Per expert group of the expert-sorted x [S, K] (in the stack's dtype): x·W_eᵀ + Σ_a s_a·(x·A_a,eᵀ)·B_a,eᵀ with
    W_e the NF4 weights of ``stack`` and each adapter's (A [E, r, K], B [E, N, r], s).

    Usage: ``y = nf4_grouped_lora_linear(x, offsets, stack, [(a, b, 2.0)], "torch")``
    """
    return NF4GroupedLoRAFunction.apply(x, offsets, stack, *stacked_adapters(x, stack.shape, adapters), backend)
