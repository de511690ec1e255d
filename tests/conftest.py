"""Shared builders for tests: tiny PEFT LoRA/QLoRA models from configs with random weights (no downloads)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from torch import nn

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from peft import LoraConfig, get_peft_model

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random inputs every run, but reproducible from the printed seed when a test fails.
    seed = int.from_bytes(os.urandom(4), "little") % (2**31)
    torch.manual_seed(seed)
    print(f"torch seed {seed}")  # shown with a failure's captured output
    yield


class Wrapper(nn.Module):
    """A one-layer model that get_peft_model can target ("lin")."""

    def __init__(self, lin: nn.Module, loaded_in_4bit: bool = False):
        super().__init__()
        self.lin = lin
        # PEFT picks lora.bnb.Linear4bit only for models flagged as loaded in 4 bit.
        self.is_loaded_in_4bit = loaded_in_4bit

    def forward(self, x):
        return self.lin(x)


def nf4_linear(k: int, n: int, *, bias: bool, compute_dtype, blocksize: int = 64, nested: bool = True):
    """A bitsandbytes Linear4bit (NF4) with random weights, quantized on the CPU."""
    lin = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=nested)
    packed, state = bnbF.quantize_4bit(torch.randn(n, k) / k**0.5, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(
        packed, requires_grad=False, quant_state=state, bnb_quantized=True, quant_type="nf4", blocksize=blocksize,
        compress_statistics=nested,
    )
    if bias:
        lin.bias = nn.Parameter(torch.randn(n) * 0.1, requires_grad=False)
    return lin


def randomize_lora(model: nn.Module, std: float = 0.1) -> None:
    """PEFT initialises B to zero; give every adapter weight random values so all gradients are non-trivial."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, std)


def lora_layer_model(
    k: int,
    n: int,
    *,
    base: str = "dense",
    dtype=torch.float32,
    bias: bool = True,
    adapters: tuple = ((4, 8, 0.0, False),),
    blocksize: int = 64,
    nested: bool = True,
):
    """A PEFT model around one linear layer; ``adapters`` = (r, alpha, dropout, rslora) per adapter, all active."""
    if base == "dense":
        lin = nn.Linear(k, n, bias=bias).to(dtype)
        wrapper = Wrapper(lin)
    else:
        wrapper = Wrapper(nf4_linear(k, n, bias=bias, compute_dtype=dtype, blocksize=blocksize, nested=nested), True)
    names = []
    model = None
    for i, (r, alpha, p, rslora) in enumerate(adapters):
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, use_rslora=rslora, target_modules=["lin"])
        name = "default" if i == 0 else f"extra{i}"
        if model is None:
            model = get_peft_model(wrapper, cfg)
        else:
            model.add_adapter(name, cfg)
        names.append(name)
    model.base_model.set_adapter(names)
    randomize_lora(model)
    return model


def tiny_llama_base(kind: str, *, seed: int = 0, dtype=torch.bfloat16):
    """A tiny Llama without adapters. kind: "qlora" (NF4 double quant through from_pretrained with
    BitsAndBytesConfig, compute ``dtype``) or "dense" (base in ``dtype``). The same seed gives the same weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**TINY_LLAMA)
    if kind != "qlora":
        return AutoModelForCausalLM.from_config(config).to(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp)
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype)


def tiny_llama_peft(kind: str, *, r: int = 8, dropout: float = 0.0, seed: int = 0, dtype=torch.bfloat16):
    """:func:`tiny_llama_base` with LoRA (random A and B) on all linear layers."""
    model = tiny_llama_base(kind, seed=seed, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear"))
    randomize_lora(model, std=0.05)
    return model
