"""Bad input gets a clear error or a reported no-op, and the model is never left changed or half-patched."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import fastlora
from fastlora import BackendUnavailable
from fastlora.wiring.fused_forward import FusedForward
from fastlora.wiring.patch import is_patched
from tests.conftest import lora_layer_model, tiny_llama_peft


def _forwards(model):
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def test_non_peft_model_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4))
    before = _forwards(model)
    with pytest.raises(ValueError, match="no PEFT LoRA layers.*get_peft_model"):
        fastlora.patch(model)
    assert _forwards(model) == before
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastlora.patch("not a model")


def test_unknown_backend_is_a_clear_error_before_any_change():
    model = lora_layer_model(8, 8)
    before = _forwards(model)
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        fastlora.patch(model, backend="cuda-magic")
    assert _forwards(model) == before


def test_backend_that_cannot_serve_the_device_is_an_error_before_any_change(monkeypatch):
    # The Triton backend runs CPU tensors only in the interpreter: asking for it on a CPU model is an error.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_llama_peft("dense", dtype=torch.float32)
    before = _forwards(model)
    with pytest.raises(BackendUnavailable, match="triton.*cpu"):
        fastlora.patch(model, backend="triton")
    assert _forwards(model) == before


def test_environment_variable_selects_backend(monkeypatch):
    model = lora_layer_model(8, 8)
    monkeypatch.setenv("FASTLORA_BACKEND", "torch")
    report = fastlora.patch(model)
    assert set(report.patched.values()) == {"torch"}
    fastlora.unpatch(model)
    monkeypatch.setenv("FASTLORA_BACKEND", "nonsense")
    with pytest.raises(BackendUnavailable, match="unknown backend 'nonsense'"):
        fastlora.patch(model)
    assert not is_patched(model.base_model.model.lin)


def test_patching_twice_changes_nothing_and_says_so(caplog):
    model = tiny_llama_peft("dense", dtype=torch.float32)
    first = fastlora.patch(model, backend="torch")
    installed = _forwards(model)
    with caplog.at_level(logging.INFO, logger="fastlora"):
        second = fastlora.patch(model, backend="torch")
    assert _forwards(model) == installed
    assert not second.changed and len(second.already_patched) == 14 and not second.patched
    assert "already patched" in str(second) and "nothing changed" in str(second)
    assert any("already patched" in r.getMessage() for r in caplog.records)
    assert first.changed


def test_failure_midway_rolls_back(monkeypatch):
    model = tiny_llama_peft("dense", dtype=torch.float32)
    before = _forwards(model)
    built = []
    original_init = FusedForward.__init__

    def failing_init(self, *args, **kwargs):
        if len(built) == 5:
            raise RuntimeError("injected failure")
        built.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(FusedForward, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="injected"):
        fastlora.patch(model, backend="torch")
    assert _forwards(model) == before
    assert not any(is_patched(m) for m in model.modules())


def test_unsupported_layers_are_reported_with_reasons(caplog):
    """An Embedding LoRA layer stays on PEFT (the report and the log say why); GPT-2's Conv1D next to it is fused."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    model = get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn", "wte"], fan_in_fan_out=True))
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        report = fastlora.patch(model, backend="torch")
    (skipped, reason), = report.skipped.items()
    assert skipped.endswith("wte") and "Embedding" in reason
    assert list(report.patched) == ["base_model.model.transformer.h.0.attn.c_attn"]
    assert any("left on PEFT" in r.getMessage() for r in caplog.records)


def test_runtime_fallback_is_logged_once_per_reason(caplog):
    model = lora_layer_model(8, 8)
    report = fastlora.patch(model, backend="torch")
    x = torch.randn(2, 8)
    with caplog.at_level(logging.WARNING, logger="fastlora"):
        with model.disable_adapter():
            model(x)
            model(x)
    assert report.fallback_calls["adapters disabled"] == 2
    assert sum("adapters disabled" in r.getMessage() for r in caplog.records) == 1


def test_input_dtype_mismatch_falls_back_to_peft():
    model = lora_layer_model(8, 8, dtype=torch.float32)
    report = fastlora.patch(model, backend="torch")
    with pytest.raises(RuntimeError):  # PEFT's own forward raises for a bf16 input on an fp32 layer
        model(torch.randn(2, 8, dtype=torch.bfloat16))
    assert "differs from base weight dtype" in next(iter(report.fallback_calls))


def test_dora_beside_another_active_adapter_falls_back_with_its_reason():
    from peft import LoraConfig, get_peft_model

    from tests.conftest import Wrapper

    model = get_peft_model(Wrapper(nn.Linear(16, 8)), LoraConfig(r=4, use_dora=True, target_modules=["lin"]))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["lin"]))
    model.base_model.set_adapter(["default", "plain"])
    x = torch.randn(3, 16)
    with torch.no_grad():
        expected = model(x)
    report = fastlora.patch(model, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)  # PEFT's own forward
    assert report.fallback_calls == {"DoRA with other active adapters": 1} and report.fused_calls == 0


@pytest.mark.parametrize("which", ["a", "b", "both"])
def test_bdlora_layer_runs_peft_forward_with_its_reason(which):
    """Issue 20 item 1: BD-LoRA's block-diagonal lora_A/lora_B (no ``bias`` attribute) made every call raise."""
    import copy

    from peft import BdLoraConfig, LoraConfig, get_peft_model

    bd = {"a": dict(target_modules_bd_a=["0"]), "b": dict(target_modules_bd_b=["0"])}.get(which)
    bd = bd or dict(target_modules_bd_a=["0"], target_modules_bd_b=["2"])  # PEFT refuses both on one module
    base = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 2))
    targets = ["0", "2"] if which == "both" else ["0"]
    model = get_peft_model(base, LoraConfig(r=4, target_modules=targets, use_bdlora=BdLoraConfig(nblocks=2, **bd)))
    reference = copy.deepcopy(model)
    report = fastlora.patch(model, backend="torch")
    x = torch.randn(3, 10, requires_grad=True)
    y = model(x)
    y.square().sum().backward()
    assert torch.equal(y, reference(x))  # PEFT's own forward ran
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert list(report.fallback_calls) == ["LoRA variant BdLoraLinearVariant"], report
