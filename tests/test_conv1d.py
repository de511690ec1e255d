"""LoRA over GPT-2's ``Conv1D`` (``fan_in_fan_out``: W stored [K, N]) is fused on every backend, reading W through
its transposed view (no copy): layer parity with unpatched PEFT (outputs, gradients of x, A, B, bias), a tiny GPT-2
trains like PEFT, adapter files are unchanged, and merge/unmerge/disable still work."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers.pytorch_utils import Conv1D

import fastlora
from fastlora import ops
from fastlora.formats.dropout import keep_mask
from fastlora.wiring import plan
from tests.conftest import Wrapper, patch_keeps_adapter_file, peft_layer_model, randomize_lora
from tests.test_int8 import (
    assert_dropout_matches_masked_reference,
    assert_half_precision_no_worse_than_peft,
    assert_triton_paths_match_reference,
)
from tests.test_layer_parity import CPU_BACKENDS, assert_patched_matches_peft_fp32, run
from tests.test_model_parity import STEPS, assert_triton_trains_like_torch, max_abs_diff, train

CASES = [(1, 33, 17), (7, 64, 45), (130, 70, 96)]  # (M, K, N): one token, odd sizes, more tokens than features


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def conv1d_layer_model(k: int, n: int, *, dtype=torch.float32, adapters=((4, 8, 0.0, False),)):
    """A PEFT model around one GPT-2 Conv1D ("lin", W [K, N]); ``adapters`` = (r, alpha, dropout, rslora)."""
    conv = Conv1D(n, k)
    with torch.no_grad():
        conv.weight.normal_(0.0, k**-0.5)
        conv.bias.normal_(0.0, 0.1)
    return peft_layer_model(Wrapper(conv.to(dtype)), adapters, fan_in_fan_out=True)


def float64_reference(model, x, dy, seeds=None):
    """The LoRA linear in float64 from the layer's own tensors (W = Conv1D weight transposed), given masks."""
    layer = model.base_model.model.lin
    base = layer.get_base_layer()
    x64 = x.double().detach().requires_grad_(True)
    y = x64 @ base.weight.double() + base.bias.double()
    for i, name in enumerate(layer.active_adapters):
        a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        p = layer.lora_dropout[name].p if isinstance(layer.lora_dropout[name], torch.nn.Dropout) else 0.0
        drop_x = x64
        if p > 0 and layer.training:
            drop_x = x64 * keep_mask(seeds[i], p, x.shape[0], x.shape[1]).double() / (1 - p)
        y = y + layer.scaling[name] * (drop_x @ a.T) @ b.T
    (gx,) = torch.autograd.grad(y, x64, dy.double())
    return y.detach(), gx


def test_plan_passes_the_transposed_view_not_a_copy():
    model = conv1d_layer_model(40, 24)
    layer = model.base_model.model.lin
    assert layer.fan_in_fan_out and plan.structural_reason(layer) is None
    step = plan.call_plan(layer, "cpu", torch.randn(3, 40), (), {})
    weight = step[1].weight
    conv_weight = layer.get_base_layer().weight
    assert weight.shape == (24, 40) and weight.stride() == (1, 24)
    assert weight.data_ptr() == conv_weight.data_ptr() and step[1].out_features == 24


@pytest.mark.parametrize("m,k,n", CASES)
@pytest.mark.parametrize("n_adapters", [1, 2])
def test_fp32_parity_with_peft(m, k, n, n_adapters, backend):
    """fp32 end to end (Conv1D's addmm vs the fused op): only the summation order differs, 1e-5 relative with the
    floor scaled to each tensor's largest value."""
    adapters = ((4, 8, 0.0, False), (3, 5, 0.0, True))[:n_adapters]
    model = conv1d_layer_model(k, n, adapters=adapters)
    model.base_model.model.lin.get_base_layer().bias.requires_grad_(True)
    assert_patched_matches_peft_fp32(model, backend, torch.randn(m, k), torch.randn(m, n), 2 + 2 * n_adapters)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", CASES[1:])
def test_half_precision_no_worse_than_peft(dtype, m, k, n, backend):
    """A half-precision Conv1D: PEFT rounds the base output and the LoRA term separately, fastlora once; against
    float64 on the same inputs fastlora's error may exceed PEFT's by at most half an output ulp and stays within
    2 ulps. Adapter gradients (fp32 in both, from half-precision x and dy): 1e-3 relative, floor at the tensor's
    scale (Triton's TF32 LoRA dots: 2^-10)."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 tl.dot is wrong (triton#11584); bf16 runs in the GPU tests")
    model = conv1d_layer_model(k, n, dtype=dtype, adapters=((4, 8, 0.0, False), (2, 4, 0.0, False)))
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    y_peft, g_peft = run(model, x, dy)
    y64, gx64 = float64_reference(model, x, dy)
    fastlora.patch(model, backend=backend)
    y, g = run(model, x, dy)
    assert y.dtype == y_peft.dtype == dtype
    assert_half_precision_no_worse_than_peft(y, g, y_peft, g_peft, y64, gx64, dtype)


def test_dropout_matches_masked_reference(backend):
    """Training-mode dropout with fastlora's own masks: exact against float64 with those masks."""
    model = conv1d_layer_model(70, 40, adapters=((4, 8, 0.3, False), (2, 2, 0.1, False)))
    assert_dropout_matches_masked_reference(model, backend, float64_reference, m=33)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.interpreter
def test_triton_paths_strided_weight(path, dtype):
    """Both Triton paths on a dense W given as a transposed view (strides (1, N), as Conv1D's) against the
    reference ops."""
    if ops.backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("needs TRITON_INTERPRET=1")
    weight = torch.randn(70, 45).to(dtype).T
    assert weight.stride() == (1, 45)
    assert_triton_paths_match_reference(weight, None, dtype, path)


# ---- a tiny GPT-2 ------------------------------------------------------------------------------------------------

TINY_GPT2 = dict(
    n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
)
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # every Conv1D: attention in/out, MLP in/out
GPT2_LORA_LAYERS = 2 * 4


def tiny_gpt2_peft(seed: int = 0, dropout: float = 0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=GPT2_TARGETS, fan_in_fan_out=True)
    model = get_peft_model(model, config)
    randomize_lora(model, std=0.05)
    return model


@pytest.mark.parametrize("backend_name", ["torch", "cpp"])
def test_gpt2_training_matches_peft(backend_name):
    """10 AdamW steps of a tiny fp32 GPT-2 with LoRA on every Conv1D: per-step losses as PEFT's (fp32, only the
    summation order differs: 1e-4 on a loss of ~4.9 leaves room for AdamW amplifying rounding over 10 steps)."""
    if ops.backends.unavailable_reason(backend_name, "cpu") is not None:
        pytest.skip(f"{backend_name} backend unavailable")
    data = [torch.randint(0, 128, (2, 24)) for _ in range(2)]
    batches = [data[i % 2] for i in range(STEPS)]
    reference, patched = tiny_gpt2_peft(), tiny_gpt2_peft()
    report = fastlora.patch(patched, backend=backend_name)
    assert len(report.patched) == GPT2_LORA_LAYERS and not report.skipped
    ref_losses, losses = train(reference, batches), train(patched, batches)
    assert report.fused_calls == GPT2_LORA_LAYERS * STEPS and not report.fallback_calls
    diff = max_abs_diff(ref_losses, losses)
    print(f"GPT-2 fp32 per-step losses: PEFT {ref_losses}\n fastlora {losses}\n max |diff| {diff:.2e}")
    assert diff < 1e-4
    assert losses[-1] < losses[0]


@pytest.mark.interpreter
def test_gpt2_triton_training_matches_torch_backend():
    """The Triton kernels (under TRITON_INTERPRET=1) read the Conv1D weights through their strides and train the
    tiny GPT-2 like the torch reference backend: same dropout masks, fp32 IEEE dots: 1e-4 over 3 steps."""

    def patched(backend):
        model = tiny_gpt2_peft(dropout=0.1)
        return model, fastlora.patch(model, backend=backend)

    assert_triton_trains_like_torch(patched, GPT2_LORA_LAYERS, "GPT-2")


def test_gpt2_adapter_files_merge_and_disable(tmp_path):
    """On the patched GPT-2: adapter files are byte for byte PEFT's, disable_adapter gives the base model, and
    merge_adapter/unmerge_adapter and merge_and_unload (PEFT transposes B·A for fan_in_fan_out) give the fused
    output."""
    model = tiny_gpt2_peft()
    report = patch_keeps_adapter_file(model, tmp_path, "torch")
    model.eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
        model.merge_adapter()
        merged_in_place = model(input_ids=ids).logits
        model.unmerge_adapter()
        unmerged = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    layers = GPT2_LORA_LAYERS
    assert report.fused_calls == 2 * layers and not report.skipped
    assert report.fallback_calls["adapters disabled"] == layers and report.fallback_calls["adapters merged"] == layers
    assert (disabled - fused).abs().max() > 1e-2  # the adapters matter
    # fp32 merge: only the rounding of W + B·A (and of W after unmerging) differs.
    for other in (merged_in_place, unmerged, merged):
        torch.testing.assert_close(other, fused, rtol=1e-5, atol=1e-4)
