"""One ``torch.autograd.Function`` for the LoRA linear: dense or NF4 base plus stacked adapters.

Forward saves x (in the compute dtype, shared with any other layer that reads the same x), the thin
``S = s·drop(x)·Aᵀ`` [M, R] and the per-call dropout seeds; never the dequantized W, a dropped copy of x, a mask
or a scaled copy of B (the LoRA scale lives in S). Backward regenerates the dropout masks from the seeds.

Usage::

    y = lora_linear(x, base, adapters, backend="triton")
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fastlora import ops
from fastlora.dropout import draw_seeds


# NamedTuples, not dataclasses: one of each is built per layer call, and a frozen dataclass costs microseconds.
class BaseWeight(NamedTuple):
    """The frozen base of a LoRA layer: a dense [N, K] weight, or NF4 codes plus resolved fp32 absmax."""

    weight: Tensor
    bias: Optional[Tensor]
    out_features: int
    absmax: Optional[Tensor] = None
    blocksize: int = 0


class Adapter(NamedTuple):
    """One active LoRA adapter: A [r, K], B [N, r], scale, and the dropout probability in effect now."""

    lora_a: Tensor
    lora_b: Tensor
    scale: float
    dropout_p: float


class _Config(NamedTuple):
    """The non-tensor arguments of one call, passed to the Function as one object (fewer arguments to check)."""

    blocksize: int
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    dropout_p: tuple[float, ...]
    backend: str


class LoRALinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + Σ_a s_a·(drop_a(x)·A_aᵀ)·B_aᵀ on 2-D x in the compute dtype. Adapter tensors follow the
    fixed arguments as A_1, B_1, A_2, B_2, ... so that autograd routes their gradients."""

    @staticmethod
    def forward(ctx, x, weight, absmax, bias, seeds, config, *adapter_tensors):
        y, lora_a, lora_b, lora_s = _forward(x, weight, absmax, bias, seeds, config, adapter_tensors)
        ctx.save_for_backward(x, weight, absmax, lora_a, lora_b, lora_s, seeds)
        ctx.config = config
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.adapter_dtypes = [t.dtype for t in adapter_tensors]
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, absmax, lora_a, lora_b, lora_s, seeds = ctx.saved_tensors
        blocksize, ranks, scales, dropout_p, backend = ctx.config
        impl = ops.implementation(backend, x.device.type)
        grad_out = grad_out.contiguous()
        grad_s, grad_b_all = impl.lora_up_grad(grad_out, lora_b, lora_s, ranks, scales)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = impl.lora_linear_grad_input(grad_out, weight, absmax, blocksize, grad_s, lora_a, ranks, seeds, dropout_p)
        grad_a_all = impl.lora_down_grad(grad_s, x, ranks, seeds, dropout_p)
        grad_bias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_out.float().sum(0).to(ctx.bias_dtype)
        dtypes = ctx.adapter_dtypes
        if len(ranks) == 1:
            grads = (_as(grad_a_all, dtypes[0]), _as(grad_b_all, dtypes[1]))
        else:
            grads, start = [], 0
            for i, r in enumerate(ranks):
                grads.append(_as(grad_a_all[start : start + r], dtypes[2 * i]))
                grads.append(_as(grad_b_all[:, start : start + r], dtypes[2 * i + 1]))
                start += r
        return (grad_x, None, None, grad_bias, None, None, *grads)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it is already that dtype (this runs on every layer call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _needs_graph(x: Tensor, bias: Optional[Tensor], adapter_tensors: list[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or (bias is not None and bias.requires_grad) or any(t.requires_grad for t in adapter_tensors)


def _forward(x, weight, absmax, bias, seeds, config: _Config, adapter_tensors):
    """The forward ops: y, and the stacked A and B and S = s·drop(x)·Aᵀ that backward needs."""
    impl = ops.implementation(config.backend, x.device.type)
    lora_a, lora_b = _stack_adapters(adapter_tensors)
    lora_s = impl.lora_down(x, lora_a, config.ranks, seeds, config.dropout_p, config.scales)
    y = impl.lora_linear(x, weight, absmax, config.blocksize, bias, lora_s, lora_b)
    return y, lora_a, lora_b, lora_s


def _stack_adapters(adapter_tensors) -> tuple[Tensor, Tensor]:
    """fp32 A stacked along r [R, K] and B [N, R] from (A_1, B_1, A_2, B_2, ...), so the kernels see one epilogue
    for all adapters. A single fp32 adapter is used as it is: no copy."""
    if len(adapter_tensors) == 2:
        return adapter_tensors[0].float(), adapter_tensors[1].float()
    return torch.cat([a.float() for a in adapter_tensors[0::2]]), torch.cat([b.float() for b in adapter_tensors[1::2]], dim=1)


# Seeds for calls without dropout: never read by the kernels, so one constant tensor per (device, count) serves
# every call (and stays valid inside CUDA graphs).
_UNUSED_SEEDS: dict[tuple[torch.device, int], Tensor] = {}


def _seeds(adapters: Sequence[Adapter], device: torch.device) -> Tensor:
    if any(a.dropout_p > 0.0 for a in adapters):
        return draw_seeds(len(adapters), device)
    key = (device, len(adapters))
    seeds = _UNUSED_SEEDS.get(key)
    if seeds is None:
        seeds = _UNUSED_SEEDS[key] = torch.zeros(len(adapters), dtype=torch.int64, device=device)
    return seeds


def lora_linear(x: Tensor, base: BaseWeight, adapters: Sequence[Adapter], backend: str) -> Tensor:
    """The fused LoRA linear on x[..., K] (already in the compute dtype); returns [..., N] in x's dtype.

    Usage::

        y = lora_linear(x, BaseWeight(w, b, w.shape[0]), [Adapter(a, b_, 2.0, 0.0)], "torch")
    """
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    seeds = _seeds(adapters, x.device)
    adapter_tensors = [t for a in adapters for t in (a.lora_a, a.lora_b)]
    config = _Config(base.blocksize, tuple(a.lora_a.shape[0] for a in adapters), tuple(a.scale for a in adapters),
                     tuple(a.dropout_p for a in adapters), backend)  # fmt: skip
    if _needs_graph(x, base.bias, adapter_tensors):
        y = LoRALinearFunction.apply(x2d, base.weight, base.absmax, base.bias, seeds, config, *adapter_tensors)
    else:
        # Inference (no_grad, or nothing trainable): the ops alone, with no autograd node to build or save for.
        y = _forward(x2d, base.weight, base.absmax, base.bias, seeds, config, adapter_tensors)[0]
    return y if x.dim() == 2 else y.view(*x.shape[:-1], base.out_features)
