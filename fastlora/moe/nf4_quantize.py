"""Quantizing a model's mixture-of-experts weights to NF4 (QLoRA for MoE), and the hooks that run them.

bitsandbytes 0.50 leaves transformers' 3-D expert weights in bf16 (``load_in_4bit`` quantizes ``nn.Linear`` only),
about 95% of an MoE model. :func:`quantize_experts` stores them in bitsandbytes' NF4 block format instead, per expert
(:mod:`fastlora.moe.nf4_experts`: slice e of W [E, N, K] gets exactly the codes, absmax and double quantization that
``bitsandbytes.functional.quantize_4bit`` gives it), frees the bf16 stacks, and gives each quantized experts module
a forward on the NF4 weights and each PEFT ParamWrapper over one a dequantizing merge. Quantize after
``peft.get_peft_model`` (PEFT reads the weight to build its wrappers).

Usage::

    model = get_peft_model(model, LoraConfig(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    summary = fastlora.moe.quantize_experts(model)       # or fastlora.patch(model, quantize_experts="nf4")
    print(summary)   # Qwen3-30B-A3B: "96 expert weights of 48 experts modules in NF4: 54 GiB -> 13.9 GiB"
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

from fastlora import grouped_ops
from fastlora.moe import nf4_experts
from fastlora.moe.experts import grouped_experts_forward
from fastlora.moe.nf4_experts import (
    LAYOUTS_KEY, MATERIALIZED_KEY, PROJECTIONS, QUANT_TYPES, dequantized_weight, is_quantized, nf4_nbytes, projection_device,
)  # fmt: skip
from fastlora.moe.structure import EXPERTS_INTERFACE, expert_chain, param_wrapper_class

logger = logging.getLogger("fastlora")


@dataclass
class QuantizationSummary:
    """What :func:`quantize_experts` did: per quantized projection (``"<module>.<name>"``), the bytes of its bf16
    (or fp32) stack and of its NF4 storage."""

    quant_type: str
    projections: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def bytes_before(self) -> int:
        return sum(before for before, _ in self.projections.values())

    @property
    def bytes_after(self) -> int:
        return sum(after for _, after in self.projections.values())

    @property
    def modules(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[0] for name in self.projections})

    def __str__(self) -> str:
        return (f"{len(self.projections)} expert weights of {len(self.modules)} experts modules in "
                f"{self.quant_type.upper()}: {self.bytes_before / 2**30:.3g} GiB -> {self.bytes_after / 2**30:.3g} GiB")  # fmt: skip


def experts_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every transformers experts module (``use_experts_implementation``) in ``model``."""
    for name, module in model.named_modules():
        if all(hasattr(module, attr) for attr in EXPERTS_INTERFACE) and (
            "down_proj" in module._parameters or is_quantized(module, "down_proj")
        ):
            yield name, module


def quantize_experts(
    model: nn.Module,
    quant_type: str = "nf4",
    *,
    blocksize: int = 64,
    compress_statistics: bool = True,
    backend: str = "auto",
    device: Optional[Union[torch.device, str]] = None,
    progress: bool = True,
) -> QuantizationSummary:
    """Quantize the 3-D expert weights of every transformers experts module in ``model`` to bitsandbytes' NF4
    (see the module doc), freeing the dense stacks; already quantized ones are left as they are. Expert weights
    that require grad (not frozen by PEFT) or are parametrized raise ``ValueError`` before anything changes. On
    the meta device only the buffers' shapes are made (for memory accounting). ``device``: where the NF4 weights
    go (each slice is quantized there; default the weights' device): a model too large for the GPU in bf16 can be
    loaded on the CPU, quantized onto the GPU, then the rest moved with ``model.to("cuda")``.

    Usage: ``summary = quantize_experts(peft_model)``
    """
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type {quant_type!r}: fastlora quantizes expert weights to {', '.join(QUANT_TYPES)}")
    work = []
    for module_name, experts in experts_modules(model):
        for name in PROJECTIONS:
            weight = experts._parameters.get(name)
            if weight is None:
                continue
            if getattr(experts, "parametrizations", None) is not None and name in experts.parametrizations:
                raise ValueError(f"{module_name}.{name} is parametrized (a PEFT call in progress?): not quantized")
            if weight.requires_grad:
                raise ValueError(f"{module_name}.{name} requires grad: quantize frozen expert weights "
                                 "(after peft.get_peft_model), not trained ones")  # fmt: skip
            if weight.dim() != 3 or not weight.dtype.is_floating_point:
                raise ValueError(f"{module_name}.{name} of shape {tuple(weight.shape)}, {weight.dtype}: not a 3-D float expert weight")
            work.append((module_name, experts, name))
    summary = QuantizationSummary(quant_type)
    from tqdm.auto import tqdm

    done = []
    try:
        for module_name, experts, name in tqdm(work, desc="fastlora: NF4 experts", disable=not progress or len(work) < 8):
            before = experts._parameters[name].nbytes
            nf4_experts.quantize_projection(experts, name, blocksize, compress_statistics, device)
            done.append(experts)
            layout = experts.__dict__[LAYOUTS_KEY][name]
            summary.projections[f"{module_name}.{name}"] = (before, nf4_nbytes(*layout.shape, blocksize, compress_statistics))
    except BaseException:
        for experts in done:  # no half-quantized model: back to dense (holding the NF4 values)
            _dequantize_module(experts)
        raise
    _install_hooks(model, backend)
    if summary.projections:
        logger.info("fastlora: %s", summary)
    return summary


def dequantize_experts(model: nn.Module) -> list[str]:
    """Turn every NF4 expert weight of ``model`` back into a dense frozen parameter of its dtype (the dequantized
    values, not the original ones) and give the experts modules their own forward back; returns the names.

    Usage: ``fastlora.moe.dequantize_experts(model)``
    """
    done = []
    for module_name, experts in experts_modules(model):
        done.extend(f"{module_name}.{name}" for name in _dequantize_module(experts))
    return done


def _dequantize_module(experts: nn.Module) -> list[str]:
    names = list(experts.__dict__.get(LAYOUTS_KEY, {}))
    for name in names:
        weight = dequantized_weight(experts, name)
        for part in ("packed", "absmax", "absmax2", "offset", "code2"):
            experts._buffers.pop(f"{name}_nf4_{part}", None)
        del experts.__dict__[LAYOUTS_KEY][name]
        experts._parameters[name] = nn.Parameter(weight, requires_grad=False)
    if isinstance(experts.__dict__.get("forward"), NF4ExpertsForward):
        del experts.forward
    return names


class NF4ExpertsForward:
    """The forward of a quantized experts module: transformers' grouped experts steps with NF4 weights and no
    LoRA (fused LoRA on expert weights runs in the ParamWrapper's forward, :mod:`fastlora.wiring.experts`). Inside
    :func:`materialized` (PEFT's own forward) it is the module's class forward, on the dense copies."""

    def __init__(self, experts: nn.Module, backend: str):  # noqa: D107
        self.experts, self.backend, self.chosen = experts, backend, None

    def __call__(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        experts = self.experts
        if not is_quantized(experts) or experts.__dict__.get(MATERIALIZED_KEY):
            return type(experts).forward(experts, hidden_states, top_k_index, top_k_weights)
        if self.chosen is None:
            self.chosen = grouped_ops.resolve(self.backend, projection_device(experts, "down_proj"))
        return grouped_experts_forward(experts, hidden_states, top_k_index, top_k_weights, {}, self.chosen)


def _merge_dequantized(wrapper: nn.Module, *args, **kwargs) -> None:
    """PEFT's ``merge`` of a ParamWrapper over NF4 experts: dequantize that experts module for good, then merge
    into the dense weights (the result is a dense model, see docs/moe.md)."""
    _dequantize_module(expert_chain(wrapper)[1])
    type(wrapper).merge(wrapper, *args, **kwargs)


def _install_hooks(model: nn.Module, backend: str) -> None:
    """The NF4 forward on every quantized experts module, and the dequantizing merge on the ParamWrappers over them."""
    wrapper_class = param_wrapper_class()
    for _, experts in experts_modules(model):
        if is_quantized(experts) and not isinstance(experts.__dict__.get("forward"), NF4ExpertsForward):
            experts.forward = NF4ExpertsForward(experts, backend)
    for module in model.modules():
        if isinstance(module, wrapper_class) and is_quantized(expert_chain(module)[1]):
            module.merge = functools.partial(_merge_dequantized, module)
