"""A cache of values derived from a tensor (a resolved absmax, squared row norms), keyed weakly on the tensor.

An entry is found by the tensor's identity and holds while the caller's ``key`` (version counter, data pointers, ...)
is unchanged, so a tensor rewritten in place or requantized misses; a freed tensor frees its entry. (Tensors compare
elementwise, so a ``WeakKeyDictionary`` cannot hold them: entries are keyed on ``id()`` with a weakref to evict.)

Values are built with inference mode off (:func:`lasting`): a cache outlives the call that filled it, and a tensor
made under ``torch.inference_mode()`` could never be saved for backward by a later training call.

Usage::

    _NORMS = TensorCache()
    norms = _NORMS.get(weight, (weight._version, weight.data_ptr()), lambda: weight.float().square().sum(1))
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Generic, Hashable, TypeVar

import torch

T = TypeVar("T")


def lasting(compute: Callable[[], T]) -> T:
    """``compute()`` run with inference mode and grad mode off, for a tensor kept across calls (a cache entry, a
    constant): under ``torch.inference_mode()`` it would be an inference tensor, which every later call with autograd
    on would fail to save for backward ("Inference tensors cannot be saved for backward").

    Usage: ``_ZEROS[device] = lasting(lambda: torch.zeros((), device=device))``
    """
    if not torch.is_inference_mode_enabled():
        return compute()
    with torch.inference_mode(False), torch.no_grad():
        return compute()


class TensorCache(Generic[T]):
    """Values computed from tensors, one per tensor, recomputed when the tensor's key changes."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, Hashable, T]] = {}
        #: How many lookups computed their value (first sight of a tensor, or a changed key): what tests count.
        self.misses = 0

    def get(self, owner: torch.Tensor, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value for ``owner`` under ``key``, else ``compute()`` (stored for the next call)."""
        owner_id = id(owner)
        hit = self._entries.get(owner_id)
        if hit is not None and hit[0]() is owner and hit[1] == key:
            return hit[2]
        self.misses += 1
        value = lasting(compute)
        entries = self._entries
        self._entries[owner_id] = (weakref.ref(owner, lambda _: entries.pop(owner_id, None)), key, value)
        return value

    def values(self) -> list[T]:
        """The values cached now."""
        return [entry[2] for entry in self._entries.values()]


@functools.lru_cache(maxsize=256)
def _column_scales(device: torch.device, ranks: tuple[int, ...], scales: tuple[float, ...]) -> torch.Tensor:
    values = [s for r, s in zip(ranks, scales) for _ in range(r)]
    return lasting(lambda: torch.tensor(values, dtype=torch.float32, device=device))


def column_scales(ranks: list[int], scales: list[float], device: torch.device) -> torch.Tensor:
    """f32[R]: each stacked rank column's LoRA scale (adapter a's s_a over its r_a columns). Cached per (device,
    ranks, scales): on CUDA each build is a blocking host-to-device copy, and a CUDA-graph capture may only read it.
    Read-only for callers.

    Usage: ``column_scales([16, 8], [2.0, 0.5], x.device)``
    """
    return _column_scales(torch.device(device), tuple(ranks), tuple(scales))
