"""A tiny Llama loaded with ``load_in_8bit=True`` (bitsandbytes LLM.int8 on CPU) plus LoRA trains like PEFT when
patched: per-step losses over 10 AdamW steps without dropout (fp32 tolerance) and with dropout 0.05 (masks differ
from PEFT's: compared with the spread between two PEFT runs), every layer fused, adapter files unchanged."""

from __future__ import annotations

import tempfile

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fastlora
from fastlora import ops
from tests.conftest import TINY_LLAMA, patch_keeps_adapter_file, randomize_lora
from tests.test_model_parity import STEPS, assert_triton_trains_like_torch, max_abs_diff, train

LORA_LAYERS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)


def tiny_llama_8bit_peft(*, dropout: float = 0.0, seed: int = 0, dtype=torch.float32):
    """The tiny Llama of tests.conftest saved and reloaded with ``BitsAndBytesConfig(load_in_8bit=True)``, with
    LoRA (random A and B) on all linear layers. The same seed gives the same weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)).save_pretrained(tmp)
        quant = BitsAndBytesConfig(load_in_8bit=True)
        base = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear"))
    randomize_lora(model, std=0.05)
    return model


def _batches():
    # Two batches seen in turn: a signal the model can fit in 10 steps, so the losses must fall.
    data = [torch.randint(0, 128, (2, 24)) for _ in range(2)]
    return [data[i % 2] for i in range(STEPS)]


def _patched(backend: str, dropout: float):
    if ops.backends.unavailable_reason(backend, "cpu") is not None:
        pytest.skip(f"{backend} backend unavailable")
    model = tiny_llama_8bit_peft(dropout=dropout)
    report = fastlora.patch(model, backend=backend)
    assert len(report.patched) == LORA_LAYERS and not report.skipped
    return model, report


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_8bit_training_matches_peft(backend):
    """No dropout, fp32 compute: in training mode on CPU PEFT's 8-bit layers dequantize W (within one fp32 ulp of
    bitsandbytes' own dequantization, which fastlora reproduces) and multiply in fp32, so the runs differ by fp32
    rounding only: 1e-4 on a loss of ~4.9, room for 10 AdamW steps amplifying it."""
    batches = _batches()
    model, report = _patched(backend, 0.0)
    ref_losses, losses = train(tiny_llama_8bit_peft(), batches), train(model, batches)
    assert report.fused_calls == LORA_LAYERS * STEPS and not report.fallback_calls
    diff = max_abs_diff(ref_losses, losses)
    print(f"8-bit fp32 per-step losses: PEFT {ref_losses}\n fastlora {losses}\n max |diff| {diff:.2e}")
    assert diff < 1e-4
    assert losses[-1] < losses[0]


def test_8bit_training_with_dropout_matches_peft_statistically():
    """Dropout 0.05: fastlora's masks are not PEFT's, so the losses differ by dropout noise. Two PEFT runs with
    different masks (different RNG draws) measure that noise; fastlora must stay within 3x of it (plus fp32
    rounding), and train. A wrong keep scale or a missing term would move the losses far more."""
    batches = _batches()
    model, report = _patched("cpp" if ops.backends.unavailable_reason("cpp", "cpu") is None else "torch", 0.05)
    runs = []
    for seed, run_model in enumerate((tiny_llama_8bit_peft(dropout=0.05), tiny_llama_8bit_peft(dropout=0.05), model)):
        torch.manual_seed(seed + 1)  # the dropout draws of this run (the builder reseeds for the weights)
        runs.append(train(run_model, batches))
    peft_a, peft_b, ours = runs
    assert report.fused_calls == LORA_LAYERS * STEPS and not report.fallback_calls
    noise = max_abs_diff(peft_a, peft_b)
    diff = max(max_abs_diff(ours, peft_a), max_abs_diff(ours, peft_b))
    print(f"dropout 0.05: PEFT vs PEFT {noise:.2e}, fastlora vs PEFT {diff:.2e}")
    assert noise > 0  # the masks do differ between the PEFT runs
    assert diff < 3 * noise + 1e-4
    assert ours[-1] < ours[0]


def test_8bit_adapter_files_identical_and_merge_and_unload(tmp_path):
    """The patched 8-bit model saves PEFT's adapter file byte for byte, and PEFT's merge_and_unload (dequantize,
    add B·A, requantize to int8) still works on it."""
    model = tiny_llama_8bit_peft()
    report = patch_keeps_adapter_file(model, tmp_path, "torch")
    model.train()  # bitsandbytes' training-mode path on CPU: dequantize + F.linear, as fastlora computes
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    assert report.fused_calls == LORA_LAYERS and not report.fallback_calls
    # Requantizing W + B·A to int8 moves each element by up to half a step (SCB/254 of its row): measured ~1% of
    # the logits' scale over three seeds; 5% allowed.
    torch.testing.assert_close(merged, fused, rtol=0, atol=0.05 * fused.abs().max().item())


@pytest.mark.interpreter
def test_8bit_triton_training_matches_torch_backend():
    """The Triton kernels (under TRITON_INTERPRET=1) train the 8-bit Llama like the torch reference backend:
    same dropout seeds and masks, fp32 compute (IEEE dots), so only summation order differs: 1e-4 over 3 steps."""
    assert_triton_trains_like_torch(lambda backend: _patched(backend, 0.1), LORA_LAYERS, "8-bit")
