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

from typing import Callable, Sequence

import torch

from fastlora.tuning.choice import _STATE, implementation, m_bucket
from fastlora.tuning.store import Decision

#: One training call of a LoRA layer as a patched model makes it (forward and backward), with the arguments of
#: ``layer_call(backend, x, dy, weight, absmax, blocksize, lora_a, lora_b, dropout_p)``: registered by the layer
#: that owns that call (:mod:`fastlora.functions.lora`, imported with the package), which sits above this one.
_LAYER_CALLS: list[Callable[..., None]] = []


def register_layer_call(layer_call: Callable[..., None]) -> None:
    """Make :func:`tune` also run ``layer_call`` per shape, so the layer's own choices (its graph) land in the cache.

    Usage: ``register_layer_call(lambda backend, x, dy, w, absmax, blocksize, a, b, p: ...)``
    """
    if layer_call not in _LAYER_CALLS:
        _LAYER_CALLS.append(layer_call)


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
    device = torch.device(device)
    impl = implementation(backend, device.type)
    buckets = sorted({m_bucket(m): m for m in tokens}.values())  # one M per bucket
    for n, k in shapes:
        weight, absmax, blocksize = _random_base(base, n, k, dtype, device)
        lora_a, lora_b = torch.randn(rank, k, device=device) / k**0.5, torch.randn(n, rank, device=device)
        for m in buckets:
            x, dy = torch.randn(m, k, dtype=dtype, device=device), torch.randn(m, n, dtype=dtype, device=device)
            for p in dropout:
                for layer_call in _LAYER_CALLS:
                    layer_call(backend, x, dy, weight, absmax, blocksize, lora_a, lora_b, p)
                seeds = torch.full((1,), 12345, dtype=torch.int64, device=device)
                s = impl.lora_down(x, lora_a, [rank], seeds, [p], [2.0])
                impl.lora_linear(x, weight, absmax, blocksize, None, s, lora_b)
                ds, _ = impl.lora_up_grad(dy, lora_b, s, [rank], [2.0])
                impl.lora_linear_grad_input(dy, weight, absmax, blocksize, ds, lora_a, [rank], seeds, [p])
                impl.lora_down_grad(ds, x, [rank], seeds, [p])
            if progress is not None:
                progress.update(1)
    return [d for d in _STATE.decisions.values() if d.key.backend == backend]


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
