"""What each LoRA layer call can run fused: the per-layer check made once at patch time and the per-call plan.

:func:`structural_reason` says why a LoRA layer can never take the fused path (checked by ``patch``);
:func:`call_plan` turns one call's inputs into the fused op's arguments, or into the reason (a string) to run
PEFT's own forward for this call. Both read the layer the way PEFT does on every call: active adapters, scaling,
dropout, merged/disabled state.

A layer is fused only when its ``base_layer`` is itself a plain base (a dense ``nn.Linear``, a GPT-2 ``Conv1D``
whose W [K, N] is read through its transposed view, or a bitsandbytes NF4 or 8-bit linear): anything in
between, such as another tuner's layer in a mixed PEFT model (LoRA over LoHa), adds its own output that the fused
op would drop.

Usage::

    reason = plan.structural_reason(layer)             # None: patchable
    step = plan.call_plan(layer, "cpu", x, (), {})     # tuple of op inputs, or a reason string
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from fastlora.functions.dora import DoRA
from fastlora.functions.lora import Adapter, BaseWeight
from fastlora.functions.nf4_weight import NF4Weight, UnsupportedQuantization

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def lora_classes():
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


@functools.lru_cache(maxsize=1)
def _bnb_8bit_classes() -> tuple[type, type] | None:
    """bitsandbytes' ``Linear8bitLt`` and PEFT's ``lora.bnb.Linear8bitLt``, or None without bitsandbytes."""
    try:
        from bitsandbytes.nn import Linear8bitLt
        from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt
    except ImportError:
        return None
    return Linear8bitLt, LoraLinear8bitLt


@functools.lru_cache(maxsize=1)
def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2 and relatives: W stored [K, N]), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


@functools.lru_cache(maxsize=1)
def _dora_variant_class() -> type:
    """PEFT's DoRA variant of ``lora.Linear``, the one LoRA variant fused (looked up once: every call asks)."""
    from peft.tuners.lora.variants import DoraLinearVariant

    return DoraLinearVariant


def _is_int8_base(base: nn.Module) -> bool:
    classes = _bnb_8bit_classes()
    return classes is not None and type(base) is classes[0]


def _int8_scales(base: nn.Module, weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The per-row SCB of a bitsandbytes 8-bit weight: on the weight until its first forward, then on the
    layer's matmul state (bitsandbytes moves it there); PEFT's ``dequantize_bnb_weight`` reads it the same way."""
    scb = base.state.SCB
    return scb if scb is not None else getattr(weight, "SCB", None)


def _int8_reason(base: nn.Module, weight: torch.Tensor) -> Optional[str]:
    """Why this bitsandbytes 8-bit layer cannot be fused (its weight is not int8 codes with per-row scales), or None."""
    if weight.dtype != torch.int8:
        return f"8-bit base weight of dtype {weight.dtype} (has_fp16_weights or not quantized yet)"
    if weight.dim() != 2:
        return f"8-bit base weight of shape {tuple(weight.shape)} is not a matrix"
    scb = _int8_scales(base, weight)
    if scb is None or scb.numel() != weight.shape[0]:
        return "8-bit base weight without one SCB scale per row"
    return None


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


def layer_device(layer: nn.Module) -> torch.device:
    """The device of the LoRA layer's base weight (where its calls run)."""
    return base_layer(layer).weight.device


def base_layer(layer: nn.Module) -> nn.Module:
    """The LoRA layer's own ``base_layer``, straight from ``_modules`` (``nn.Module.__getattr__`` costs
    microseconds on every call). Not PEFT's ``get_base_layer()``, which walks down a chain of tuner layers to the
    innermost module: the fused op replaces exactly what this layer's base computes, so it must not look past it."""
    return layer._modules["base_layer"]


#: Display names of PEFT tuner packages (``peft.tuners.<package>``), for fallback reasons.
_TUNER_NAMES = {"loha": "LoHa", "lokr": "LoKr", "adalora": "AdaLoRA", "ia3": "IA³", "lora": "LoRA", "oft": "OFT", "boft": "BOFT"}


def _tuner_layer_name(module: nn.Module) -> Optional[str]:
    """A name for ``module`` when it is a PEFT adapter layer (LoHa, LoKr, IA³, another LoRA, ...) or any other
    module wrapping a ``base_layer`` of its own, e.g. "LoHa (peft.tuners.loha.layer.Linear)"; None for a plain module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not (isinstance(module, BaseTunerLayer) or "base_layer" in module._modules):
        return None
    cls = type(module)
    parts = cls.__module__.split(".")
    package = parts[parts.index("tuners") + 1] if "tuners" in parts[:-1] else None
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    return f"{_TUNER_NAMES.get(package, package)} ({qualified})" if package else qualified


def _param(module: nn.Module, name: str) -> Optional[torch.Tensor]:
    """``module.<name>`` straight from ``_parameters`` when registered there (FSDP2 swaps its unsharded
    parameters in there too), else the attribute (e.g. a parametrized weight): no ``nn.Module.__getattr__``."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name)


def structural_reason(layer: nn.Module) -> Optional[str]:
    """Why this LoRA layer can never take the fused path (checked at patch time), or None."""
    _, LoraLinear, LoraLinear4bit = lora_classes()
    LoraLinear8bit = (_bnb_8bit_classes() or (None, None))[1]
    if type(layer) not in (LoraLinear, LoraLinear4bit, LoraLinear8bit):
        return f"unsupported LoRA layer type {type(layer).__name__}"
    base = base_layer(layer)
    wrapper = _tuner_layer_name(base)
    if wrapper is not None:
        return f"base layer is a {wrapper} layer (an adapter below LoRA: its output would be lost)"
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
    elif _is_int8_base(base):
        reason = _int8_reason(base, base.weight)
        if reason is not None:
            return reason
    elif type(layer) is LoraLinear8bit:
        return f"8-bit base layer type {type(base).__name__}"
    elif type(base) is not nn.Linear and type(base) is not _conv1d_class():
        return f"base layer type {type(base).__name__}"
    return None


def call_plan(layer, device_type: str, x: torch.Tensor, args, kwargs):
    """Inputs for the fused path, or the reason (a string) to run PEFT's forward for this call."""
    adapter_names = kwargs.get("adapter_names") if kwargs else None
    if args or (kwargs and any(v is not None for key, v in kwargs.items() if key != "adapter_names")):
        return "extra forward arguments"
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapters merged"
    # x.is_cpu reads a flag; x.device builds a torch.device object (this runs on every call)
    if (not x.is_cpu) if device_type == "cpu" else x.device.type != device_type:
        return f"input on {x.device.type}, layer patched for {device_type}"
    if x.dtype not in _FLOAT_DTYPES:
        return f"input dtype {x.dtype}"
    if not getattr(layer, "cast_input_dtype_enabled", True):
        return "input dtype casting disabled"
    # Submodules straight from _modules: this runs on every call, and nn.Module.__getattr__ is slow.
    submodules = layer._modules
    adapters = _adapters(layer, submodules, x, adapter_names)
    if isinstance(adapters, str):
        return adapters

    base = submodules["base_layer"]
    weight = _param(base, "weight")
    if weight.requires_grad:
        return "base weight requires grad"
    if type(base) is nn.Linear:  # the common dense case, without the 4-bit class checks
        return _dense_plan(base, weight, x, adapters, device_type)
    if _is_params4bit(weight):
        return _nf4_plan(base, weight, x, adapters, sharded=False)
    if _is_sharded_4bit(base):
        return _nf4_plan(base, weight, x, adapters, sharded=True)
    if _is_int8_base(base):
        return _int8_plan(base, weight, x, adapters, device_type)
    if type(base) is _conv1d_class():
        # Conv1D stores W as [K, N] (fan_in_fan_out): its transposed view is W [N, K], read through its strides.
        return _dense_plan(base, weight.T, x, adapters, device_type)
    # patch() checked the base's type; it changed since (e.g. another adapter layer was put in between).
    return f"base layer type {type(base).__name__}"


def _adapters(layer, submodules, x: torch.Tensor, adapter_names: Optional[list]):
    """The adapters this call applies, in PEFT's order, or the reason to run PEFT's forward.

    Without ``adapter_names``: the active adapters, summed in list order. With it (a mixed batch): every adapter
    named for some row of x's leading dimension (PEFT's ``_mixed_batch_forward``; "__base__" and names this layer
    lacks add nothing), each with the rows it serves, in one fused call.
    """
    lora_A, lora_B, lora_dropout = submodules["lora_A"], submodules["lora_B"], submodules["lora_dropout"]
    if adapter_names is None:
        names = [a for a in layer.active_adapters if a in lora_A]
        if not names:
            return "no active adapter on this layer"
    else:
        if len(adapter_names) != len(x):
            return "adapter_names length differs from the batch (PEFT raises)"
        names = sorted({a for a in adapter_names if a != "__base__" and a in lora_A})
        if not names:
            return "adapter_names: no adapter of this layer in the batch"
    variants = getattr(layer, "lora_variant", {})
    adapters = []
    for name in names:
        variant = variants.get(name)
        # First: a variant's lora_A/lora_B may not be nn.Linear at all (BD-LoRA's BlockDiagonalLinear has no bias).
        if variant is not None and type(variant) is not _dora_variant_class():
            return f"LoRA variant {type(variant).__name__}"
        lora_a, lora_b = lora_A._modules[name], lora_B._modules[name]
        lora_bias = _param(lora_b, "bias")
        if _param(lora_a, "bias") is not None:
            return "lora_A bias"
        dropout = lora_dropout._modules[name]
        if isinstance(dropout, nn.Dropout):
            p = float(dropout.p) if dropout.training else 0.0
        elif isinstance(dropout, nn.Identity):
            p = 0.0
        else:
            return f"dropout module {type(dropout).__name__}"
        if not 0.0 <= p < 1.0:
            return f"dropout p={p}"
        dora = None
        if variant is not None:
            dora = _dora(layer, name, variant, len(names), adapter_names, lora_bias)
            if isinstance(dora, str):
                return dora
            # PEFT's DoRA drops x (and takes the base term from the dropped x) only while the layer trains.
            p = p if layer.training else 0.0
        rows = None
        if adapter_names is not None:
            if lora_bias is not None:
                return "lora_bias in an adapter_names batch"
            rows = _on_device([1.0 if a == name else 0.0 for a in adapter_names], x.device)
        scale = float(layer.scaling[name])
        adapters.append(Adapter(_param(lora_a, "weight"), _param(lora_b, "weight"), scale, p, lora_bias, rows, dora))
    return adapters


def _on_device(values: list[float], device: torch.device) -> torch.Tensor:
    """fp32 [len(values)] on ``device``. To a GPU through pinned memory, without waiting: a copy from pageable
    memory would block the host until the device caught up, per layer and adapter. The caching host allocator
    keeps the pinned block from reuse until the copy has read it."""
    host = torch.tensor(values, dtype=torch.float32)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _dora(layer, name: str, variant, n_adapters: int, adapter_names, lora_bias):
    """The :class:`~fastlora.functions.dora.DoRA` part of adapter ``name``, or the reason it runs on PEFT."""
    from peft.tuners.lora import dora as peft_dora

    if adapter_names is not None:
        return "adapter_names with DoRA (PEFT raises)"
    if n_adapters > 1:
        return "DoRA with other active adapters"
    if lora_bias is not None:
        return "lora_bias with DoRA"
    dora_layer = layer._modules["lora_magnitude_vector"]._modules[name]
    # PEFT's inference cache of the weight norm (eval mode with ENABLE_DORA_CACHING): read and filled alike.
    caching = peft_dora.ENABLE_DORA_CACHING and not layer.training
    return DoRA(_param(dora_layer, "weight"), dora_layer._dora_cache if caching else None, f"weight-norm-{name}")


def _dense_plan(base_layer: nn.Linear, weight: torch.Tensor, x: torch.Tensor, adapters, device_type: str):
    bias = _param(base_layer, "bias")
    if torch.is_autocast_enabled(device_type):
        # What autocast would do to F.linear: run it in the autocast dtype.
        dtype = torch.get_autocast_dtype(device_type)
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
    base = BaseWeight(nf4.packed, bias, nf4.shape[0], nf4.stored_absmax, nf4.blocksize, nf4.nested)
    return (x if x.dtype == dtype else x.to(dtype)), base, adapters, x.dtype


def _int8_plan(base_layer, weight: torch.Tensor, x: torch.Tensor, adapters, device_type: str):
    reason = _int8_reason(base_layer, weight)
    if reason is not None:
        return reason
    # bitsandbytes' 8-bit matmul computes in x's dtype (F.linear on the dequantized W: the autocast dtype under
    # autocast) and casts the bias to it.
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    bias = _param(base_layer, "bias")
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    base = BaseWeight(weight, bias, weight.shape[0], _int8_scales(base_layer, weight), 0)
    return (x if x.dtype == dtype else x.to(dtype)), base, adapters, dtype
