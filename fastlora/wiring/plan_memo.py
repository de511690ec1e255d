"""A patched layer's last plan, reused while everything it was read from is unchanged.

:func:`fastlora.wiring.plan.call_plan` reads some thirty attributes across the LoRA layer, its adapter modules and the
base (PEFT's properties, type checks, the NF4 quant state) and builds the op's arguments. At a few tokens, with the
caches cold from the layers that ran before, that is a large part of a layer call: about 25 µs of 87 on the 2-core
Xeon measured (dense 1536→512, one token, forward). A :class:`PlanMemo` records, for plain LoRA (one or several
active adapters, each with or without ``lora_bias``; no DoRA, no ``adapter_names``, no autocast), the objects and
values the plan was built from; a later call re-reads only those, by identity and value, and reuses the plan when all
hold. Anything else runs ``call_plan`` again.

Watched: the layer's adapter state (``_active_adapter``, ``_disable_adapters``, ``merged_adapters``, ``training``,
``scaling``, ``lora_variant``, ``cast_input_dtype_enabled``) and submodules; each active adapter's A, B and dropout
modules, their parameters, the dropout's ``p`` and ``training``; the base module, its weight and bias (identity, dtype,
``requires_grad``, version counter and data pointer, so ``.data`` swaps, ``.to()`` and in-place rewrites miss) and
what the base kind adds (NF4: the quant state and :func:`fastlora.functions.nf4_weight.cache_key`, compute dtype; 8-bit: the SCB scales);
x's dtype and device; and, for a plan holding a tensor made under inference mode, that inference mode is on.

Usage::

    memo = PlanMemo.capture(layer, "cpu", x, plan)     # None when this plan is not reusable
    plan = memo.plan(x) if memo is not None and memo.holds(x) else call_plan(...)
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastlora.functions import graph
from fastlora.functions.lora import bound_call
from fastlora.functions.nf4_weight import cache_key as nf4_cache_key

_MISSING = object()
#: :meth:`PlanMemo.bound` for a call key not bound yet.
UNBOUND = object()
#: Call keys (x shapes, mostly) a plan keeps bound calls for: a model's few fixed shapes, or the last ones seen.
BOUND_KEYS = 8
_plain_tensors = torch._C.DisableTorchFunctionSubclass


def _tensor_state(t: Optional[Tensor]) -> tuple:
    """What a plan derived from ``t`` depends on beyond its identity: dtype, ``requires_grad``, and the version
    counter and data pointer (an in-place rewrite, a ``.data`` swap or a move)."""
    return () if t is None else (t.dtype, t.requires_grad, t._version, t.data_ptr())


class PlanMemo:
    """The layer-dependent part of one plan (base, adapters, compute dtype) and the state it was read from."""

    __slots__ = (
        "_same", "_equal", "_tensors", "_nf4_weight", "_nf4_key", "_x_dtype", "_on_device", "_base", "_adapters",
        "_compute_dtype", "_out_dtype", "_inference_only", "_calls", "_calls_decided",
    )  # fmt: skip

    def __init__(self, same, equal, tensors, nf4_weight: Optional[Tensor], x: Tensor, device_type: str, plan) -> None:
        self._same = same  # (dict, key, object): dict[key] must be that very object
        self._equal = equal  # (dict, key, value): dict[key] must equal value
        self._tensors = tensors  # (tensor, _tensor_state(tensor) then)
        # An NF4 base's Params4bit and its fastlora.functions.nf4_weight.cache_key then (the resolved absmax depends on it)
        self._nf4_weight = nf4_weight
        self._nf4_key = None if nf4_weight is None else nf4_cache_key(nf4_weight)
        self._x_dtype = x.dtype
        # x.is_cpu / x.is_cuda read a flag; x.device builds an object
        self._on_device = {"cpu": "is_cpu", "cuda": "is_cuda"}.get(device_type)
        x_compute, self._base, self._adapters, self._out_dtype = plan
        self._compute_dtype = x_compute.dtype
        # A tensor the plan made under inference mode (e.g. the bias cast to the compute dtype) serves only calls in
        # inference mode: a call with autograd on could not save it for backward.
        base = self._base
        self._inference_only = torch.is_inference_mode_enabled() and any(
            t is not None and t.is_inference() for t in (base.weight, base.bias, base.absmax)
        )
        # The plan's call bound for the next x like a past one (fastlora.functions.lora.bound_call), per call_key;
        # None where the call does not bind (it runs lora_linear). Only for x already in the compute and output dtype.
        # Valid while the graph decisions they were bound under are the current ones (tuning.reset, tuning.forced
        # and FASTLORA_PATH swap them).
        binds = graph.native_on(device_type) and len(self._adapters) == 1 and x.dtype is self._compute_dtype is self._out_dtype
        self._calls: Optional[dict] = {} if binds else None
        self._calls_decided = graph.decided()

    @classmethod
    def capture(cls, layer: nn.Module, device_type: str, x: Tensor, plan) -> Optional["PlanMemo"]:
        """A memo of ``plan`` (just built by ``call_plan`` for ``x``), or None when it is not of the reusable kind."""
        x_compute, base, adapters, _ = plan
        if any(adapter.rows is not None or adapter.dora is not None for adapter in adapters):
            return None
        if torch.is_autocast_enabled(device_type) or device_type not in ("cpu", "cuda"):
            return None
        state, modules = layer.__dict__, layer._modules
        names = _active_names(state.get("_active_adapter"))
        if names is None or len(names) != len(adapters):
            return None  # an active adapter this layer lacks: the plan skipped it, and watching absence costs more
        base_module = modules["base_layer"]
        weight = base_module._parameters.get("weight")
        if not _holds_weight_itself(base, weight):
            return None  # e.g. a Conv1D's transposed view, an FSDP-gathered copy: cheap to rebuild, hard to watch
        same = [
            (state, "_active_adapter", state["_active_adapter"]),
            (state, "scaling", state["scaling"]),
            (state, "lora_variant", state.get("lora_variant", _MISSING)),
            (modules, "base_layer", base_module),
            (modules, "lora_A", modules["lora_A"]),
            (modules, "lora_B", modules["lora_B"]),
            (modules, "lora_dropout", modules["lora_dropout"]),
            (base_module._parameters, "weight", weight),
            (base_module._parameters, "bias", base_module._parameters.get("bias")),
        ]
        equal = [
            (state, "_active_adapter", _copy(state["_active_adapter"])),  # a list may be changed in place
            (state, "_disable_adapters", state.get("_disable_adapters", _MISSING)),
            (state, "merged_adapters", _copy(state.get("merged_adapters", _MISSING))),
            (state, "training", state["training"]),
            (state, "cast_input_dtype_enabled", state.get("cast_input_dtype_enabled", _MISSING)),
            (base_module.__dict__, "compute_dtype", base_module.__dict__.get("compute_dtype", _MISSING)),
        ]
        for name in names:
            lora_a, lora_b = modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
            dropout = modules["lora_dropout"]._modules[name]
            same += [
                (modules["lora_A"]._modules, name, lora_a),
                (modules["lora_B"]._modules, name, lora_b),
                (modules["lora_dropout"]._modules, name, dropout),
                (lora_a._parameters, "weight", lora_a._parameters.get("weight")),
                (lora_a._parameters, "bias", lora_a._parameters.get("bias")),
                (lora_b._parameters, "weight", lora_b._parameters.get("weight")),
                (lora_b._parameters, "bias", lora_b._parameters.get("bias")),
            ]
            equal += [
                (state["scaling"], name, state["scaling"][name]),
                (state.get("lora_variant", {}), name, state.get("lora_variant", {}).get(name, _MISSING)),
                (dropout.__dict__, "p", dropout.__dict__.get("p", _MISSING)),
                (dropout.__dict__, "training", dropout.__dict__["training"]),
            ]
        bias = base_module._parameters.get("bias")
        tensors = [(weight, _tensor_state(weight)), (bias, _tensor_state(bias))]
        quant_state = weight.__dict__.get("quant_state")
        if quant_state is not None:  # NF4: the resolved absmax came from the quant state
            same.append((weight.__dict__, "quant_state", quant_state))
        matmul_state = base_module.__dict__.get("state")
        if base.blocksize == 0 and base.absmax is not None:  # bitsandbytes 8-bit: SCB on the layer's state or the weight
            same.append((matmul_state.__dict__, "SCB", matmul_state.__dict__.get("SCB")))
            same.append((weight.__dict__, "SCB", weight.__dict__.get("SCB")))
        nf4_weight = weight if quant_state is not None else None
        return cls(same, equal, tensors, nf4_weight, x, device_type, plan)

    def holds(self, x: Tensor) -> bool:
        """Whether the plan still answers a call on ``x`` (no other arguments and autocast off: the caller checks)."""
        if x.dtype is not self._x_dtype or not getattr(x, self._on_device):
            return False
        if self._inference_only and not torch.is_inference_mode_enabled():
            return False
        for owner, key, obj in self._same:
            if owner.get(key, _MISSING) is not obj:
                return False
        for owner, key, value in self._equal:
            if owner.get(key, _MISSING) != value:
                return False
        # bitsandbytes' parameter classes override __torch_function__, which makes every attribute read ~1 µs
        with _plain_tensors():
            for tensor, state in self._tensors:
                if tensor is not None and _tensor_state(tensor) != state:
                    return False
            return self._nf4_weight is None or nf4_cache_key(self._nf4_weight) == self._nf4_key

    def call_key(self, x: Tensor) -> Optional[tuple]:
        """What a bound call of this plan is valid for beyond :meth:`holds`: x's shape, contiguity and
        ``requires_grad``, inference mode, and the adapter weights' ``requires_grad`` and dtypes (the graph choice
        reads them; a ``.data`` swap can change a dtype under the same parameter); None when this plan's calls do
        not bind."""
        if self._calls is None:
            return None
        lora_a, lora_b = self._adapters[0].lora_a, self._adapters[0].lora_b
        return (x.shape, x.is_contiguous(), x.requires_grad, torch.is_inference_mode_enabled(), lora_a.requires_grad,
                lora_b.requires_grad, lora_a.dtype, lora_b.dtype)  # fmt: skip

    def bound(self, key: tuple):
        """The bound call kept for ``key`` (see :meth:`call_key`); None where such calls do not bind; :data:`UNBOUND`
        before :meth:`bind` ran for it. Usage: ``call = memo.bound(key)``"""
        if graph.decided() is not self._calls_decided:
            self._calls, self._calls_decided = {}, graph.decided()
        return self._calls.get(key, UNBOUND)

    def bind(self, key: tuple, x: Tensor, backend: str) -> None:
        """Keep the plan's bound call (or None: it does not bind) for calls like ``x``, just run (its graph is decided
        then); the oldest of :data:`BOUND_KEYS` goes first (variable sequence lengths must not grow a layer's state
        without end). Usage: ``memo.bind(key, x, "cpp")``"""
        if len(self._calls) >= BOUND_KEYS:
            del self._calls[next(iter(self._calls))]
        self._calls[key] = bound_call(x, self._base, self._adapters, backend)

    def unbind(self, key: tuple) -> None:
        """Calls like this run unbound from now on (their bound call raised: ``lora_linear`` reports or falls back)."""
        self._calls[key] = None

    def plan(self, x: Tensor):
        """The memoized plan for a call on ``x`` (converted to the compute dtype, as ``call_plan`` does)."""
        x_compute = x if x.dtype is self._compute_dtype else x.to(self._compute_dtype)
        return x_compute, self._base, self._adapters, self._out_dtype


def _copy(value):
    """A list's copy (compared by value later: PEFT appends to and pops from ``merged_adapters`` in place)."""
    return list(value) if isinstance(value, list) else value


def _active_names(active) -> Optional[list]:
    """The active adapters' names as a list (PEFT keeps one name as a str), or None for anything else."""
    if isinstance(active, str):
        return [active]
    if isinstance(active, (list, tuple)) and active and all(isinstance(name, str) for name in active):
        return list(active)
    return None


def _holds_weight_itself(base, weight: Optional[Tensor]) -> bool:
    """Whether the plan's base reads the module's weight parameter itself (or, for NF4, its bytes): not a view or
    copy made for this call that a later call would have to make again."""
    if weight is None:
        return False
    if base.weight is weight:
        return True
    # NF4: the packed codes are the Params4bit's storage, viewed as bytes
    return base.absmax is not None and base.weight.data_ptr() == weight.data_ptr() and weight.__dict__.get("quant_state") is not None
