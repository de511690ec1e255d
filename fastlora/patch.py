"""Put the fused LoRA linear inside PEFT models: ``patch`` swaps the forward of each supported LoRA layer
instance, ``unpatch`` restores it.

Nothing is registered on the layers (no parameter, buffer or submodule; nothing renamed), so adapter files
and ``state_dict`` keys are unchanged. The swapped forward re-checks the layer on every call (adapters
disabled or merged, ``adapter_names``, LoRA variants, ...) and runs PEFT's own forward for what it cannot
fuse, counting the reason in the :class:`PatchReport`.

Usage::

    model = get_peft_model(model, LoraConfig(...))
    report = fastlora.patch(model)          # or backend="torch" | "triton" | "cpp"
    print(report)
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from fastlora import backends
from fastlora.autograd import Adapter, BaseWeight, lora_linear
from fastlora.nf4 import NF4Weight, UnsupportedQuantization

logger = logging.getLogger("fastlora")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _lora_classes():
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora import Linear as LoraLinear

    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    except ImportError:  # bitsandbytes missing: no 4-bit layers can exist either
        LoraLinear4bit = None
    return LoraLayer, LoraLinear, LoraLinear4bit


@functools.lru_cache(maxsize=1)
def _bnb_4bit_classes() -> tuple[type, type] | None:
    """bitsandbytes' (Params4bit, Linear4bit), or None without bitsandbytes; looked up once (every call asks)."""
    try:
        from bitsandbytes.nn import Linear4bit, Params4bit
    except ImportError:
        return None
    return Params4bit, Linear4bit


def _is_params4bit(weight) -> bool:
    classes = _bnb_4bit_classes()
    return classes is not None and isinstance(weight, classes[0])


def _is_sharded_4bit(base: nn.Module) -> bool:
    """A bitsandbytes Linear4bit whose weight FSDP replaced by a plain tensor or DTensor (sharded at rest, a
    plain gathered tensor inside forward). bitsandbytes keeps the quant state on the module for this case."""
    classes = _bnb_4bit_classes()
    return (
        classes is not None
        and isinstance(base, classes[1])
        and not isinstance(base.weight, classes[0])
        and base.quant_state is not None
    )


@dataclass
class PatchReport:
    """What :func:`patch` did: fused layers with their backend, layers left on PEFT with the reason, and
    (updated live) how many calls of fused layers fell back to PEFT's forward, by reason.

    Usage::

        report = fastlora.patch(model); print(report); report.skipped   # {"name": "reason"}
    """

    requested_backend: str
    patched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    already_patched: dict[str, str] = field(default_factory=dict)
    fallback_calls: Counter = field(default_factory=Counter)
    fused_calls: int = 0

    @property
    def changed(self) -> bool:
        """Whether this call patched anything (False for a repeated ``patch``)."""
        return bool(self.patched)

    def __str__(self) -> str:
        parts = []
        if self.patched:
            per_backend = Counter(self.patched.values())
            parts.append(f"{len(self.patched)} LoRA layers fused ({_counts(per_backend)})")
        if self.already_patched:
            parts.append(f"{len(self.already_patched)} already patched, left as they were (nothing changed)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} left on PEFT ({_counts(Counter(self.skipped.values()))})")
        if self.fallback_calls:
            parts.append(f"calls run by PEFT since: {_counts(self.fallback_calls)}")
        return "fastlora: " + ("; ".join(parts) if parts else "no LoRA layers")


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key}: {n}" for key, n in counter.most_common())


class FusedForward:
    """The forward installed on one LoRA layer instance. Holds what ``unpatch`` needs to restore it."""

    def __init__(self, layer: nn.Module, name: str, backend: str, report: PatchReport, previous: Optional[Callable]):
        self.layer = layer
        self.name = name
        self.backend = backend
        self.device_type = _layer_device(layer).type
        self.report = report
        # An instance-level forward that was there before (e.g. an accelerate hook); None means the class's.
        self.previous = previous
        self._warned: set[str] = set()

    def original(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = _call_plan(self.layer, self.device_type, x, args, kwargs)
        # torch.compile guards on Python ints it reads, so counting inside a compiled region would recompile the
        # graph on every call; calls there go uncounted (the plan above is still decided on every trace).
        counting = not torch.compiler.is_compiling()
        if isinstance(plan, str):
            if counting:
                self.report.fallback_calls[plan] += 1
                if plan not in self._warned:
                    self._warned.add(plan)
                    logger.warning("fastlora: %s runs PEFT's forward: %s", self.name, plan)
            return self.original(x, *args, **kwargs)
        x_compute, base, adapters, out_dtype = plan
        if counting:
            self.report.fused_calls += 1
        if torch.is_autocast_enabled(x.device.type):
            # The plan already applied autocast's dtype; the ops' internal matmuls must not be recast.
            with torch.autocast(x.device.type, enabled=False):
                y = lora_linear(x_compute, base, adapters, self.backend)
        else:
            y = lora_linear(x_compute, base, adapters, self.backend)
        return y if y.dtype == out_dtype else y.to(out_dtype)


def _layer_device(layer: nn.Module) -> torch.device:
    return _base_layer(layer).weight.device


def _base_layer(layer: nn.Module) -> nn.Module:
    """PEFT's ``get_base_layer()`` without its ``hasattr`` probes, which go through ``nn.Module.__getattr__``
    and raise inside (microseconds per call, on every forward)."""
    base = layer
    child = base._modules.get("base_layer")
    while child is not None:
        base, child = child, child._modules.get("base_layer")
    return base


def _param(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``module.<name>`` straight from ``_parameters`` when registered there (FSDP2 swaps its unsharded
    parameters in there too), else the attribute (e.g. a parametrized weight): no ``nn.Module.__getattr__``."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def _structural_reason(layer: nn.Module) -> Optional[str]:
    """Why this LoRA layer can never take the fused path (checked at patch time), or None."""
    _, LoraLinear, LoraLinear4bit = _lora_classes()
    if type(layer) not in (LoraLinear, LoraLinear4bit):
        return f"unsupported LoRA layer type {type(layer).__name__}"
    base = _base_layer(layer)
    # bitsandbytes layers subclass nn.Linear: dispatch on the weight's class, not the module's.
    if _is_params4bit(base.weight):
        try:
            NF4Weight.from_params4bit(base.weight)
        except UnsupportedQuantization as err:
            return f"4-bit {err}"
    elif _is_sharded_4bit(base):
        pass  # the quant state is checked on each call, against the weight FSDP gathers then
    elif type(layer) is LoraLinear4bit:
        return f"4-bit base weight of type {type(base.weight).__name__}"
    elif type(base) is not nn.Linear:
        return f"base layer type {type(base).__name__}"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if base.weight.device.type == "meta":
        return "weights on the meta device"
    return None


def _call_plan(layer, device_type: str, x: torch.Tensor, args, kwargs):
    """Inputs for the fused path, or the reason (a string) to run PEFT's forward for this call."""
    if kwargs.get("adapter_names") is not None:
        return "adapter_names mixed batch"
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapters merged"
    if x.device.type != device_type:
        return f"input on {x.device.type}, layer patched for {device_type}"
    if x.dtype not in _FLOAT_DTYPES:
        return f"input dtype {x.dtype}"
    if not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled"
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    # Submodules straight from _modules: this runs on every call, and nn.Module.__getattr__ is slow.
    submodules = layer._modules
    lora_A, lora_B, lora_dropout = submodules["lora_A"], submodules["lora_B"], submodules["lora_dropout"]
    active = [a for a in layer.active_adapters if a in lora_A]
    if not active:
        return "no active adapter on this layer"
    variants = getattr(layer, "lora_variant", {})
    adapters = []
    for name in active:
        if name in variants or layer.use_dora.get(name, False):
            return "LoRA variant (DoRA or other)"
        lora_a, lora_b = lora_A._modules[name], lora_B._modules[name]
        if _param(lora_b, "bias") is not None or _param(lora_a, "bias") is not None:
            return "lora_bias"
        dropout = lora_dropout._modules[name]
        if isinstance(dropout, nn.Dropout):
            p = float(dropout.p) if dropout.training else 0.0
        elif isinstance(dropout, nn.Identity):
            p = 0.0
        else:
            return f"dropout module {type(dropout).__name__}"
        if not 0.0 <= p < 1.0:
            return f"dropout p={p}"
        adapters.append(Adapter(_param(lora_a, "weight"), _param(lora_b, "weight"), float(layer.scaling[name]), p))

    base_layer = _base_layer(layer)
    weight = _param(base_layer, "weight")
    if weight.requires_grad:
        return "base weight requires grad"
    if type(base_layer) is nn.Linear:  # the common dense case, without the 4-bit class checks
        return _dense_plan(base_layer, weight, x, adapters)
    if _is_params4bit(weight):
        return _nf4_plan(base_layer, weight, x, adapters, sharded=False)
    if _is_sharded_4bit(base_layer):
        return _nf4_plan(base_layer, weight, x, adapters, sharded=True)
    return _dense_plan(base_layer, weight, x, adapters)


def _dense_plan(base_layer: nn.Linear, weight: torch.Tensor, x: torch.Tensor, adapters):
    bias = _param(base_layer, "bias")
    if torch.is_autocast_enabled(x.device.type):
        # What autocast would do to F.linear: run it in the autocast dtype.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif x.dtype != weight.dtype:
        return f"input dtype {x.dtype} differs from base weight dtype {weight.dtype}"
    if weight.dtype not in _FLOAT_DTYPES:
        return f"base weight dtype {weight.dtype}"
    return x, BaseWeight(weight, bias, weight.shape[0]), adapters, x.dtype


def _nf4_plan(base_layer, weight: torch.Tensor, x: torch.Tensor, adapters, sharded: bool):
    if sharded:
        # FSDP gathered the packed weight into a plain tensor that lost its quant state: re-attach the module's
        # state exactly as bitsandbytes' own forward does, so we read the gathered weight, never a shard.
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base_layer)
        weight = _param(base_layer, "weight")  # it may have wrapped the weight in a new Params4bit
    try:
        nf4 = NF4Weight.from_params4bit(weight)
    except UnsupportedQuantization as err:
        return f"4-bit {err}"
    # bitsandbytes' Linear4bit picks its compute dtype from the first input it sees; do the same.
    if not base_layer.compute_type_is_set:
        base_layer.set_compute_type(x)
        base_layer.compute_type_is_set = True
    dtype = base_layer.compute_dtype or x.dtype
    if dtype not in _FLOAT_DTYPES:
        return f"4-bit compute dtype {dtype}"
    bias = _param(base_layer, "bias")
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    base = BaseWeight(nf4.packed, bias, nf4.shape[0], nf4.absmax, nf4.blocksize)
    return (x if x.dtype == dtype else x.to(dtype)), base, adapters, x.dtype


def _lora_layers(model: nn.Module):
    LoraLayer, _, _ = _lora_classes()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def patch(model: nn.Module, *, backend: str = "auto") -> PatchReport:
    """Fuse every supported PEFT LoRA layer of ``model`` in place; returns what was done.

    ``backend``: "auto" (best per device; the ``FASTLORA_BACKEND`` environment variable overrides it),
    "torch" (reference), "triton" (CUDA, or CPU under ``TRITON_INTERPRET=1``) or "cpp" (CPU). An unknown or
    unavailable backend raises before anything changes; so does a model without PEFT LoRA layers.

    Usage::

        report = fastlora.patch(model)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlora.patch expects a torch.nn.Module, got {type(model).__name__}")
    if backend != "auto" and backend not in backends.NAMES:
        raise ValueError(backends.unavailable_reason(backend, "cpu"))
    layers = _lora_layers(model)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} holds no PEFT LoRA layers: call peft.get_peft_model(model, LoraConfig(...)) first"
        )

    report = PatchReport(requested_backend=backend)
    plan = []
    for name, layer in layers:
        current = layer.__dict__.get("forward")
        if isinstance(current, FusedForward):
            report.already_patched[name] = current.backend
            continue
        reason = _structural_reason(layer)
        if reason is not None:
            report.skipped[name] = reason
            continue
        # Raises BackendUnavailable for an explicit backend that cannot serve this layer's device.
        plan.append((name, layer, backends.resolve(backend, _layer_device(layer)), current))
    # Availability of "auto" picks can fail late (e.g. the C++ build); resolve() already checked them all.

    applied = []
    try:
        for name, layer, chosen, previous in plan:
            layer.forward = FusedForward(layer, name, chosen, report, previous)
            applied.append(layer)
            report.patched[name] = chosen
    except BaseException:
        for layer in applied:
            _restore(layer)
        raise

    if report.skipped:
        logger.warning(str(report))
    else:
        logger.info(str(report))
    return report


def _restore(layer: nn.Module) -> None:
    fused = layer.__dict__.get("forward")
    if fused.previous is not None:
        layer.forward = fused.previous
    else:
        del layer.forward


def unpatch(model: nn.Module) -> int:
    """Restore the original forward of every layer :func:`patch` changed; returns how many.

    Usage::

        fastlora.unpatch(model)
    """
    restored = 0
    for _, module in model.named_modules():
        if isinstance(module.__dict__.get("forward"), FusedForward):
            _restore(module)
            restored += 1
    return restored


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a LoRA layer) currently runs fastlora's forward."""
    return isinstance(module.__dict__.get("forward"), FusedForward)
