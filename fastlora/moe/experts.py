"""The experts forward of transformers' ``use_experts_implementation`` models with each projection fused.

It has the signature of an ``ExpertsInterface`` function (``transformers.integrations.moe``:
``experts_forward(self, hidden_states, top_k_index, top_k_weights)``) plus the LoRA adapters per projection, and
the same steps as transformers' ``grouped_mm`` implementation: sort the token-expert pairs by expert, offsets from
``histc`` (no host sync on CUDA), grouped up projection, the module's own gating (``_apply_gate``: gpt-oss's
interleaved, clamped SwiGLU) or activation, grouped down projection, the module's own expert biases and post-expert
norm, and the deterministic per-token weighted sum over the top k. Only the two grouped GEMMs differ: each is
:func:`fastlora.moe.autograd.grouped_lora_linear`, with the projection's LoRA in its epilogue.

Usage::

    out = grouped_experts_forward(experts, hidden, top_k_index, top_k_weights, {"down_proj": [(a, b, 2.0)]}, "cpp")
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from fastlora.moe.autograd import grouped_lora_linear
from fastlora.moe.nf4_experts import expert_stack, is_quantized
from fastlora.moe.nf4_grouped import nf4_grouped_lora_linear

Adapters = Sequence[tuple[Tensor, Tensor, float]]


def up_projection_name(experts: nn.Module) -> str:
    """``gate_up_proj`` for gated experts, else ``up_proj`` (transformers' naming)."""
    return "gate_up_proj" if experts.has_gate else "up_proj"


def expert_weight(experts: nn.Module, name: str) -> Tensor:
    """The projection's weight as W [E, N, K] (a transposed view for experts stored [E, K, N], like gpt-oss)."""
    weight = experts._parameters[name]
    return weight.transpose(1, 2) if experts.is_transposed else weight


def _projection(experts: nn.Module, name: str, x: Tensor, offsets: Tensor, expert_ids: Tensor, adapters, backend):
    if is_quantized(experts, name):  # NF4 experts (fastlora.moe.nf4_experts)
        stack = expert_stack(experts, name)
        out = nf4_grouped_lora_linear(x.to(stack.dtype), offsets, stack, adapters.get(name, ()), backend)
    else:
        weight = expert_weight(experts, name)
        out = grouped_lora_linear(x.to(weight.dtype), offsets, weight, adapters.get(name, ()), backend)
    if experts.has_bias:
        out = out + experts._parameters[f"{name}_bias"].index_select(0, expert_ids)
    return out


def grouped_experts_forward(
    experts: nn.Module,
    hidden_states: Tensor,
    top_k_index: Tensor,
    top_k_weights: Tensor,
    adapters: dict[str, Adapters],
    backend: str,
) -> Tensor:
    """The experts' output [T, H] for hidden states [T, H] routed to ``top_k_index`` [T, k] with ``top_k_weights``,
    each projection named in ``adapters`` carrying its (A [E, r, K], B [E, N, r], scale) LoRA adapters.

    Usage: ``grouped_experts_forward(experts, h, idx, w, {"gate_up_proj": [(a, b, s)]}, "torch")``
    """
    num_tokens, hidden_dim = hidden_states.shape
    num_top_k = top_k_index.shape[-1]
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    # index_select, not [] indexing: several times faster on the CPU both ways (its backward is an index_add_)
    x = hidden_states.index_select(0, perm // num_top_k)
    # histc, as transformers: no host sync on CUDA (CPU histc takes floats only).
    counts_input = expert_ids.float() if expert_ids.device.type == "cpu" else expert_ids.int()
    counts = torch.histc(counts_input, bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)

    hidden = _projection(experts, up_projection_name(experts), x, offsets, expert_ids, adapters, backend)
    hidden = experts._apply_gate(hidden) if experts.has_gate else experts.act_fn(hidden)
    out = _projection(experts, "down_proj", hidden, offsets, expert_ids, adapters, backend)
    if experts.has_post_expert_norm:
        out = experts.post_expert_norm(out)

    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    per_token = out.index_select(0, inverse).view(num_tokens, num_top_k, hidden_dim)
    # Each token's weighted sum over its k outputs as one batched [1, k]·[k, H] product: the same deterministic sum
    # as transformers' weighting then sum over k, without its broadcast multiply (slow on the CPU) and temporaries.
    dtype = torch.promote_types(out.dtype, top_k_weights.dtype)
    combined = torch.bmm(top_k_weights.to(dtype).unsqueeze(1), per_token.to(dtype))
    return combined.view(num_tokens, hidden_dim).to(hidden_states.dtype)
