"""NF4 weights as bitsandbytes stores them, read without copying.

A bitsandbytes ``Params4bit`` holds W[N, K] flattened row-major, two 4-bit codes per byte (element 2i in the
high nibble, 2i+1 in the low one). Blocks of ``blocksize`` consecutive flat elements share one absmax; with
double quantization ("nested") that absmax is itself an 8-bit code: ``code2[q] * absmax2[i // blocksize2] +
offset``. fastlora resolves the nested absmax once per weight into fp32 and caches it, keyed on the packed
tensor's identity and version counter, so a requantization (e.g. a 4-bit merge) invalidates it.

Usage::

    nf4 = NF4Weight.from_params4bit(layer.base_layer.weight)
    w = nf4.dequantize(torch.bfloat16)       # equals bitsandbytes.functional.dequantize_4bit
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastlora.tensor_cache import TensorCache, lasting

#: The 16 NF4 code values (QLoRA paper, as bitsandbytes ships them), index = 4-bit code.
NF4_TABLE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_TABLE_CACHE: dict[torch.device, torch.Tensor] = {}


def nf4_table(device: torch.device | str) -> torch.Tensor:
    """The NF4 code table as an fp32 tensor on ``device`` (cached)."""
    device = torch.device(device)
    table = _TABLE_CACHE.get(device)
    if table is None:
        table = _TABLE_CACHE[device] = lasting(lambda: torch.tensor(NF4_TABLE, dtype=torch.float32, device=device))
    return table


class UnsupportedQuantization(ValueError):
    """The 4-bit weight is not in a layout fastlora reads (e.g. FP4, or bitsandbytes' CPU repacked format)."""


@dataclass(frozen=True)
class NF4Weight:
    """A read-only view of one NF4 weight: packed codes plus the fp32 absmax resolved from the quant state.

    ``packed`` is the flat uint8 storage (``ceil(n*k/2)`` bytes), ``absmax`` one fp32 scale per block of
    ``blocksize`` flat elements, ``shape`` the logical ``(n, k)``.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    blocksize: int
    shape: tuple[int, int]

    @staticmethod
    def from_params4bit(weight: torch.Tensor) -> "NF4Weight":
        """Read a bitsandbytes ``Params4bit`` (raises :class:`UnsupportedQuantization` when not plain NF4).

        Cached per weight (this runs on every forward of a patched layer); see :data:`_CACHE` for what a hit checks.
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


# The resolved fp32 absmax per quant state, keyed weakly on its absmax tensor: FSDP2 gathers the packed weight into
# a new Params4bit on every forward (bitsandbytes' fix_4bit_weight_quant_state_from_module), which misses the
# per-weight cache above, but the module's quant state stays the same object, so the absmax is resolved once.
_ABSMAX: TensorCache[torch.Tensor] = TensorCache()


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
    return NF4Weight(packed, _absmax(state), int(state.blocksize), (n, k))


def _absmax(state) -> torch.Tensor:
    """The resolved absmax of ``state``, from :data:`_ABSMAX` when double-quantized (a plain fp32 absmax is used as
    it is: caching it would keep its own key alive)."""
    if not state.nested or torch.compiler.is_compiling():
        return resolve_absmax(state)
    with torch._C.DisableTorchFunctionSubclass():
        key = _state_key(state)
    return _ABSMAX.get(state.absmax, key, lambda: resolve_absmax(state))


def resolve_absmax(state) -> torch.Tensor:
    """fp32 absmax of a bitsandbytes ``QuantState``, resolving double quantization exactly as bitsandbytes does."""
    if not state.nested:
        return state.absmax.float()
    from fastlora.backends.reference import nf4_resolve_absmax

    s2 = state.state2
    # The offset stays a tensor, as bitsandbytes adds it (fp32): float() of it would sync the host with the GPU, and
    # break a compiled graph (a data-dependent scalar).
    return nf4_resolve_absmax(state.absmax, s2.code, s2.absmax, int(s2.blocksize), state.offset)
