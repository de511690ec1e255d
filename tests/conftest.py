"""Shared builders for tests: tiny PEFT LoRA/QLoRA models from configs with random weights (no downloads)."""

from __future__ import annotations

import logging
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


def _use_portable_bnb_dequantize_if_cpu_kernel_is_wrong() -> None:
    """bitsandbytes 0.50's AVX512 CPU kernel for ``dequantize_4bit`` is wrong when blocks cross rows (even K with
    K % blocksize != 0, e.g. the tiny Llama's K=96 down_proj): seen on an AVX512-BF16 Xeon, not on AVX2 machines.
    PEFT's QLoRA reference would then compute with a wrong W. Where a probe shows the bug, the tests use
    bitsandbytes' own portable implementation of the same op (its default backend) instead of that kernel."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    def portable(A, absmax, blocksize, quant_type, shape, dtype):
        packed = A if A.dtype == torch.uint8 else A.view(torch.uint8)
        return _dequantize_4bit_compute(packed.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)

    probe = torch.randn(4, 160, generator=torch.Generator().manual_seed(0))
    packed, state = bnbF.quantize_4bit(probe, blocksize=64, quant_type="nf4")
    kernel = bnbF.dequantize_4bit(packed, state)
    if not torch.equal(kernel, portable(packed, state.absmax, 64, "nf4", state.shape, torch.float32)):
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", portable)
        BNB_CPU_DEQUANTIZE_WORKAROUND.append("bitsandbytes' CPU dequantize_4bit kernel replaced by its portable implementation")


# Run-time path choices go to a file of this test process, not the user's ~/.cache/fastlora/tuning.json (tests that
# exercise the cache set their own).
os.environ.setdefault("FASTLORA_TUNING_CACHE", os.path.join(tempfile.mkdtemp(prefix="fastlora-tests-"), "tuning.json"))

#: Non-empty when :func:`_use_portable_bnb_dequantize_if_cpu_kernel_is_wrong` found bitsandbytes' CPU kernel wrong here.
BNB_CPU_DEQUANTIZE_WORKAROUND: list[str] = []
_use_portable_bnb_dequantize_if_cpu_kernel_is_wrong()


def pytest_report_header(config):
    return BNB_CPU_DEQUANTIZE_WORKAROUND or None


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


@pytest.fixture(autouse=True)
def _no_internal_errors(request):
    """An internal error in fastlora falls back to PEFT's forward for the user (FusedForward's guard), but
    must fail the test that sees it, so bugs stay loud in CI. Tests that inject one are marked
    ``internal_error_expected``."""
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "fastlora_internal_error"):
                seen.append(record.getMessage())

    handler = Catch(logging.ERROR)
    logger = logging.getLogger("fastlora")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)
    if seen and "internal_error_expected" not in request.keywords:
        pytest.fail("fastlora internal error fallback: " + "; ".join(seen), pytrace=False)


def without_bnb_cpu_repack(model: nn.Module) -> nn.Module:
    """Turn off bitsandbytes' repacking of 4-bit weights for its AVX512-BF16 CPU inference kernel (done on the first
    eval-mode no-grad call, where the CPU has AVX512-BF16): in bitsandbytes 0.50 it crashes when K % blocksize != 0
    (the tiny Llama's K=96), so PEFT's own eval forward could not run there. Returns ``model``."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


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
    return without_bnb_cpu_repack(lin)


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
    return peft_layer_model(wrapper, adapters)


def peft_layer_model(wrapper: nn.Module, adapters: tuple, **config) -> nn.Module:
    """PEFT around ``wrapper``'s layer "lin": ``adapters`` = (r, alpha, dropout, rslora) per adapter, all active,
    with random A and B; ``config`` goes to every ``LoraConfig`` (e.g. ``fan_in_fan_out=True``)."""
    names = []
    model = None
    for i, (r, alpha, p, rslora) in enumerate(adapters):
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, use_rslora=rslora, target_modules=["lin"], **config)
        name = "default" if i == 0 else f"extra{i}"
        if model is None:
            model = get_peft_model(wrapper, cfg)
        else:
            model.add_adapter(name, cfg)
        names.append(name)
    model.base_model.set_adapter(names)
    randomize_lora(model)
    return model


def patch_keeps_adapter_file(model: nn.Module, tmp_path, backend: str):
    """Patch ``model`` with ``backend`` and assert its saved adapter file is PEFT's, byte for byte, from before
    patching; returns the ``PatchReport``. Usage: ``report = patch_keeps_adapter_file(model, tmp_path, "torch")``"""
    import fastlora

    model.save_pretrained(tmp_path / "peft")
    report = fastlora.patch(model, backend=backend)
    model.save_pretrained(tmp_path / "patched")
    name = "adapter_model.safetensors"
    assert (tmp_path / "patched" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes()
    return report


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
        return without_bnb_cpu_repack(AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype))


def tiny_llama_peft(kind: str, *, r: int = 8, dropout: float = 0.0, seed: int = 0, dtype=torch.bfloat16):
    """:func:`tiny_llama_base` with LoRA (random A and B) on all linear layers."""
    model = tiny_llama_base(kind, seed=seed, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear"))
    randomize_lora(model, std=0.05)
    return model
