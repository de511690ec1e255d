"""Which Triton paths exist per op, and the launchers' default when no path is given.

:data:`CANDIDATES` is the Triton backend's list of run-time candidates: :mod:`fastlora.tuning` times them per
shape on the GPU at hand (together with a plain torch/cuBLAS composite) and keeps the fastest, seeded by the
shipped ``dispatch_table.json``. The paths of the linear ops:

- "fused": one Triton kernel (NF4 unpacked in registers, LoRA epilogue in the same tile);
- "split": dequantize NF4 into a per-call buffer, cuBLAS GEMM, then a Triton epilogue adding bias + LoRA terms.

A launcher called directly without ``path`` uses :func:`choice`: ``FASTLORA_PATH`` when it names one of
:data:`PATHS`, else the rule of :data:`DEFAULT_SPLIT_FROM_M`, a guess from the roofline in DESIGN.md that **no GPU
has measured yet**. Nothing here knows about models or autograd.

Usage::

    choice("forward", "nf4", m=512, n=4096, k=4096, dtype=torch.bfloat16)  # Choice(path='fused', source=...)
    dequant_buffer(4096, 4096, torch.bfloat16, x.device)                   # the split path's per-call W buffer
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from fastlora.kernels import common

#: The Triton backend's run-time candidates per op: path name -> (launcher as "module.function" under
#: ``fastlora.kernels``, keyword arguments bound to it). The launcher takes the op's arguments
#: (:mod:`fastlora.ops`); the first path of an op is its default. A kernel variant is added with one line here.
CANDIDATES: dict[str, dict[str, tuple]] = {
    "lora_down": {"triton": ("lora_down.lora_down", {})},
    "lora_linear": {
        "fused": ("lora_linear.lora_linear", {"path": "fused"}),
        "split": ("lora_linear.lora_linear", {"path": "split"}),
        "transposed": ("lora_linear_transposed.lora_linear_transposed", {}, "few_tokens_dense_or_nf4"),
    },
    "lora_up_grad": {"triton": ("lora_up_grad.lora_up_grad", {})},
    "lora_down_grad": {"triton": ("lora_down_grad.lora_down_grad", {})},
    "lora_linear_grad_input": {
        "fused": ("lora_linear_grad_input.lora_linear_grad_input", {"path": "fused"}),
        "split": ("lora_linear_grad_input.lora_linear_grad_input", {"path": "split"}),
        "transposed": ("lora_linear_grad_input_transposed.lora_linear_grad_input_transposed", {}, "few_tokens_dense_or_nf4"),
    },
}
#: Where a candidate applies, named by the optional third element of its CANDIDATES entry (``key`` is a
#: :class:`fastlora.tuning.ShapeKey`). The transposed kernels (yᵀ = W·xᵀ, wgmma with W from registers) serve at
#: most 64 tokens (their M tile) of a dense or NF4 W.
APPLIES = {"few_tokens_dense_or_nf4": lambda key: key.m_bucket <= common.MAX_FEW_TOKENS and key.base != "int8"}
#: Forces a path for every call (see :mod:`fastlora.tuning`); a launcher's default honours "fused" and "split".
ENV_VAR = "FASTLORA_PATH"
#: Read when FASTLORA_PATH is unset: the variable of earlier versions, which scripts and tests still set.
LEGACY_ENV_VAR = "FASTLORA_TRITON_PATH"
PATHS = ("fused", "split")
#: Unmeasured guess for launchers called without a path: the split path for M buckets (M rounded up to a power of
#: two) from this many tokens on, per base. NF4 fused saves the dequant round trip and the epilogue's pass over y
#: (roofline gain >= 1.2x at M=4096); a dense fused Triton GEMM must stay within ~10% of cuBLAS to win at large M.
DEFAULT_SPLIT_FROM_M = {"nf4": 2048, "dense": 512}


class Choice(NamedTuple):
    """The path a call takes and where that decision came from ("forced by FASTLORA_PATH", "default (unmeasured)")."""

    path: str
    source: str


def choice(op: str, base: str, m: int, n: int, k: int, dtype: torch.dtype) -> Choice:
    """The default path of ``op`` ("forward" or "grad_input") for an M x N x K problem with a ``base`` ("nf4"/"dense")
    W, for launchers called without ``path`` (the backend always passes the path :mod:`fastlora.tuning` chose).

    Usage: ``dispatch.choice("forward", "nf4", 16, 4096, 4096, torch.bfloat16).path  # "fused"``
    """
    forced = os.environ.get(ENV_VAR) or os.environ.get(LEGACY_ENV_VAR)
    if forced in PATHS:
        return Choice(forced, f"forced by {ENV_VAR}")
    path = "split" if common.m_bucket(m) >= DEFAULT_SPLIT_FROM_M[base] else "fused"
    return Choice(path, "default (unmeasured)")


def dequant_buffer(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The [n, k] buffer for one split-path call's dequantized W: a fresh tensor per call, as PEFT's own
    dequantization makes. On a GPU the caching allocator hands the same block back on the next call (no cudaMalloc),
    and between calls the block is free for other tensors: a buffer kept for the model's lifetime would sit on top
    of every peak (112 MiB on Llama-3-8B, above PEFT's). Fresh tensors are also what CUDA-graph capture needs."""
    return torch.empty((n, k), dtype=dtype, device=device)
