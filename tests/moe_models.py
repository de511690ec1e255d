"""Tiny mixture-of-experts models from transformers configs (random weights, no downloads) and their PEFT
wrapping with LoRA on the 3-D expert weights (``target_parameters``), for the MoE tests and the differential matrix.

Usage::

    model = peft_moe_model("qwen3_moe", torch.float32, seed=0)
"""

from __future__ import annotations

import torch

VOCAB = 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip

#: Per model: (config class name, config arguments, expert parameter names targeted).
MODELS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=24, head_dim=8, num_experts=8,
                                         num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                                     sliding_window=8, layer_types=["sliding_attention", "full_attention"])),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=0,
                                             n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                             num_key_value_heads=4)),
}  # fmt: skip
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, experts_implementation: str = "grouped_mm"):
    """A tiny ``<kind>ForCausalLM`` with random weights in ``dtype``; router and expert weights drawn afresh
    (some models initialise them to zero), so routing and outputs depend on them."""
    import transformers

    name, kwargs = MODELS[kind]
    config = getattr(transformers, name)(**{**_COMMON, **kwargs})
    config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if any(part in pname for part in (".experts.", ".gate.", ".router.")):
                param.normal_(0.0, 0.2)
    return model.eval()


def peft_moe_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0, r: int = 4, adapters=("default",),
                   use_rslora: bool = False, target_modules=None, targets=EXPERT_PARAMETERS):  # fmt: skip
    """The tiny model under PEFT with LoRA on its expert weights (B drawn non-zero, so the adapters matter)."""
    from peft import LoraConfig, get_peft_model

    model = moe_model(kind, dtype, seed)
    peft_model = None
    for index, adapter in enumerate(adapters):
        config = LoraConfig(r=r + 2 * index, lora_alpha=2 * r, target_parameters=list(targets), use_rslora=use_rslora,
                            target_modules=target_modules or [], init_lora_weights=True)  # fmt: skip
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=adapter)
        else:
            peft_model.add_adapter(adapter, config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0.0, 0.1)
    return peft_model
