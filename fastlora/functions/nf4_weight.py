"""NF4 weights as bitsandbytes stores them, read without copying.

The format (codes, blocks, double quantization) is described in :mod:`fastlora.formats.nf4`. fastlora keeps no resolved copy: an fp32 absmax per weight (4 bytes per 64 parameters, 0.41 GiB on an
8B model) would put a patched model's peak above PEFT's. Each call resolves it into a transient
(:func:`resolve_absmax`, one small op: it reads 1 byte and writes 4 per 64 weights, whose packed codes are 32 bytes)
that dies with the call, and backward resolves it again.

Usage::

    nf4 = NF4Weight.from_params4bit(layer.base_layer.weight)
    w = nf4.dequantize(torch.bfloat16)       # equals bitsandbytes.functional.dequantize_4bit
    absmax = resolve_absmax(nf4.stored_absmax, nf4.nested, "torch")   # fp32, one per block: a transient
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from fastlora.tensor_cache import TensorCache

class UnsupportedQuantization(ValueError):
    """The 4-bit weight is not in a layout fastlora reads (e.g. FP4, or bitsandbytes' CPU repacked format)."""


class NestedAbsmax(NamedTuple):
    """bitsandbytes' double quantization of an NF4 absmax: absmax_i = code[q_i] * absmax[i // blocksize] + offset.
    The tensors are the quant state's own (nothing copied); ``offset`` is a float, or the 0-d tensor inside a
    compiled graph (where ``float()`` would break it)."""

    code: Tensor
    absmax: Tensor
    blocksize: int
    offset: Union[float, Tensor]


def resolve_absmax(stored: Tensor, nested: Optional[NestedAbsmax], backend: str, keep: bool = False) -> Tensor:
    """fp32 absmax, one per block: ``stored`` itself without double quantization, else resolved by ``backend``'s op
    exactly as bitsandbytes resolves it: a fresh tensor (the caller's transient), or with ``keep`` one copy per
    weight kept for later calls (callers keep one only for calls without an autograd graph of at most
    :data:`KEEP_UP_TO_TOKENS` rows: decoding, where resolving is a third of a CPU call's time; never for calls with a
    graph, nor for the no-grad forward of reentrant checkpointing, whose calls have a sequence's rows).

    Usage: ``absmax = resolve_absmax(base.absmax, base.nested, "torch")``
    """
    if nested is None:
        return stored
    if isinstance(nested.offset, Tensor):  # compiled: the reference's fp32 ops, traced with the offset tensor
        from fastlora.backends.reference import nf4_resolve_absmax

        return nf4_resolve_absmax(stored, nested.code, nested.absmax, nested.blocksize, nested.offset)
    from fastlora import ops

    def resolve() -> Tensor:
        return ops.nf4_resolve_absmax(stored, nested.code, nested.absmax, nested.blocksize, nested.offset, backend)

    if not keep:
        return resolve()
    key = (stored._version, id(nested.absmax), nested.absmax._version, id(nested.code), nested.code._version, nested.offset)
    return _KEPT.get(stored, key, resolve)


#: Calls without an autograd graph of at most this many rows keep the resolved absmax (see resolve_absmax).
KEEP_UP_TO_TOKENS = 16

# Inference's resolved absmax per stored (uint8) absmax tensor, valid while its key holds (see resolve_absmax).
_KEPT: TensorCache[Tensor] = TensorCache()


@dataclass(frozen=True)
class NF4Weight:
    """A read-only view of one NF4 weight: packed codes plus the absmax as the quant state stores it.

    ``packed`` is the flat uint8 storage (``ceil(n*k/2)`` bytes), ``stored_absmax`` one scale per block of
    ``blocksize`` flat elements (fp32, or uint8 codes when ``nested``: see :class:`NestedAbsmax`), ``shape`` the
    logical ``(n, k)``. :attr:`absmax` resolves the fp32 scales anew on each read.
    """

    packed: torch.Tensor
    stored_absmax: torch.Tensor
    nested: Optional[NestedAbsmax]
    blocksize: int
    shape: tuple[int, int]

    @property
    def absmax(self) -> torch.Tensor:
        """fp32 absmax per block, resolved now (not kept: see the module doc)."""
        return resolve_absmax(self.stored_absmax, self.nested, "torch")

    @staticmethod
    def from_params4bit(weight: torch.Tensor) -> "NF4Weight":
        """Read a bitsandbytes ``Params4bit`` (raises :class:`UnsupportedQuantization` when not plain NF4).

        Cached per weight (views and references only, no resolved copy); see :data:`_CACHE` for what a hit checks.
        """
        state = getattr(weight, "quant_state", None)
        if state is None:
            raise UnsupportedQuantization("4-bit weight has no quant_state (not quantized yet?)")
        if torch.compiler.is_compiling():
            # A compiled graph cannot key a cache on ids and data pointers; resolving is one cheap op in the graph.
            return _read(weight, state)
        with torch._C.DisableTorchFunctionSubclass():  # Params4bit's __torch_function__ costs ~1 µs per read
            key = cache_key(weight)
        return _CACHE.get(weight, key, lambda: _read(weight, state))

    def dequantize(self, dtype: torch.dtype = torch.float32, backend: str = "torch") -> torch.Tensor:
        """W[n, k] in ``dtype``, bit-identical to ``bitsandbytes.functional.dequantize_4bit``."""
        from fastlora import ops

        n, k = self.shape
        return ops.nf4_dequantize(self.packed, self.absmax, self.blocksize, n, k, dtype, backend)


# NF4Weight per Params4bit, valid while its cache_key holds.
_CACHE: TensorCache[NF4Weight] = TensorCache()
# The nested absmax's offset as a float, per offset tensor: FSDP2 gathers the packed weight into a new Params4bit on
# every forward (bitsandbytes' fix_4bit_weight_quant_state_from_module), which misses _CACHE, but the module's quant
# state, and its offset, stay the same objects, so the device is read once per weight.
_OFFSETS: TensorCache[float] = TensorCache()


def cache_key(weight: torch.Tensor) -> tuple:
    """What an :class:`NF4Weight` read from ``weight`` (a ``Params4bit`` with its quant state) depends on: the codes'
    version counter and data pointer, and the quant state's tensors (identity and version counter): its absmax and,
    with double quantization, the nested absmax, code table and offset. Requantizing (merging into a 4-bit base)
    or rewriting any of them in place changes the key."""
    return (weight._version, weight.data_ptr()) + _state_key(weight.quant_state)


def _state_key(state) -> tuple:
    """What the resolved absmax of a quant state depends on (identity and version counter of its tensors)."""
    key = (id(state), id(state.absmax), state.absmax._version)
    if state.nested:
        nested, offset = state.state2, state.offset
        key += (id(nested), id(nested.absmax), nested.absmax._version, id(nested.code), nested.code._version,
                id(offset), getattr(offset, "_version", None))  # fmt: skip
    return key


def _read(weight: torch.Tensor, state) -> NF4Weight:
    if state.quant_type != "nf4":
        raise UnsupportedQuantization(f"quant_type {state.quant_type!r} (only 'nf4' is fused)")
    if getattr(state, "packing_format_for_cpu", False):
        raise UnsupportedQuantization("bitsandbytes repacked this weight for its CPU inference kernel")
    shape = tuple(state.shape)
    if len(shape) != 2:
        raise UnsupportedQuantization(f"4-bit weight of logical shape {shape} is not a matrix")
    packed = weight.data.view(torch.uint8).reshape(-1)
    n, k = shape
    if packed.numel() != (n * k + 1) // 2:
        raise UnsupportedQuantization(f"packed size {packed.numel()} does not match shape {shape}")
    return NF4Weight(packed, *_stored_absmax(state), int(state.blocksize), (n, k))


def quant_state_absmax(state) -> Tensor:
    """fp32 absmax of a bitsandbytes ``QuantState``, resolved now exactly as bitsandbytes resolves it.

    Usage: ``absmax = quant_state_absmax(weight.quant_state)``
    """
    return resolve_absmax(*_stored_absmax(state), "torch")


def _stored_absmax(state) -> tuple[Tensor, Optional[NestedAbsmax]]:
    """The quant state's absmax as stored, and its double quantization if any."""
    if not state.nested:
        return state.absmax.float(), None
    s2 = state.state2
    # bitsandbytes adds the offset as a 0-d tensor in fp32; a Python float rounds the same way once cast. Compiled,
    # float() of it would break the graph (a data-dependent scalar): the tensor is kept. Read once per offset tensor
    # (_OFFSETS): on a GPU, float() waits for the device.
    if torch.compiler.is_compiling() or not isinstance(state.offset, Tensor):
        offset = state.offset
    else:
        offset = _OFFSETS.get(state.offset, state.offset._version, lambda: float(state.offset))
    return state.absmax, NestedAbsmax(s2.code, s2.absmax, int(s2.blocksize), offset)
