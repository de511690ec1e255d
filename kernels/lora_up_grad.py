"""Gradients through the LoRA up-projection: ``dS = s·dy·B`` per adapter and ``dB = dyᵀ·S``, both fp32.

Two thin GEMMs on the kernels of :mod:`~fastlora.kernels.lora_down` and :mod:`~fastlora.kernels.lora_down_grad`
(no dropout): they read dy once each in its own dtype, where ``dy.float() @ B`` would first write an fp32
copy of dy, [M, N], larger than everything else in the layer.
"""

from __future__ import annotations

import torch

from fastlora.kernels import common
from fastlora.kernels.lora_down import thin_down
from fastlora.kernels.lora_down_grad import thin_grad


def lora_up_grad(
    grad_out: torch.Tensor, lora_b: torch.Tensor, lora_s: torch.Tensor, ranks: list[int], scales: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dS [M, R], dB [N, R])`` in fp32 for dy [M, N], B [N, R], S [M, R] (S already scaled): adapter a's
    columns of dS are ``s_a·dy·B_a``, and ``dB = dyᵀ·S``.

    Usage: ``ds, db = lora_up_grad(dy, b, s, [16], [2.0])``
    """
    n, r = lora_b.shape
    seeds = common.no_seeds(grad_out.device)
    grad_s = thin_down(grad_out, lora_b.T, ranks, seeds, [0.0] * len(ranks), scales)
    grad_b = torch.empty((n, r), dtype=torch.float32, device=grad_out.device)
    thin_grad(lora_s, grad_out, [r], seeds, [0.0], grad_b.T)
    return grad_s, grad_b
