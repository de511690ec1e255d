"""Tuning ahead of time (``fastlora tune``): every choice a training step would time, made now and cached.

A training step of a patched model times, on the first call of each shape key: the layer call's graph
(:mod:`fastlora.functions.graph`, op "lora_layer", forward and backward) and the five tuned ops (forward, grad_input and the
thin LoRA products), per M bucket, with and without dropout. :func:`tune` makes each of those calls once on random
inputs of the given layer shapes, so their choices land in the cache (``FASTLORA_TUNING_CACHE``); a training process
that starts afterwards with the same cache, device, versions, rank, dtype and dropout times nothing
(:func:`fastlora.tuning.first_contact` stays at zero).

Usage::

    tuning.tune("cpp", "cpu", [(512, 1536)], [1, 16, 512], base="nf4", rank=16, dropout=(0.0, 0.05))
"""

from __future__ import annotations

from typing import Sequence

import torch

from fastlora.tuning import _STATE, Decision, m_bucket


def tune(
    backend: str,
    device: torch.device | str,
    shapes: list[tuple[int, int]],
    tokens: list[int],
    base: str = "nf4",
    rank: int = 16,
    dtype: torch.dtype = torch.float32,
    progress=None,
    dropout: Sequence[float] = (0.0,),
) -> list[Decision]:
    """Tune ahead of time: per (N, K) shape, M bucket of ``tokens`` and dropout probability, one training call of a
    LoRA layer (forward and backward: its graph's choice) and every tuned op, on random inputs, so the choices land
    in the cache. Returns the decisions made or looked up.

    Usage: ``tuning.tune("cpp", "cpu", [(512, 1536)], [1, 16, 512], base="nf4")``
    """
    from fastlora import backends

    device = torch.device(device)
    impl = backends.implementation(backend, device.type)
    buckets = sorted({m_bucket(m): m for m in tokens}.values())  # one M per bucket
    for n, k in shapes:
        weight, absmax, blocksize = _random_base(base, n, k, dtype, device)
        lora_a, lora_b = torch.randn(rank, k, device=device) / k**0.5, torch.randn(n, rank, device=device)
        for m in buckets:
            x, dy = torch.randn(m, k, dtype=dtype, device=device), torch.randn(m, n, dtype=dtype, device=device)
            for p in dropout:
                _layer_call(backend, x, dy, weight, absmax, blocksize, lora_a, lora_b, p)
                seeds = torch.full((1,), 12345, dtype=torch.int64, device=device)
                s = impl.lora_down(x, lora_a, [rank], seeds, [p], [2.0])
                impl.lora_linear(x, weight, absmax, blocksize, None, s, lora_b)
                ds, _ = impl.lora_up_grad(dy, lora_b, s, [rank], [2.0])
                impl.lora_linear_grad_input(dy, weight, absmax, blocksize, ds, lora_a, [rank], seeds, [p])
                impl.lora_down_grad(ds, x, [rank], seeds, [p])
            if progress is not None:
                progress.update(1)
    return [d for d in _STATE.decisions.values() if d.key.backend == backend]


def _layer_call(backend: str, x, dy, weight, absmax, blocksize: int, lora_a, lora_b, dropout_p: float) -> None:
    """One training call of a LoRA layer as a patched model makes it: its graph is chosen (and timed) here."""
    from fastlora.functions.lora import Adapter, BaseWeight, lora_linear

    base = BaseWeight(weight, None, lora_b.shape[0], absmax, blocksize)
    adapter = Adapter(lora_a.detach().requires_grad_(), lora_b.detach().requires_grad_(), 2.0, dropout_p)
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        y = lora_linear(x, base, [adapter], backend)
        torch.autograd.grad(y, [x, adapter.lora_a, adapter.lora_b], dy)


def _random_base(base: str, n: int, k: int, dtype: torch.dtype, device: torch.device):
    """A random frozen W of ``base`` kind: "nf4" (packed codes, fp32 absmax, blocksize 64) or "dense"."""
    if base == "nf4":
        blocksize = 64
        packed = torch.randint(0, 256, ((n * k + 1) // 2,), dtype=torch.uint8, device=device)
        absmax = torch.rand((n * k + blocksize - 1) // blocksize, device=device)
        return packed, absmax, blocksize
    if base != "dense":
        raise ValueError(f"base {base!r}: choose nf4 or dense")
    return torch.randn(n, k, dtype=dtype, device=device) / k**0.5, None, 0
