"""The split practice (unsloth's ``fast_lora``, axolotl), the layer benchmark's strongest contender: W dequantized
into one reused buffer (bitsandbytes), one GEMM, the LoRA term added in place with ``addmm_``; backward likewise.
Installed as the forward of a PEFT LoRA layer (:class:`SplitForward`), so it is called through its layer module
like PEFT and fastlora.

Usage::

    dequantize, note = weight_source(base_layer)
    layer.forward = SplitForward(layer, dequantize)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SplitLoRALinear(torch.autograd.Function):
    """The split practice: ``y = x·Wᵀ + b``, then ``y.addmm_(x·Aᵀ, Bᵀ, alpha=s)``, with W from ``dequantize()``
    (a reused buffer); backward calls it again for ``dx = dy·W`` and adds the LoRA term with ``addmm_``. The LoRA
    product runs in the compute dtype, as unsloth does."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, dequantize, scale):
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        s = x @ a.T
        y = F.linear(x, dequantize(), bias)
        y.addmm_(s, b.T, alpha=scale)
        ctx.save_for_backward(x, a, b, s)
        ctx.dequantize, ctx.scale, ctx.param_dtype = dequantize, scale, lora_a.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, a, b, s = ctx.saved_tensors
        grad_s = grad_y @ b
        grad_a = (grad_s.T @ x).mul_(ctx.scale).to(ctx.param_dtype)
        grad_b = (grad_y.T @ s).mul_(ctx.scale).to(ctx.param_dtype)
        grad_x = grad_y @ ctx.dequantize()
        grad_x.addmm_(grad_s, a, alpha=ctx.scale)
        return grad_x, grad_a, grad_b, None, None, None


def weight_source(base) -> tuple[Callable[[], Tensor], str]:
    """A function giving W in the compute dtype, as the split practice gets it, and how it does so, for a
    :class:`fastlora.bench.layers.BaseLayer`."""
    weight = base.layer.weight
    if base.base == "dense":
        return (lambda: weight), "dense W used in place"
    import bitsandbytes.functional as bnbF

    if base.base == "int8":
        layer, dtype = base.layer, base.dtype
        # bitsandbytes moves SCB from the weight to the layer's state on its first call; either holds it.
        scale = lambda: layer.state.SCB if layer.state.SCB is not None else weight.SCB  # noqa: E731
        return (lambda: bnbF.int8_vectorwise_dequant(weight.data, scale()).to(dtype)), "W dequantized per call (bitsandbytes has no out= variant)"

    state = weight.quant_state
    buffer = torch.empty(tuple(state.shape), dtype=state.dtype, device=weight.device)
    try:
        bnbF.dequantize_4bit(weight.data, state, out=buffer)
    except NotImplementedError:  # bitsandbytes' CPU backend has no out= variant
        return (lambda: bnbF.dequantize_4bit(weight.data, state)), "bitsandbytes cannot dequantize into a buffer here: allocates W per call"
    return (lambda: bnbF.dequantize_4bit(weight.data, state, out=buffer)), "W dequantized into one reused buffer"


class SplitForward:
    """The split practice as the forward of a PEFT LoRA layer: per call it reads the layer as unsloth's
    ``get_lora_parameters`` does (base weight, first active adapter's A, B and scale) and runs
    :class:`SplitLoRALinear`; a merged or disabled layer runs PEFT's forward."""

    def __init__(self, layer: nn.Module, dequantize: Callable[[], Tensor]):
        self.layer, self.dequantize = layer, dequantize

    def __call__(self, x: Tensor) -> Tensor:
        layer = self.layer
        if layer.disable_adapters or layer.merged:
            return type(layer).forward(layer, x)
        adapter = layer.active_adapters[0]
        lora_a, lora_b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        return SplitLoRALinear.apply(x, lora_a, lora_b, layer.base_layer.bias, self.dequantize, layer.scaling[adapter])
