"""Put the grouped expert LoRA inside PEFT models: PEFT's ``lora.ParamWrapper`` on 3-D expert weights.

PEFT adapts a transformers experts module (``mlp.experts``) with one ``ParamWrapper`` per targeted parameter,
nested (``experts`` → wrapper(down_proj) → wrapper(gate_up_proj) → the experts module). Its forward registers a
parametrization W + s·B·A for the call, building a delta over the whole expert stack. Here the outermost wrapper
of each chain gets a :class:`FusedExpertsForward`: per call it reads every wrapper of the chain the way PEFT does
(active adapters, scaling, disabled/merged state) and runs
:func:`fastlora.moe.experts.grouped_experts_forward` with each projection's adapters, or PEFT's forward with the
reason counted in the report. The inner wrappers keep PEFT's forward (reached only on fallback) and are listed as
fused by their chain.

Usage (``fastlora.patch`` calls this; nothing to call directly)::

    rest, installs = split_param_wrappers(layers, "auto", report)
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from fastlora import grouped_ops
from fastlora.moe.experts import grouped_experts_forward
from fastlora.moe.nf4_experts import is_quantized, materialized, projection_device
from fastlora.moe.structure import chain_reason, expert_chain, param_wrapper_class
from fastlora.wiring.fused_forward import FusedForward, is_compiling, logger
from fastlora.wiring.report import PatchReport

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _adapters(wrapper: nn.Module, num_experts: int):
    """The active adapters of one wrapper as (A [E, r, K], B [E, N, r], scale) views, or the reason for PEFT."""
    lora_A, lora_B, dropout = wrapper._modules["lora_A"], wrapper._modules["lora_B"], wrapper._modules["lora_dropout"]
    found = []
    for name in wrapper.active_adapters:
        if name not in lora_A:
            continue
        if type(dropout._modules[name]) is not nn.Identity:
            return f"dropout module {type(dropout._modules[name]).__name__} (PEFT refuses dropout on ParamWrapper)"
        if getattr(wrapper, "lora_variant", {}).get(name) is not None:
            return "LoRA variant on ParamWrapper"
        a, b = lora_A._modules[name], lora_B._modules[name]
        if b.bias is not None or a.bias is not None:
            return "lora_bias on ParamWrapper"
        a_weight, b_weight = a.weight, b.weight
        rank = a_weight.shape[0] // num_experts
        # PEFT's layout (ParamWrapper.get_delta_factors): A rows are expert-major, B columns rank-major.
        lora_a = a_weight.view(num_experts, rank, a_weight.shape[1])
        lora_b = b_weight.view(b_weight.shape[0], rank, num_experts).permute(2, 0, 1)
        found.append((lora_a, lora_b, float(wrapper.scaling[name])))
    return found


class FusedExpertsForward(FusedForward):
    """The forward installed on the outermost ParamWrapper of an experts module: the whole chain in one fused call."""

    # FusedForward's own __init__ reads a ``base_layer.weight``, which a ParamWrapper lacks: set its fields here
    # (what ``original``, ``_fall_back`` and ``unpatch`` read), with no verify mode.
    def __init__(self, layer: nn.Module, name: str, backend: str, report: PatchReport, previous):  # noqa: D107
        self.layer, self.name, self.backend, self.report, self.previous = layer, name, backend, report, previous
        self._warned: set[str] = set()
        self.chain, self.experts = expert_chain(layer)
        self.device_type = projection_device(self.experts, "down_proj").type

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self.plan(x, args, kwargs)
        if isinstance(plan, str):
            if not is_compiling():
                self._fall_back(plan)
            with materialized(self.experts):  # NF4 experts: PEFT's forward reads dense weights
                return self.original(x, *args, **kwargs)
        if not is_compiling():
            self.report.fused_calls += 1  # one call of the chain, as a fallback counts one
        return grouped_experts_forward(self.experts, x, args[0], args[1], plan, self.backend)

    def plan(self, x: torch.Tensor, args: tuple, kwargs: dict):
        """Per projection name, its adapters for this call; or the reason (a string) to run PEFT's forward."""
        if kwargs or len(args) != 2:
            return "experts called with other arguments than (hidden_states, top_k_index, top_k_weights)"
        if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
            return f"hidden states of shape {tuple(x.shape)} and dtype {x.dtype}"
        if x.device.type != self.device_type:
            return f"input on {x.device.type}, layer patched for {self.device_type}"
        if torch.is_autocast_enabled(self.device_type):
            return "autocast"
        experts = self.experts
        if getattr(experts, "_is_expert_parallel", False):
            return "expert parallelism"
        if parametrize.is_parametrized(experts):
            return "experts module already parametrized"
        adapters = {}
        for wrapper in self.chain:
            if wrapper.disable_adapters and is_quantized(experts) and not wrapper.merged:
                continue  # NF4 experts: the bare weights are the fused op without this projection's LoRA
            if wrapper.disable_adapters:
                return "adapters disabled"
            if wrapper.merged:
                return "adapters merged"
            name = wrapper.parameter_name
            if not is_quantized(experts, name) and experts._parameters[name].requires_grad:
                return "base weight requires grad"
            found = _adapters(wrapper, experts.num_experts)
            if isinstance(found, str):
                return found
            adapters[name] = found
        return adapters


# Inner wrappers of fused chains -> the forward installed on their chain's outer wrapper (weak keys: freed with the model).
_COVERED: "weakref.WeakKeyDictionary[nn.Module, FusedExpertsForward]" = weakref.WeakKeyDictionary()


def _covered_by_fused_chain(layer: nn.Module) -> bool:
    fused = _COVERED.get(layer)
    return fused is not None and fused.layer.__dict__.get("forward") is fused


def split_param_wrappers(layers: list, backend: str, report: PatchReport) -> tuple[list, list]:
    """Take the ParamWrappers out of ``layers`` (named LoRA layers): skipped ones get their reason in ``report``;
    returns the other layers and, per fusable chain, ``(outer name, outer layer, backend, inner names)``, which
    :func:`install` applies."""
    wrapper_class = param_wrapper_class()
    rest, chains, covered = [], [], set()
    for name, layer in layers:
        if not isinstance(layer, wrapper_class):
            rest.append((name, layer))
            continue
        if id(layer) in covered or _covered_by_fused_chain(layer):
            continue
        chain, experts = expert_chain(layer)
        covered.update(id(w) for w in chain)
        names = [name + ".base_layer" * depth for depth in range(len(chain))]
        if isinstance(layer.__dict__.get("forward"), FusedExpertsForward):
            report.already_patched.update({n: layer.__dict__["forward"].backend for n in names})
            continue
        reason = chain_reason(chain, experts)
        if reason is not None:
            report.skipped.update({n: reason for n in names})
            continue
        device = projection_device(experts, "down_proj")
        chains.append((name, layer, grouped_ops.resolve(backend, device), names))
    return rest, chains


def install(chain: tuple, report: PatchReport) -> nn.Module:
    """Install the fused forward on one chain from :func:`split_param_wrappers`; returns the outer layer."""
    name, layer, chosen, names = chain
    fused = layer.forward = FusedExpertsForward(layer, name, chosen, report, layer.__dict__.get("forward"))
    for inner in fused.chain[1:]:
        _COVERED[inner] = fused
    report.patched.update({n: chosen for n in names})
    return layer
