"""Where LoRA on expert weights sits in a model: transformers' experts modules and PEFT's ParamWrapper chains over them.

Usage::

    chain, experts = expert_chain(outer_wrapper)      # [outer, ..., inner] ParamWrappers, the experts module
    reason = chain_reason(chain, experts)             # None when fastlora can fuse the chain
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from fastlora.moe.experts import up_projection_name
from fastlora.moe.nf4_experts import is_quantized

#: Attributes ``transformers.integrations.moe.use_experts_implementation`` puts on an experts module.
EXPERTS_INTERFACE = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_apply_gate", "num_experts")


def param_wrapper_class() -> type:
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def expert_chain(outer: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The nested ParamWrappers from ``outer`` inwards, and the module they wrap."""
    wrapper_class = param_wrapper_class()
    chain, module = [], outer
    while isinstance(module, wrapper_class):
        chain.append(module)
        module = module._modules["base_layer"]
    return chain, module


def chain_reason(chain: list[nn.Module], experts: nn.Module) -> Optional[str]:
    """Why this wrapper chain can never be fused (checked at patch time), or None."""
    wrapper_class = param_wrapper_class()
    missing = [name for name in EXPERTS_INTERFACE if not hasattr(experts, name)]
    if missing:
        return (f"ParamWrapper on {type(experts).__name__}, not a transformers experts module "
                f"(use_experts_implementation; lacks {', '.join(missing)})")  # fmt: skip
    projections = {up_projection_name(experts), "down_proj"}
    for wrapper in chain:
        if type(wrapper) is not wrapper_class:
            return f"unsupported LoRA layer type {type(wrapper).__name__}"
        name = wrapper.parameter_name
        if name not in projections:
            return f"ParamWrapper on {type(experts).__name__}.{name} (fused: {', '.join(sorted(projections))})"
        if is_quantized(experts, name):  # NF4 experts: 3-D by construction
            continue
        weight = experts._parameters.get(name)
        if weight is None or weight.dim() != 3 or weight.shape[0] != experts.num_experts:
            return f"{type(experts).__name__}.{name} is not a 3-D expert weight"
        if weight.device.type == "meta":
            return "weights on the meta device"
    if len({w.parameter_name for w in chain}) != len(chain):
        return "the same expert weight wrapped twice"
    return None
