"""The ``triton`` backend: the ops of :mod:`fastlora.ops` on the Triton kernels of :mod:`fastlora.kernels`.

Serves CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (tests). The linear ops pick the fused
kernel or the split path per shape (:func:`fastlora.kernels.dispatch.choice`). Signatures follow
:mod:`fastlora.backends.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora import kernels
from fastlora.kernels.common import interpreting

#: tl.dot on bf16 and the async copies the configs pipeline with need Ampere or newer.
MIN_CAPABILITY = (8, 0)


def unavailable_reason() -> str | None:
    """Why these kernels cannot run here (a CUDA GPU older than Ampere), or None."""
    if interpreting() or not torch.cuda.is_available():
        return None
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return f"needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, found {capability[0]}.{capability[1]}"
    return None


def nf4_resolve_absmax(absmax_q: Tensor, code2: Tensor, absmax2: Tensor, blocksize2: int, offset: float) -> Tensor:
    return kernels.nf4_resolve_absmax(absmax_q, code2, absmax2, blocksize2, offset)


def nf4_dequantize(packed: Tensor, absmax: Tensor, blocksize: int, n: int, k: int, dtype: torch.dtype) -> Tensor:
    return kernels.nf4_dequantize(packed, absmax, blocksize, n, k, dtype)


def lora_down(x: Tensor, lora_a: Tensor, ranks: list[int], seeds: Tensor, dropout_p: list[float]) -> Tensor:
    return kernels.lora_down(x, lora_a, ranks, seeds, dropout_p)


def lora_linear(
    x: Tensor, weight: Tensor, absmax: Tensor | None, blocksize: int, bias: Tensor | None, lora_s: Tensor, lora_b: Tensor
) -> Tensor:
    return kernels.lora_linear(x, weight, absmax, blocksize, bias, lora_s, lora_b)


def lora_up_grad(grad_out: Tensor, lora_b: Tensor, lora_s: Tensor) -> tuple[Tensor, Tensor]:
    return kernels.lora_up_grad(grad_out, lora_b, lora_s)


def lora_down_grad(grad_s: Tensor, x: Tensor, ranks: list[int], seeds: Tensor, dropout_p: list[float]) -> Tensor:
    return kernels.lora_down_grad(grad_s, x, ranks, seeds, dropout_p)


def lora_linear_grad_input(
    grad_out: Tensor,
    weight: Tensor,
    absmax: Tensor | None,
    blocksize: int,
    grad_s: Tensor,
    lora_a: Tensor,
    ranks: list[int],
    seeds: Tensor,
    dropout_p: list[float],
) -> Tensor:
    return kernels.lora_linear_grad_input(grad_out, weight, absmax, blocksize, grad_s, lora_a, ranks, seeds, dropout_p)
