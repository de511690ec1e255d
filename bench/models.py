"""Model shapes the benchmarks use, and builders for LoRA/QLoRA models with random weights (nothing is downloaded).

A preset names a Llama-style architecture. The layer benchmark takes its linear shapes; the training and
memory benchmarks build the whole causal LM from it with ``transformers`` (random weights) and, for QLoRA,
swap every decoder ``nn.Linear`` for a bitsandbytes NF4 ``Linear4bit`` with double quantization, as
``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))`` would.

Usage::

    shapes = layer_shapes("llama-3-8b")                     # [LinearShape("q_proj,o_proj", 4096, 4096), ...]
    model = build_causal_lm("tiny", method="qlora", dtype=torch.float32, device="cpu", seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelPreset:
    """A Llama-style architecture (the fields are ``LlamaConfig`` arguments)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 500000.0
    note: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


MODEL_PRESETS: dict[str, ModelPreset] = {
    # For the suite's own tests: every suite end to end in seconds.
    "micro": ModelPreset(128, 256, 2, 4, 2, 512, note="smoke tests, 0.3M parameters"),
    # Small enough that LoRA and QLoRA training of every contender finishes in about a minute on 2 CPU cores.
    "tiny": ModelPreset(512, 1536, 4, 8, 4, 4096, note="CPU default, 17M parameters"),
    "small": ModelPreset(1024, 2816, 8, 16, 4, 8192, note="CPU, 100M parameters"),
    # The model of the CPU speed floors (hidden 1024, 4 layers, vocab 32000). The floors do not give the MLP width
    # or the heads; 4096 with full multi-head attention is the width whose FLOPs fit their PEFT fp32 step (~1.9 s).
    "small-32k": ModelPreset(1024, 4096, 4, 16, 16, 32000, note="CPU floors' model, 130M parameters"),
    "llama-3.2-1b": ModelPreset(2048, 8192, 16, 32, 8, 128256, tie_word_embeddings=True, note="Llama-3.2-1B shapes"),
    "llama-3-8b": ModelPreset(4096, 14336, 32, 32, 8, 128256, note="Llama-3-8B shapes"),
    # Qwen2 is a Llama with biases on q, k and v: the same LlamaConfig with attention_bias gives its shapes.
    "qwen2.5-7b": ModelPreset(3584, 18944, 28, 28, 4, 152064, attention_bias=True, rope_theta=1e6, note="Qwen2.5-7B shapes"),
}


def preset(name: str) -> ModelPreset:
    """The preset called ``name`` (raises ValueError listing the known ones)."""
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_PRESETS)}") from None


@dataclass(frozen=True)
class LinearShape:
    """One distinct linear layer shape of a model: ``projections`` are the layers sharing it (K in, N out)."""

    projections: str
    in_features: int
    out_features: int
    bias: bool


def layer_shapes(model: str) -> list[LinearShape]:
    """The distinct (K, N, bias) linear shapes of a decoder layer, named by the projections that have them."""
    p = preset(model)
    q_out, kv_out = p.num_attention_heads * p.head_dim, p.num_key_value_heads * p.head_dim
    projections = [
        ("q_proj", p.hidden_size, q_out, p.attention_bias),
        ("k_proj", p.hidden_size, kv_out, p.attention_bias),
        ("v_proj", p.hidden_size, kv_out, p.attention_bias),
        ("o_proj", q_out, p.hidden_size, False),
        ("gate_proj", p.hidden_size, p.intermediate_size, False),
        ("up_proj", p.hidden_size, p.intermediate_size, False),
        ("down_proj", p.intermediate_size, p.hidden_size, False),
    ]
    grouped: dict[tuple[int, int, bool], list[str]] = {}
    for name, k, n, bias in projections:
        grouped.setdefault((k, n, bias), []).append(name)
    return [LinearShape(",".join(names), k, n, bias) for (k, n, bias), names in grouped.items()]


def nf4_linear(weight: torch.Tensor, bias: torch.Tensor | None, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes NF4 ``Linear4bit`` (double quant, blocksize 64) holding ``weight`` quantized on its device."""
    import bitsandbytes as bnb

    n, k = weight.shape
    layer = bnb.nn.Linear4bit(
        k, n, bias=bias is not None, compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
        device="meta",
    )
    # Params4bit quantizes when moved to a real device; the float weight is not kept.
    layer.weight = bnb.nn.Params4bit(
        weight.detach(), requires_grad=False, compress_statistics=True, quant_type="nf4"
    ).to(weight.device)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)
    return layer


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A bitsandbytes 8-bit ``Linear8bitLt`` (int8 codes, per-row SCB, as ``load_in_8bit`` loads) holding ``weight``;
    it computes in its input's dtype."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    n, k = weight.shape
    layer = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False, device="meta")
    codes, scb, _ = bnbF.int8_vectorwise_quant(weight.detach().half())  # what Int8Params does on its first move
    layer.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every ``nn.Linear`` of ``model`` (except those named in ``skip``) by an NF4 ``Linear4bit``, in place.

    Flags the model as loaded in 4 bit, which is what makes PEFT wrap these layers in ``lora.bnb.Linear4bit``.
    Returns the number of layers quantized.
    """
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child_name not in skip:
                setattr(parent, child_name, nf4_linear(child.weight, child.bias, compute_dtype))
                count += 1
    model.is_loaded_in_4bit = True
    return count


def build_causal_lm(model: str, *, method: str, dtype: torch.dtype, device: torch.device | str, seed: int) -> nn.Module:
    """A randomly initialised Llama-style causal LM for ``method`` "lora" (dense base in ``dtype``) or "qlora"
    (NF4 decoder linears computing in ``dtype``; embeddings, norms and head in ``dtype``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if method not in ("lora", "qlora"):
        raise ValueError(f"method must be 'lora' or 'qlora', not {method!r}")
    p = preset(model)
    config = LlamaConfig(
        hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        num_key_value_heads=p.num_key_value_heads,
        vocab_size=p.vocab_size,
        attention_bias=p.attention_bias,
        tie_word_embeddings=p.tie_word_embeddings,
        rope_theta=p.rope_theta,
        max_position_embeddings=131072,
        use_cache=False,
    )
    torch.manual_seed(seed)
    # Built directly on the target device in the target dtype: an 8B model never exists in fp32 on the host.
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if method == "qlora":
        quantize_linears(lm, compute_dtype=dtype)
    return lm
