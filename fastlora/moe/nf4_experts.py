"""NF4 expert weights (QLoRA for mixture-of-experts): bitsandbytes 0.50 leaves transformers' 3-D expert weights in
bf16 (``load_in_4bit`` quantizes ``nn.Linear`` only), about 95% of an MoE model. :func:`quantize_experts` stores
them in bitsandbytes' NF4 block format instead, per expert: slice e of W [E, N, K] (the [out, in] matrix of
expert e) gets exactly the packed codes, absmax and double quantization that
``bitsandbytes.functional.quantize_4bit`` gives that slice (it is what computes them). The bf16 stack is freed.

Storage, per quantized projection ``name`` of an experts module (non-persistent buffers: ``.to()`` moves them; they
are not in ``state_dict``, so adapter files stay PEFT's):

- ``{name}_nf4_packed`` u8 [E, ceil(N·K/2)]: each expert's flat codes, two per byte (bitsandbytes' order);
- ``{name}_nf4_absmax`` [E, B] (B = ceil(N·K/blocksize)): fp32, or u8 codes with double quantization, then
  ``{name}_nf4_absmax2`` f32 [E, ceil(B/256)], ``{name}_nf4_offset`` f32 [E] and ``{name}_nf4_code2`` f32 [256]
  (absmax = code2[q]·absmax2[e, i // 256] + offset[e], bitsandbytes' order of operations).

The parameter itself is removed from the module; :func:`materialized` puts dequantized copies back for a call
that must run the module's own (or PEFT's) forward. The model-level API (quantize a model, its forward and merge
hooks) is :mod:`fastlora.moe.nf4_quantize`.

Usage::

    quantize_projection(experts, "down_proj", blocksize=64, nested=True)
    w = expert_stack(experts, "down_proj").dequantize(0, 4)     # experts 0..3, bit-identical to bitsandbytes
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

QUANT_TYPES = ("nf4",)
#: bitsandbytes' block of the double quantization (``quantize_blockwise(absmax - offset, blocksize=256)``).
NESTED_BLOCKSIZE = 256
#: The experts module's ``__dict__`` key holding {projection name: :class:`NF4Layout`}.
LAYOUTS_KEY = "_fastlora_nf4_layouts"
#: Set in the experts module's ``__dict__`` while :func:`materialized` holds dense copies (PEFT's parametrization
#: moves them out of ``_parameters`` during its call).
MATERIALIZED_KEY = "_fastlora_nf4_materialized"
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class NF4Layout:
    """What the buffers of one quantized projection hold: W as [E, N, K] (``transposed``: stored [E, K, N], like
    gpt-oss), the parameter's dtype (the compute dtype), the block size and whether absmax is double-quantized."""

    shape: tuple[int, int, int]
    dtype: torch.dtype
    blocksize: int
    nested: bool
    transposed: bool


@dataclass(frozen=True)
class NF4ExpertStack:
    """A read-only view of one quantized projection: W_e [N, K] per expert, dequantized on demand.

    Indexing ``stack[e]`` gives fp32 W_e (what the per-expert torch reference reads); :meth:`dequantize` a run of
    experts in one op.
    """

    packed: Tensor
    absmax: Tensor
    absmax2: Optional[Tensor]
    offset: Optional[Tensor]
    code2: Optional[Tensor]
    layout: NF4Layout

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.layout.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def resolved_absmax(self, first: int = 0, end: Optional[int] = None) -> Tensor:
        """fp32 absmax [end - first, B] of experts ``first:end``, resolved as bitsandbytes resolves it (a transient)."""
        stored = self.absmax[first:end]
        if not self.layout.nested:
            return stored
        blocks = torch.arange(stored.shape[1], device=stored.device) // NESTED_BLOCKSIZE
        scales = self.absmax2[first:end].index_select(1, blocks)
        return (self.code2.index_select(0, stored.reshape(-1).int()).view(stored.shape) * scales).add_(
            self.offset[first:end, None]
        )

    def dequantize(self, first: int = 0, end: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                   backend: str = "torch") -> Tensor:  # fmt: skip
        """W [end - first, N, K] of experts ``first:end`` in ``dtype`` (default the parameter's), bit-identical to
        ``bitsandbytes.functional.dequantize_4bit`` of each slice; one ``nf4_dequantize`` op when the experts' flat
        codes and blocks line up end to end (N·K a multiple of the block size), else one per expert.

        Usage: ``w = stack.dequantize(2, 5, torch.float32)``
        """
        from fastlora import ops

        experts, n, k = self.layout.shape
        end = experts if end is None else end
        dtype = dtype or self.layout.dtype
        absmax = self.resolved_absmax(first, end)
        if (n * k) % self.layout.blocksize == 0:
            flat = ops.nf4_dequantize(self.packed[first:end].reshape(-1), absmax.reshape(-1), self.layout.blocksize,
                                      (end - first) * n, k, dtype, backend)  # fmt: skip
            return flat.view(end - first, n, k)
        return torch.stack([
            ops.nf4_dequantize(self.packed[e], absmax[e - first], self.layout.blocksize, n, k, dtype, backend)
            for e in range(first, end)
        ])  # fmt: skip

    def __getitem__(self, expert: int) -> Tensor:
        return self.dequantize(expert, expert + 1, torch.float32)[0]


def nf4_nbytes(num_experts: int, n: int, k: int, blocksize: int = 64, compress_statistics: bool = True) -> int:
    """Bytes of one quantized projection W [E, N, K] in the storage above (what :func:`quantize_experts` keeps).

    Usage: ``nf4_nbytes(128, 1536, 2048)`` (one Qwen3-30B-A3B ``gate_up_proj``)
    """
    blocks = -(-n * k // blocksize)
    total = num_experts * (-(-n * k // 2))
    if not compress_statistics:
        return total + num_experts * blocks * 4
    return total + num_experts * (blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4) + 4 * 256


def is_quantized(experts: nn.Module, name: Optional[str] = None) -> bool:
    """Whether ``experts`` holds NF4 expert weights (``name``: that projection)."""
    layouts = experts.__dict__.get(LAYOUTS_KEY)
    return bool(layouts) and (name is None or name in layouts)


def expert_stack(experts: nn.Module, name: str) -> NF4ExpertStack:
    """The NF4 view of projection ``name`` of a quantized experts module (views of its buffers, built per call)."""
    layout = experts.__dict__[LAYOUTS_KEY][name]
    buffers = experts._buffers
    extra = [buffers.get(f"{name}_nf4_{part}") for part in ("absmax2", "offset", "code2")]
    return NF4ExpertStack(buffers[f"{name}_nf4_packed"], buffers[f"{name}_nf4_absmax"], *extra, layout=layout)


def projection_device(experts: nn.Module, name: str) -> torch.device:
    """Where the projection's weight lives, quantized or not."""
    if is_quantized(experts, name):
        return experts._buffers[f"{name}_nf4_packed"].device
    return experts._parameters[name].device


def quantize_projection(experts: nn.Module, name: str, blocksize: int, nested: bool, device=None) -> None:
    weight = experts._parameters[name].detach()
    transposed = bool(experts.is_transposed)
    w = weight.transpose(1, 2) if transposed else weight  # [E, N, K]: slice e is expert e's [out, in] matrix
    experts_count, n, k = w.shape
    blocks = -(-n * k // blocksize)
    device = weight.device if device is None or weight.device.type == "meta" else torch.device(device)
    buffers = {
        "packed": torch.empty((experts_count, -(-n * k // 2)), dtype=torch.uint8, device=device),
        "absmax": torch.empty((experts_count, blocks), dtype=torch.uint8 if nested else torch.float32, device=device),
    }
    if nested:
        buffers["absmax2"] = torch.empty((experts_count, -(-blocks // NESTED_BLOCKSIZE)), dtype=torch.float32, device=device)
        buffers["offset"] = torch.empty(experts_count, dtype=torch.float32, device=device)
        buffers["code2"] = torch.empty(256, dtype=torch.float32, device=device)
    if device.type != "meta":
        import bitsandbytes.functional as bnb_functional

        for expert in range(experts_count):
            packed, state = bnb_functional.quantize_4bit(
                w[expert].to(device).contiguous(), blocksize=blocksize, compress_statistics=nested, quant_type="nf4"
            )
            buffers["packed"][expert] = packed.view(torch.uint8).reshape(-1)
            buffers["absmax"][expert] = state.absmax
            if nested:
                buffers["absmax2"][expert] = state.state2.absmax
                buffers["offset"][expert] = state.offset
                buffers["code2"].copy_(state.state2.code)
    layout = NF4Layout((experts_count, n, k), weight.dtype, blocksize, nested, transposed)
    del experts._parameters[name]
    for part, tensor in buffers.items():
        experts.register_buffer(f"{name}_nf4_{part}", tensor, persistent=False)
    experts.__dict__.setdefault(LAYOUTS_KEY, {})[name] = layout


def dequantized_weight(experts: nn.Module, name: str) -> Tensor:
    """The projection's weight as the module stores it ([E, N, K], or [E, K, N] transposed), dequantized to its dtype."""
    stack = expert_stack(experts, name)
    w = stack.dequantize()
    return w.transpose(1, 2).contiguous() if stack.layout.transposed else w


@contextlib.contextmanager
def materialized(experts: nn.Module) -> Iterator[None]:
    """For the duration of the block, the quantized weights of ``experts`` are ordinary frozen parameters again
    (dequantized copies, freed afterwards): what the module's own forward, and PEFT's forward over it, read.

    Usage: ``with materialized(experts): out = peft_wrapper.forward(x, idx, w)``
    """
    names = list(experts.__dict__.get(LAYOUTS_KEY, {}))
    if not names or experts.__dict__.get(MATERIALIZED_KEY):
        yield
        return
    for name in names:
        experts._parameters[name] = nn.Parameter(dequantized_weight(experts, name), requires_grad=False)
    experts.__dict__[MATERIALIZED_KEY] = True
    try:
        yield
    finally:
        del experts.__dict__[MATERIALIZED_KEY]
        for name in names:
            experts._parameters.pop(name, None)


