"""Meta ops answered from a cache of their output shapes: what makes an accounted 8B step take seconds, not minutes.

On meta tensors an op computes nothing, but its meta function (Python decompositions, fake implementations of
custom ops) still runs, about a millisecond each; an 8B step runs some 13,000 of them. Its 32 decoder layers call the
same ops on the same shapes, so an op's outputs are a function of its inputs' shapes, strides and dtypes and its
other arguments. :class:`MetaOpCache` remembers them and makes fresh meta tensors of those shapes (a few µs).

Only ops whose every output is a fresh storage are cached (no views, no in-place or ``out=`` ops: aliasing must be
real): the first call of each key checks it. Anything unhashable, or a tensor not on meta, runs the op itself.

Usage::

    cache = MetaOpCache()
    out = cache.run(func, args, kwargs)     # inside a TorchDispatchMode, instead of func(*args, **kwargs)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

_UNCACHEABLE = object()


def _describe(value: Any) -> Any:
    """A hashable description of one argument, or raise TypeError (then the op runs itself)."""
    if isinstance(value, torch.Tensor):
        if not value.is_meta:
            raise TypeError("not a meta tensor")
        return (value.dtype, value.shape, value.stride(), value.storage_offset())
    if isinstance(value, (list, tuple)):
        return tuple([_describe(v) for v in value])
    if isinstance(value, dict):
        return tuple((k, _describe(v)) for k, v in sorted(value.items()))
    hash(value)
    return (type(value), value)


class MetaOpCache:
    """Output shapes of meta ops keyed on their arguments (see the module doc); ``hits`` counts the ops it answered."""

    def __init__(self) -> None:
        self._outputs: dict[tuple, Any] = {}
        self.hits = 0

    def run(self, func, args: tuple, kwargs: dict) -> Any:
        """``func(*args, **kwargs)``, from the cache where it can be."""
        try:
            key = (func, _describe(args), _describe(kwargs))
        except TypeError:
            return func(*args, **kwargs)
        known = self._outputs.get(key)
        if known is _UNCACHEABLE:
            return func(*args, **kwargs)
        if known is not None:
            self.hits += 1
            leaves, spec = known
            return tree_unflatten([_fresh(leaf) for leaf in leaves], spec)
        out = func(*args, **kwargs)
        self._outputs[key] = self._record(out, args, kwargs)
        return out

    @staticmethod
    def _record(out: Any, args: tuple, kwargs: dict) -> Any:
        leaves, spec = tree_flatten(out)
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        described, seen = [], set()
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                storage = id(leaf.untyped_storage())
                if leaf.device.type != "meta" or storage in inputs or storage in seen or leaf.storage_offset() != 0:
                    return _UNCACHEABLE  # a view, an in-place result, or outputs sharing a storage
                if leaf.untyped_storage().nbytes() != _span(leaf):
                    return _UNCACHEABLE  # a storage larger than the tensor: keep its real size
                seen.add(storage)
                described.append((leaf.dtype, tuple(leaf.shape), leaf.stride(), leaf.requires_grad))
            elif isinstance(leaf, (int, float, bool, type(None), torch.dtype)):
                described.append(_Constant(leaf))
            else:
                return _UNCACHEABLE
        return described, spec


class _Constant:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def _span(t: torch.Tensor) -> int:
    """Bytes from a tensor's first element to one past its last (its storage's size when it owns all of it)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))) * t.element_size()


def _fresh(leaf: Any) -> Optional[Any]:
    if isinstance(leaf, _Constant):
        return leaf.value
    dtype, shape, stride, requires_grad = leaf
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta", requires_grad=requires_grad)
