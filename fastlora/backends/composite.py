"""The ATen composite of every tuned op, as the split practice computes it: W dequantized whole (or used as it
is), one GEMM in the compute dtype, the LoRA term added with ``addmm_``. A run-time candidate of the kernel
backends (:mod:`fastlora.tuning`), any device; with dropout it does not apply (the kernels regenerate masks).

Unlike :mod:`fastlora.backends.reference` (the oracle, fp32 throughout), the base GEMM runs in x's dtype; the
LoRA term is added in fp32 to that product and the sum rounded once, as the fused kernels and PEFT (fp32 adapters)
do, so a bf16 or fp16 output differs from the reference by the base GEMM's rounding only.

Usage::

    ops = composite.Composite(dequantize=cpp.nf4_dequantize)
    y = ops.lora_linear(x, w, None, 0, bias, s, b)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fastlora.backends.reference import int8_dequantize
from fastlora.tensor_cache import lasting

#: ``dequantize(packed, absmax, blocksize, n, k, dtype) -> W[n, k]``: the NF4 dequantizer of the backend.
Dequantize = Callable[[Tensor, Tensor, int, int, int, torch.dtype], Tensor]


_ZERO: dict[torch.device, Tensor] = {}


def _scaled_mm(left: Tensor, right: Tensor, ranks, scales) -> Tensor:
    """``left @ right`` with output column block i (adapter i's rank) scaled by ``scales[i]``. One adapter: one
    ``addmm`` whose alpha is the scale (beta 0 ignores its broadcast zero input), ~1.5 µs less than ``mm`` + ``mul_``."""
    if len(ranks) == 1:
        zero = _ZERO.get(left.device)
        if zero is None:
            zero = _ZERO[left.device] = lasting(lambda: torch.zeros((), device=left.device))
        return torch.addmm(zero, left, right, beta=0, alpha=scales[0])
    out, start = torch.mm(left, right), 0
    for r, s in zip(ranks, scales):
        out[:, start : start + r].mul_(s)
        start += r
    return out


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class Composite:
    """The composite ops on one backend's NF4 dequantizer (signatures of :mod:`fastlora.backends.reference`)."""

    def __init__(self, dequantize: Dequantize):
        self._dequantize = dequantize

    def weight(self, weight: Tensor, absmax: Tensor | None, blocksize: int, n: int, k: int, dtype: torch.dtype) -> Tensor:
        """W [n, k] in ``dtype``: a dense W as it is, an int8 or NF4 W dequantized."""
        if absmax is None:
            return _as(weight, dtype)
        if weight.dtype == torch.int8:
            return int8_dequantize(weight, absmax, dtype)
        return self._dequantize(weight, absmax, blocksize, n, k, dtype)

    @staticmethod
    def lora_down(x: Tensor, lora_a: Tensor, ranks, seeds: Tensor, dropout_p, scales) -> Tensor:
        return _scaled_mm(_as(x, torch.float32), _as(lora_a, torch.float32).t(), ranks, scales)

    def lora_linear(
        self, x: Tensor, weight: Tensor, absmax: Tensor | None, blocksize: int, bias: Tensor | None, lora_s: Tensor, lora_b: Tensor
    ) -> Tensor:
        n, k = lora_b.shape[0], x.shape[1]
        w = self.weight(weight, absmax, blocksize, n, k, x.dtype)
        y = torch.mm(x, w.t()) if bias is None else torch.addmm(_as(bias, x.dtype), x, w.t())
        if x.dtype == torch.float32:
            return y.addmm_(lora_s, _as(lora_b, torch.float32).t())
        return torch.addmm(y.float(), lora_s, _as(lora_b, torch.float32).t()).to(x.dtype)

    @staticmethod
    def lora_up_grad(grad_out: Tensor, lora_b: Tensor, lora_s: Tensor, ranks, scales) -> tuple[Tensor, Tensor]:
        dy = _as(grad_out, torch.float32)
        return _scaled_mm(dy, _as(lora_b, torch.float32), ranks, scales), torch.mm(dy.t(), lora_s)

    @staticmethod
    def lora_down_grad(grad_s: Tensor, x: Tensor, ranks, seeds: Tensor, dropout_p) -> Tensor:
        return torch.mm(grad_s.t(), _as(x, torch.float32))

    def lora_linear_grad_input(
        self, grad_out: Tensor, weight: Tensor, absmax: Tensor | None, blocksize: int, grad_s: Tensor, lora_a: Tensor,
        ranks, seeds: Tensor, dropout_p,
    ) -> Tensor:  # fmt: skip
        n, k = grad_out.shape[1], lora_a.shape[1]
        dx = torch.mm(grad_out, self.weight(weight, absmax, blocksize, n, k, grad_out.dtype))
        if grad_out.dtype == torch.float32:
            return dx.addmm_(grad_s, _as(lora_a, torch.float32))
        return torch.addmm(dx.float(), grad_s, _as(lora_a, torch.float32)).to(grad_out.dtype)


def without_dropout(key) -> bool:
    """Where the composite applies: no dropout (its masks are the kernels' business)."""
    return not key.dropout
