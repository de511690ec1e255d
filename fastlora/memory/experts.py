"""Mixture-of-experts models in the accounting: fastlora's fused expert path on meta tensors, and NF4 expert storage.

- **Fused experts.** ``fastlora.patch`` puts :class:`fastlora.wiring.experts.FusedExpertsForward` on the outermost
  PEFT ``ParamWrapper`` of each experts module; :func:`fused_experts_on_meta` does the same on a meta model (patch
  does not go there) and runs :func:`fastlora.moe.experts.grouped_experts_forward`, whose grouped LoRA ops are
  answered by their fake implementations (y and the thin S; dx, dA, dB: no [E, N, K] delta, no weight gradient).
  PEFT's contender runs its own ``ParamWrapper`` (W + s·B·A over the whole stack, per call) as it is.
- **NF4 experts** (``StepSpec.experts="nf4"``: ``fastlora.patch(model, quantize_experts="nf4")``). The expert
  stacks keep their dense meta shapes for the computation but are counted at bitsandbytes' NF4 size
  (:func:`fastlora.memory.presets.nf4_nbytes`: codes, absmax with double quantization); the grouped ops count, while
  they run, the fp32 absmax they resolve per call (4 bytes per 64 weights: the Triton kernel decodes the codes in
  its tiles, nothing the size of W). Experts modules without LoRA run the same grouped path with rank 0.

Usage::

    with fused_experts_on_meta(model, "triton", notes, nf4=False):
        ...   # a step
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from fastlora.memory.presets import nf4_nbytes

_GROUPED_OPS = ("fastlora::grouped_lora_forward", "fastlora::grouped_lora_backward")


class MetaOps:
    """The ops a meta step dispatches for ``backend``: the dense ops' registered object and the grouped ops bound to
    the same backend name, both answered by fake implementations."""

    def __init__(self, dense, backend: str):
        from fastlora.grouped_ops import _Bound

        self._dense, self._grouped = dense, _Bound(backend)

    def __getattr__(self, name: str):
        return getattr(self._grouped if name.startswith("grouped_") else self._dense, name)


def experts_modules(model: nn.Module) -> list[nn.Module]:
    """The transformers experts modules of ``model`` (3-D ``down_proj`` with one slice per expert)."""
    found = []
    for module in model.modules():
        weight = module._parameters.get("down_proj") if hasattr(module, "num_experts") else None
        if weight is not None and weight.dim() == 3:
            found.append(module)
    return found


class _MetaExpertsForward:
    """The fused expert path on a meta model: each wrapper's adapters of ``chain`` as FusedExpertsForward reads them
    (its device and autocast checks cannot be asked on meta)."""

    def __init__(self, chain: list[nn.Module], experts: nn.Module, backend: str):
        self.chain, self.experts, self.backend = chain, experts, backend

    def __call__(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        from fastlora.moe.experts import grouped_experts_forward
        from fastlora.wiring.experts import _adapters

        adapters = {}
        for wrapper in self.chain:
            found = _adapters(wrapper, self.experts.num_experts)
            if isinstance(found, str):
                raise RuntimeError(f"fastlora would run PEFT's forward here: {found}")
            adapters[wrapper.parameter_name] = found
        return grouped_experts_forward(self.experts, x, top_k_index, top_k_weights, adapters, self.backend)


@contextlib.contextmanager
def fused_experts_on_meta(model: nn.Module, backend: str, notes: list[str], nf4: bool) -> Iterator[None]:
    """fastlora's expert path on every experts module of a meta ``model``: fused on PEFT's ParamWrapper chains, and
    (``nf4``) the grouped path with rank 0 on experts modules without LoRA."""
    from fastlora.moe.structure import chain_reason, expert_chain, param_wrapper_class

    wrapper_class = param_wrapper_class()
    installed, covered = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, wrapper_class) or id(module) in covered:
            continue
        chain, experts = expert_chain(module)
        covered.update(id(w) for w in chain)
        reason = chain_reason(chain, experts)
        if reason not in (None, "weights on the meta device"):
            notes.append(f"{name}: left on PEFT ({reason})")
            continue
        module.forward = _MetaExpertsForward(chain, experts, backend)
        installed.append(module)
        covered.add(id(experts))
    if nf4:
        for experts in experts_modules(model):
            if id(experts) not in covered:
                experts.forward = _MetaExpertsForward([], experts, backend)
                installed.append(experts)
    try:
        yield
    finally:
        for module in installed:
            del module.forward


def count_nf4_experts(model: nn.Module, tracker) -> Callable[..., int]:
    """Count every expert stack of ``model`` at its NF4 size in ``tracker`` (before ``tracker.tracking``), and
    return the scratch function of the grouped ops on them: the fp32 absmax resolved per call."""
    from fastlora.moe.experts import expert_weight, up_projection_name

    resolved: dict[int, int] = {}
    for experts in experts_modules(model):
        for name in (up_projection_name(experts), "down_proj"):
            weight = expert_weight(experts, name)  # [E, N, K]
            tracker.add(weight, "weights", nbytes=nf4_nbytes(*weight.shape))
            resolved[id(weight.untyped_storage())] = 4 * weight.shape[0] * -(-weight.shape[1] * weight.shape[2] // 64)

    def absmax_scratch(func, args) -> int:
        name = getattr(func, "_name", "")
        if name not in _GROUPED_OPS:
            return 0
        if name == _GROUPED_OPS[1] and not args[9]:  # backward without dx reads no W
            return 0
        weight = args[2] if name == _GROUPED_OPS[0] else args[4]
        return resolved.get(id(weight.untyped_storage()), 0)

    return absmax_scratch
