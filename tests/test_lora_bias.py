"""``lora_bias=True``: B's bias, scaled by the adapter's scale as PEFT scales it, joins the fused bias term; the
patched layer matches PEFT's outputs and the gradients of x, A, B and B's bias, on every backend."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import fastlora
from tests.conftest import Wrapper, nf4_linear, randomize_lora
from tests.test_layer_parity import CPU_BACKENDS, assert_close_fp32, run


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def lora_bias_model(k, n, *, base="dense", dtype=torch.float32, bias=True, second=False):
    lin = nn.Linear(k, n, bias=bias).to(dtype) if base == "dense" else nf4_linear(k, n, bias=bias, compute_dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=12, lora_bias=True, target_modules=["lin"])
    model = get_peft_model(Wrapper(lin, base != "dense"), config)
    if second:  # a second active adapter without lora_bias, rslora-scaled
        model.add_adapter("plain", LoraConfig(r=3, lora_alpha=5, use_rslora=True, target_modules=["lin"]))
        model.base_model.set_adapter(["default", "plain"])
    randomize_lora(model)  # lora_B's bias too (PEFT initializes it to zero)
    return model


def pair(**kwargs):
    state = torch.random.get_rng_state()
    reference = lora_bias_model(**kwargs)
    torch.random.set_rng_state(state)
    return reference, lora_bias_model(**kwargs)


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("bias,second", [(True, False), (False, True)])
def test_lora_bias_matches_peft_fp32(backend, base, bias, second):
    reference, patched = pair(k=70, n=45, base=base, bias=bias, second=second)
    report = fastlora.patch(patched, backend=backend)
    x, dy = torch.randn(2, 7, 70), torch.randn(2, 7, 45)
    y_ref, g_ref = run(reference, x, dy)
    y, g = run(patched, x, dy)
    assert report.fused_calls == 1 and not report.fallback_calls, report
    assert any(key.endswith("lora_B.default.bias") for key in g)
    # fp32: summation order only (see tests/test_layer_parity.py).
    assert_close_fp32(y, y_ref, "y")
    assert g.keys() == g_ref.keys()
    for key in g_ref:
        assert_close_fp32(g[key], g_ref[key], key)


def test_lora_bias_bf16_matches_peft():
    reference, patched = pair(k=64, n=48, dtype=torch.bfloat16)
    fastlora.patch(patched, backend="cpp")
    x, dy = torch.randn(3, 64).to(torch.bfloat16), torch.randn(3, 48).to(torch.bfloat16)
    y_ref, g_ref = run(reference, x, dy)
    y, g = run(patched, x, dy)
    # bf16 output: PEFT rounds the base output and the fp32 LoRA output to bf16 before adding them, fastlora rounds
    # once; ~1 ulp (2^-8) of the output each, a few for gradients summed over rows (fp32 adapter gradients).
    for key, expected in {"y": y_ref, **g_ref}.items():
        actual = y if key == "y" else g[key]
        err = (actual.float() - expected.float()).norm() / expected.float().norm()
        assert err < 2.0**-7, f"{key}: relative error {err:.2e}"


def test_lora_bias_in_mixed_batch_is_reported():
    model = lora_bias_model(32, 16).eval()
    report = fastlora.patch(model, backend="torch")
    with torch.no_grad():
        model(torch.randn(2, 32), adapter_names=["default", "__base__"])
    assert report.fallback_calls == {"lora_bias in an adapter_names batch": 1}
