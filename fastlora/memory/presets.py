"""Mixture-of-experts model shapes for the accounting and ``fastlora plan`` (the dense presets are
``fastlora.bench.models``).

The shapes are those of the public ``config.json`` files (random weights; nothing is downloaded):

- ``qwen3-30b-a3b``: Qwen/Qwen3-30B-A3B: hidden 2048, 48 layers, 32 query heads of 128 and 4 key/value heads,
  128 experts of intermediate 768, top-8 (norm_topk_prob), no shared expert, vocabulary 151,936.
- ``gpt-oss-20b``: openai/gpt-oss-20b: hidden 2880, 24 layers alternating sliding (128 tokens) and full
  attention, 64 query heads of 64 and 8 key/value heads with biases and sinks, 32 experts of intermediate 2880
  with biases, top-4, clamped SwiGLU, vocabulary 201,088.

Usage::

    config = moe_config("qwen3-30b-a3b")          # None for a name that is not an MoE preset
"""

from __future__ import annotations

from typing import Optional

MOE_PRESETS: dict[str, tuple[str, dict]] = {
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_local_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, rope_theta=1e6, max_position_embeddings=40960, tie_word_embeddings=False,
    )),
    "gpt-oss-20b": ("gpt_oss", dict(
        hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088, sliding_window=128,
        attention_bias=True, swiglu_limit=7.0, tie_word_embeddings=False,
    )),
}  # fmt: skip

#: The LoRA targets of an MoE step (``StepSpec.targets``): PEFT's target_modules and target_parameters.
TARGETS = {
    "all-linear": ("all-linear", None),
    "attention": (["q_proj", "k_proj", "v_proj", "o_proj"], None),
    "attention+experts": (["q_proj", "k_proj", "v_proj", "o_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
}


def moe_config(name: str):
    """The transformers config of MoE preset ``name``, or None."""
    if name not in MOE_PRESETS:
        return None
    from transformers import AutoConfig

    model_type, fields = MOE_PRESETS[name]
    return AutoConfig.for_model(model_type, use_cache=False, **fields)


def moe_notes(config) -> Optional[str]:
    """What the accounting assumes for this MoE config's attention (sinks, sliding windows), or None."""
    if getattr(config, "model_type", "") == "gpt_oss":
        return ("gpt-oss attention accounted as a flash kernel with sinks and sliding windows (no mask tensor, "
                "as FlashAttention-3 or FlexAttention runs it); the sinks' logits are not materialized")  # fmt: skip
    return None
