"""Which autograd graph a dense fp32 layer call builds, chosen per shape by measuring forward+backward.

- "function": fastlora's :class:`~fastlora.autograd.LoRALinearFunction` (the backend's ops below autograd, a
  Python backward);
- "autograd": torch's own nodes, ``addmm(F.linear(x, W, b), x·Aᵀ, Bᵀ, alpha=s)``, whose backward runs in C++.

At few tokens a dense fp32 layer's time is mostly host work, and a Python backward is a large part of it; with a
dense W there is no dequantization to save, so torch's graph can be the faster one. Both save the same tensors
(x and S = x·Aᵀ; W, A and B are parameters) and compute in fp32. The choice applies only where both compute the
same thing, on a kernel backend: a dense fp32 W and x, one adapter, no dropout, no ``lora_bias``, mixed batch or DoRA, a bias that
needs no gradient, gradients wanted, not under ``torch.compile``. It is made like the ops' paths
(:func:`fastlora.tuning.choose`: op "lora_layer", forced by ``FASTLORA_PATH=lora_layer=function``), timing one
forward+backward of each on detached copies of the call's inputs (no ``.grad`` is touched). Inference calls (no
graph) choose the same way between the fastlora ops and torch's (op "lora_layer_inference"), timing the forward.

Usage::

    if graph.uses_autograd(x, base, adapter, backend, fused): y = graph.autograd_lora(x, base.weight, base.bias, adapter)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlora import tuning

_memo = tuning.memo_holder()


def applies(x: Tensor, weight: Tensor, bias, adapter, backend: str) -> bool:
    """Whether both graphs compute this call (see the module docstring) and its backend's paths are timed (the
    kernel backends; not the torch reference, the oracle, nor Triton's CPU interpreter)."""
    return (
        adapter.dropout_p == 0.0
        and (backend == "cpp" or (backend == "triton" and x.is_cuda))
        and x.dtype is torch.float32
        and weight.dtype is torch.float32
        and adapter.dora is None
        and adapter.lora_bias is None
        and adapter.rows is None
        and (bias is None or not bias.requires_grad)
        and not torch.compiler.is_compiling()
    )


def autograd_lora(x: Tensor, weight: Tensor, bias, adapter) -> Tensor:
    """``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` on torch's autograd nodes (x 2-D, everything fp32)."""
    return torch.addmm(F.linear(x, weight, bias), x @ adapter.lora_a.T, adapter.lora_b.T, alpha=adapter.scale)


def uses_autograd(
    x: Tensor, weight: Tensor, bias, adapter, backend: str, training: bool, fused: Callable[..., Tensor]
) -> bool:
    """Whether this call (2-D x, :func:`applies` true) takes torch's ops. ``fused(x, a, b)`` computes the same call
    the fastlora way with adapter tensors ``a``, ``b``; ``training``: a graph is built (timed with its backward),
    else an inference call (timed alone)."""
    raw = (x.shape, weight.shape, adapter.lora_a.shape, x.requires_grad, training, backend)
    path = _memo[0].get(raw)
    if path is None:
        path = _memo[0][raw] = _decide(x, weight, bias, adapter, backend, training, fused)
    return path == "autograd"


def _decide(x, weight, bias, adapter, backend, training, fused) -> str:
    m, k = x.shape
    n, r = weight.shape[0], adapter.lora_a.shape[0]
    op = "lora_layer" if training else "lora_layer_inference"
    key = tuning.ShapeKey(backend, op, tuning.m_bucket(m), n, k, r, "float32", "float32", False, tuning.device_name(x.device))
    if not training:
        with torch.no_grad():
            return tuning.choose(key, {"function": lambda: fused(x, adapter.lora_a, adapter.lora_b),
                                       "autograd": lambda: autograd_lora(x, weight, bias, adapter)}, x.device)
    x_leaf = x.detach().requires_grad_(x.requires_grad)
    a_leaf, b_leaf = adapter.lora_a.detach().requires_grad_(), adapter.lora_b.detach().requires_grad_()
    leaves = [t for t in (x_leaf, a_leaf, b_leaf) if t.requires_grad]
    grad_y = torch.randn(m, n, device=x.device)
    copy = adapter._replace(lora_a=a_leaf, lora_b=b_leaf)

    def run(graph: Callable[[], Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(graph(), leaves, grad_y)

    runs = {
        "function": run(lambda: fused(x_leaf, a_leaf, b_leaf)),
        "autograd": run(lambda: autograd_lora(x_leaf, weight, bias, copy)),
    }
    with torch.enable_grad():
        return tuning.choose(key, runs, x.device)
