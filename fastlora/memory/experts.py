"""Mixture-of-experts models in the accounting: fastlora's fused expert path on meta tensors, and NF4 expert storage.

- **Fused experts.** ``fastlora.patch`` puts :class:`fastlora.wiring.experts.FusedExpertsForward` on the outermost
  PEFT ``ParamWrapper`` of each experts module; :func:`fused_experts_on_meta` does the same on a meta model (patch
  does not go there) and runs :func:`fastlora.moe.experts.grouped_experts_forward`, whose grouped LoRA ops are
  answered by their fake implementations (y and the thin S; dx, dA, dB: no [E, N, K] delta, no weight gradient).
  PEFT's contender runs its own ``ParamWrapper`` (W + s·B·A over the whole stack, per call) as it is.
- **NF4 experts** (``StepSpec.experts="nf4"``: ``fastlora.patch(model, quantize_experts="nf4")``). The meta model
  is quantized by the real :func:`fastlora.moe.quantize_experts` (on meta it makes the NF4 buffers' shapes: packed
  codes, u8 absmax, absmax2, offset, code2), so the weights count what it keeps. :func:`nf4_experts_on_meta` runs
  the Triton NF4 grouped path: its per-call absmax resolution runs for real on meta (counted), W is decoded in the
  kernel's tiles (nothing its size), and the grouped op's fake gives the outputs. Experts modules without LoRA run
  the same grouped path with rank 0.

Usage::

    with fused_experts_on_meta(model, "triton", notes, nf4=False):
        ...   # a step
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class MetaOps:
    """The ops a meta step dispatches for ``backend``: the dense ops' registered object and the grouped ops bound to
    the same backend name, both answered by fake implementations."""

    def __init__(self, dense, backend: str):
        from fastlora.grouped_ops import _Bound

        self._dense, self._grouped = dense, _Bound(backend)

    def __getattr__(self, name: str):
        return getattr(self._grouped if name.startswith("grouped_") else self._dense, name)


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
    from fastlora.moe.nf4_quantize import experts_modules
    from fastlora.moe.structure import chain_reason, expert_chain, param_wrapper_class

    wrapper_class = param_wrapper_class()
    installed, covered = [], set()  # installed: (module, the forward it had as an attribute, if any)
    for name, module in model.named_modules():
        if not isinstance(module, wrapper_class) or id(module) in covered:
            continue
        chain, experts = expert_chain(module)
        covered.update(id(w) for w in chain)
        reason = chain_reason(chain, experts)
        if reason not in (None, "weights on the meta device"):
            notes.append(f"{name}: left on PEFT ({reason})")
            continue
        installed.append((module, module.__dict__.get("forward")))
        module.forward = _MetaExpertsForward(chain, experts, backend)
        covered.add(id(experts))
    if nf4:
        for _, experts in experts_modules(model):
            if id(experts) not in covered:  # quantize_experts' NF4ExpertsForward, put back afterwards
                installed.append((experts, experts.__dict__.get("forward")))
                experts.forward = _MetaExpertsForward([], experts, backend)
    try:
        with nf4_experts_on_meta() if nf4 else contextlib.nullcontext():
            yield
    finally:
        for module, previous in installed:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


@contextlib.contextmanager
def nf4_experts_on_meta() -> Iterator[None]:
    """The Triton NF4 grouped forward and backward (:mod:`fastlora.backends.grouped_triton`) for meta tensors: the absmax
    resolved as they resolve it (real ops on meta, live while the op runs), W as a stride-0 stand-in (the kernel
    decodes the codes in its tiles) and the dense grouped op's fake implementation for the outputs."""
    from fastlora import grouped_ops
    from fastlora.moe import nf4_grouped

    forward, backward = nf4_grouped._forward, nf4_grouped._backward

    def decoded_in_tiles(stack, x: torch.Tensor) -> torch.Tensor:
        return x.new_empty((), dtype=stack.dtype).expand(stack.shape)

    def meta_forward(backend, x, offsets, stack, lora_a, lora_b, ranks, scales):
        if x.device.type != "meta":
            return forward(backend, x, offsets, stack, lora_a, lora_b, ranks, scales)
        absmax = stack.resolved_absmax()  # noqa: F841 - live during the op, as in the kernel's launch
        weight = decoded_in_tiles(stack, x)
        return grouped_ops.grouped_lora_forward(x, offsets, weight, lora_a, lora_b, ranks, scales, backend)

    def meta_backward(backend, grad_out, x, lora_s, offsets, stack, lora_a, lora_b, ranks, scales, needs_x):
        if x.device.type != "meta":
            return backward(backend, grad_out, x, lora_s, offsets, stack, lora_a, lora_b, ranks, scales, needs_x)
        absmax = stack.resolved_absmax() if needs_x else None  # noqa: F841 - dA and dB read no W
        return grouped_ops.grouped_lora_backward(grad_out, x, lora_s, offsets, decoded_in_tiles(stack, x), lora_a, lora_b,
                                             ranks, scales, needs_x, backend)  # fmt: skip

    nf4_grouped._forward, nf4_grouped._backward = meta_forward, meta_backward
    try:
        yield
    finally:
        nf4_grouped._forward, nf4_grouped._backward = forward, backward
