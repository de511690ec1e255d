"""One ``torch.autograd.Function`` for the LoRA linear: dense or NF4 base plus stacked adapters.

Forward saves x (in the compute dtype, shared with any other layer that reads the same x), the thin
``S = s·drop(x)·Aᵀ`` [M, R] and the per-call dropout seeds; never the dequantized W, a dropped copy of x, a mask
or a scaled copy of B (the LoRA scale lives in S). Backward regenerates the dropout masks from the seeds.

Usage::

    y = lora_linear(x, base, adapters, backend="triton")
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fastlora import ops, tuning
from fastlora.formats.dropout import draw_seeds
from fastlora.functions import graph
from fastlora.functions.dora import DoRA, dora_linear
from fastlora.functions.nf4_weight import KEEP_UP_TO_TOKENS, NestedAbsmax, resolve_absmax
from fastlora.tensor_cache import lasting


# NamedTuples, not dataclasses: one of each is built per layer call, and a frozen dataclass costs microseconds.
class BaseWeight(NamedTuple):
    """The frozen base of a LoRA layer: a dense [N, K] weight (any strides: GPT-2's Conv1D passes its [K, N] weight
    transposed), NF4 codes plus their absmax as the quant state stores it (fp32, or uint8 codes resolved per call
    through ``nested``: :mod:`fastlora.functions.nf4_weight`), or bitsandbytes 8-bit int8 [N, K] with its per-row SCB as ``absmax``
    (``blocksize`` 0)."""

    weight: Tensor
    bias: Optional[Tensor]
    out_features: int
    absmax: Optional[Tensor] = None
    blocksize: int = 0
    nested: Optional[NestedAbsmax] = None


class Adapter(NamedTuple):
    """One active LoRA adapter: A [r, K], B [N, r], scale, and the dropout probability in effect now.

    Optional parts: ``lora_bias`` [N], B's own bias (``lora_bias=True``: scaled by ``scale`` like B's output);
    ``rows`` (fp32 [x.shape[0]], 1.0 where this adapter serves a row of x's leading dimension, 0.0 elsewhere) for
    ``adapter_names`` mixed batches; ``dora`` (:class:`fastlora.functions.dora.DoRA`) for a DoRA adapter.
    """

    lora_a: Tensor
    lora_b: Tensor
    scale: float
    dropout_p: float
    lora_bias: Optional[Tensor] = None
    rows: Optional[Tensor] = None
    dora: Optional[DoRA] = None


class _Config(NamedTuple):
    """The non-tensor arguments of one call, passed to the Function as one object (fewer arguments to check)."""

    blocksize: int
    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    dropout_p: tuple[float, ...]
    backend: str
    nested: Optional[NestedAbsmax] = None  # the NF4 absmax's double quantization: resolved per call, never saved


class LoRALinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + Σ_a s_a·(drop_a(x)·A_aᵀ)·B_aᵀ on 2-D x in the compute dtype. Adapter tensors follow the
    fixed arguments as A_1, B_1, A_2, B_2, ... so that autograd routes their gradients."""

    @staticmethod
    def forward(ctx, x, weight, absmax, bias, seeds, row_mask, config, *adapter_tensors):
        y, lora_a, lora_b, lora_s = _forward(x, weight, absmax, bias, seeds, row_mask, config, adapter_tensors)
        dropout = any(p > 0.0 for p in config.dropout_p)
        ctx.save_for_backward(x, weight, absmax, lora_a, lora_b, lora_s, seeds if dropout else None, row_mask)
        ctx.config = config
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.adapter_dtypes = [t.dtype for t in adapter_tensors]
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, absmax, lora_a, lora_b, lora_s, seeds, row_mask = ctx.saved_tensors
        blocksize, ranks, scales, dropout_p, backend, nested = ctx.config
        if seeds is None:
            seeds = _unused_seeds(len(ranks), x.device)
        impl = ops.implementation(backend, x.device.type)
        grad_out = grad_out.contiguous()
        grad_s, grad_b_all = impl.lora_up_grad(grad_out, lora_b, lora_s, ranks, scales)
        if row_mask is not None:
            grad_s = grad_s * row_mask  # rows an adapter does not serve give it no gradient (S is masked alike)
        grad_x = None
        if ctx.needs_input_grad[0]:
            absmax = resolve_absmax(absmax, nested, backend)  # again: forward kept only the stored codes
            grad_x = impl.lora_linear_grad_input(grad_out, weight, absmax, blocksize, grad_s, lora_a, ranks, seeds, dropout_p)
        grad_a_all = impl.lora_down_grad(grad_s, x, ranks, seeds, dropout_p)
        grad_bias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = grad_out.float().sum(0).to(ctx.bias_dtype)
        dtypes = ctx.adapter_dtypes
        if len(ranks) == 1:
            grads = (_as(grad_a_all, dtypes[0]), _as(grad_b_all, dtypes[1]))
        else:
            grads, start = [], 0
            for i, r in enumerate(ranks):
                grads.append(_as(grad_a_all[start : start + r], dtypes[2 * i]))
                grads.append(_as(grad_b_all[:, start : start + r], dtypes[2 * i + 1]))
                start += r
        return (grad_x, None, None, grad_bias, None, None, None, *grads)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the call when it is already that dtype (this runs on every layer call)."""
    return t if t.dtype == dtype else t.to(dtype)


def _needs_graph(x: Tensor, bias: Optional[Tensor], adapter_tensors: list[Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or (bias is not None and bias.requires_grad) or any(t.requires_grad for t in adapter_tensors)


def _forward(x, weight, absmax, bias, seeds, row_mask, config: _Config, adapter_tensors):
    """The forward ops: y, and the stacked A and B and S = s·drop(x)·Aᵀ that backward needs."""
    impl = ops.implementation(config.backend, x.device.type)
    lora_a, lora_b = _stack_adapters(adapter_tensors)
    lora_s = impl.lora_down(x, lora_a, config.ranks, seeds, config.dropout_p, config.scales)
    if row_mask is not None:
        lora_s = lora_s * row_mask  # mixed batch: each row keeps the S columns of its own adapter only
    if config.nested is not None:
        absmax = resolve_absmax(absmax, config.nested, config.backend)  # a transient: ctx saves the stored codes
    y = impl.lora_linear(x, weight, absmax, config.blocksize, bias, lora_s, lora_b)
    return y, lora_a, lora_b, lora_s


def _stack_adapters(adapter_tensors) -> tuple[Tensor, Tensor]:
    """fp32 A stacked along r [R, K] and B [N, R] from (A_1, B_1, A_2, B_2, ...), so the kernels see one epilogue
    for all adapters. A single fp32 adapter is used as it is: no copy."""
    if len(adapter_tensors) == 2:
        return _as(adapter_tensors[0], torch.float32), _as(adapter_tensors[1], torch.float32)
    return torch.cat([a.float() for a in adapter_tensors[0::2]]), torch.cat([b.float() for b in adapter_tensors[1::2]], dim=1)


def _seeds(adapters: Sequence[Adapter], x: Tensor) -> Tensor:
    if adapters[0].dropout_p > 0.0 or (len(adapters) > 1 and any(a.dropout_p > 0.0 for a in adapters)):
        return draw_seeds(len(adapters), x.device)
    return _unused_seeds(len(adapters), x.device)


def _unused_seeds(count: int, device: torch.device) -> Tensor:
    """Seeds for a call without dropout: never read (nor written) by the kernels. On a CPU one kept tensor per count
    serves every call (making one is ~2 µs of a ~100 µs one-token call); elsewhere, and in a compiled trace, one per
    call (a kept device tensor would sit above PEFT's peak; an empty allocation is a pool lookup)."""
    if device.type == "cpu" and not graph.is_compiling():
        seeds = _CPU_UNUSED_SEEDS.get(count)
        if seeds is None:
            seeds = _CPU_UNUSED_SEEDS[count] = lasting(lambda: torch.zeros(count, dtype=torch.int64))
        return seeds
    return torch.empty(count, dtype=torch.int64, device=device)


_CPU_UNUSED_SEEDS: dict[int, Tensor] = {}


def lora_linear(x: Tensor, base: BaseWeight, adapters: Sequence[Adapter], backend: str) -> Tensor:
    """The fused LoRA linear on x[..., K] (already in the compute dtype); returns [..., N] in x's dtype.

    Usage::

        y = lora_linear(x, BaseWeight(w, b, w.shape[0]), [Adapter(a, b_, 2.0, 0.0)], "torch")
    """
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    seeds = _seeds(adapters, x)
    if len(adapters) == 1 and (path := graph.path(x2d, base, adapters[0], backend, _function_call)) != "function":
        if _GRAPH_FALLBACKS and _graph_key(path, x2d, base, backend) in _GRAPH_FALLBACKS:
            y = _on_function(x2d, base, adapters, backend, seeds)
        else:
            try:  # free when nothing raises (Python 3.11 exception tables)
                y = graph.run(path, x2d, base, adapters[0], seeds)
            except tuning.guard.NOT_LAUNCH_ERRORS:
                raise
            except Exception as err:  # noqa: BLE001 - a graph that cannot launch: fastlora's Function takes over
                y = _graph_failed(err, path, x2d, base, adapters, backend, seeds)
    else:
        y = _on_function(x2d, base, adapters, backend, seeds)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], base.out_features)


def bound_call(x: Tensor, base: BaseWeight, adapters: Sequence[Adapter], backend: str) -> Optional[Callable[[Tensor], Tensor]]:
    """:func:`lora_linear` as one closure over the layer's arguments, for later calls on an x like this one, where this
    call runs on a native graph (:func:`fastlora.functions.graph.bind`); None otherwise. Made right after such a call
    (its graph is decided then). The caller reuses it only while the layer's plan holds and for an x of this shape,
    dtype, device, contiguity and ``requires_grad``, under the same inference mode and adapters' ``requires_grad``
    (what the graph choice reads). Each call draws its dropout seed, as :func:`lora_linear` does.

    Usage::

        y = lora_linear(x, base, adapters, "cpp")
        call = bound_call(x, base, adapters, "cpp")   # then, for the next x like it:  y = call(x)
    """
    if len(adapters) != 1 or not x.is_contiguous() or graph.is_compiling():
        return None
    adapter = adapters[0]
    k, dropout = x.shape[-1], adapter.dropout_p > 0.0
    x2d = x if x.dim() == 2 else x.view(-1, k)
    path = graph.path(x2d, base, adapter, backend, _function_call)
    layer = graph.bind(path, base, adapter)
    if layer is None or (_GRAPH_FALLBACKS and _graph_key(path, x2d, base, backend) in _GRAPH_FALLBACKS):
        return None
    device, unused = x.device, None if dropout else _unused_seeds(1, x.device)
    seeds = (lambda: draw_seeds(1, device)) if dropout else (lambda: unused)
    if x.dim() == 2:
        return lambda x: layer(x, seeds())
    out_shape = (*x.shape[:-1], base.out_features)
    return lambda x: layer(x.view(-1, k), seeds()).view(out_shape)


#: Layer graphs (fastlora.functions.graph) that failed to launch, per (graph, backend, dtypes, K, N): fastlora's Function
#: (the tuned ops, each with its own guarded first launch) runs those calls instead.
_GRAPH_FALLBACKS: set[tuple] = tuning.guard.forgotten_on_reset(set())


def _graph_key(path: str, x2d: Tensor, base: BaseWeight, backend: str) -> tuple:
    return path, backend, x2d.dtype, base.weight.dtype, x2d.shape[1], base.out_features


def _graph_failed(err: Exception, path: str, x2d: Tensor, base: BaseWeight, adapters, backend: str, seeds: Tensor) -> Tensor:
    """The call of a layer graph that raised, on fastlora's Function instead; the graph is left for that key (reported
    as a :class:`fastlora.tuning.LaunchFallback`). An error the Function raises too propagates as the graph's."""
    try:
        y = _on_function(x2d, base, adapters, backend, seeds)
    except tuning.guard.NOT_LAUNCH_ERRORS:
        raise
    except Exception:  # noqa: BLE001 - the input is at fault, not the graph
        raise err from None
    key = _graph_key(path, x2d, base, backend)
    _GRAPH_FALLBACKS.add(key)
    text = f"m{x2d.shape[0]}|n{key[5]}|k{key[4]}|{tuning.dtype_name(x2d.dtype)}|{tuning.dtype_name(base.weight.dtype)}"
    tuning.guard.record(tuning.LaunchFallback(backend, "lora_layer", text, path, "function", tuning.guard.reason_of(err)))
    return y


def _on_function(x2d: Tensor, base: BaseWeight, adapters: Sequence[Adapter], backend: str, seeds: Tensor) -> Tensor:
    """The call on :class:`LoRALinearFunction` (DoRA on its own Function), or its ops alone when no graph is needed."""
    if adapters[0].dora is not None:  # the plan fuses DoRA only as the one active adapter
        return dora_linear(x2d, base, adapters[0], seeds, backend)
    if len(adapters) == 1:  # the common case without the generator expressions below: this runs on every call
        one = adapters[0]
        adapter_tensors = [one.lora_a, one.lora_b]
        config = _Config(base.blocksize, (one.lora_a.shape[0],), (one.scale,), (one.dropout_p,), backend, base.nested)
        has_lora_bias = one.lora_bias is not None
    else:
        adapter_tensors = [t for a in adapters for t in (a.lora_a, a.lora_b)]
        config = _Config(base.blocksize, tuple(a.lora_a.shape[0] for a in adapters), tuple(a.scale for a in adapters),
                         tuple(a.dropout_p for a in adapters), backend, base.nested)  # fmt: skip
        has_lora_bias = any(a.lora_bias is not None for a in adapters)
    bias = _with_lora_biases(base.bias, adapters) if has_lora_bias else base.bias
    row_mask = None if adapters[0].rows is None else _row_mask(adapters, x2d.shape[0])
    if _needs_graph(x2d, bias, adapter_tensors):
        return LoRALinearFunction.apply(x2d, base.weight, base.absmax, bias, seeds, row_mask, config, *adapter_tensors)
    # Inference (no_grad, or nothing trainable): the ops alone, with no autograd node to build or save for; at decode
    # sizes the NF4 absmax resolved once per weight and kept (fastlora.functions.nf4_weight.resolve_absmax).
    absmax = base.absmax
    if config.nested is not None:
        keep = x2d.shape[0] <= KEEP_UP_TO_TOKENS
        absmax, config = resolve_absmax(absmax, config.nested, backend, keep), config._replace(nested=None)
    return _forward(x2d, base.weight, absmax, bias, seeds, row_mask, config, adapter_tensors)[0]


def _function_call(x2d: Tensor, base: BaseWeight, adapter: Adapter, backend: str) -> Tensor:
    """One plain adapter's call the fastlora way: the "function" candidate of :func:`fastlora.functions.graph.path`."""
    return _on_function(x2d, base, [adapter], backend, _seeds([adapter], x2d))


def _with_lora_biases(bias: Optional[Tensor], adapters: Sequence[Adapter]) -> Tensor:
    """The fused bias term with ``lora_bias=True``: b + Σ_a s_a·b_a in fp32 (PEFT adds B's bias, scaled, in the
    adapter dtype). Built with torch ops on [N] vectors, so autograd routes the op's bias gradient to every b_a."""
    total = sum(a.lora_bias.float() * a.scale for a in adapters if a.lora_bias is not None)
    return total if bias is None else total + bias.float()


def _row_mask(adapters: Sequence[Adapter], m: int) -> Tensor:
    """fp32 [M, R]: 1.0 where row m of the flattened x uses the adapter owning column r (``Adapter.rows`` is per
    row of x's leading dimension; each spans M / leading rows of the flattened x)."""
    # Repeats given as Python ints: repeat_interleave with a tensor of repeats reads it back to size its output,
    # a host sync per layer call on a GPU.
    per_row = torch.cat([a.rows[:, None].expand(-1, a.lora_a.shape[0]) for a in adapters], dim=1)  # [rows, R]
    return per_row.repeat_interleave(m // per_row.shape[0], dim=0)


def _tuning_layer_call(backend: str, x, dy, weight, absmax, blocksize: int, lora_a, lora_b, dropout_p: float) -> None:
    """One training call of a LoRA layer as a patched model makes it (``fastlora tune``): its graph is chosen here."""
    base = BaseWeight(weight, None, lora_b.shape[0], absmax, blocksize)
    adapter = Adapter(lora_a.detach().requires_grad_(), lora_b.detach().requires_grad_(), 2.0, dropout_p)
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        y = lora_linear(x, base, [adapter], backend)
        torch.autograd.grad(y, [x, adapter.lora_a, adapter.lora_b], dy)


tuning.ahead.register_layer_call(_tuning_layer_call)
