"""Issue 21 item 1: the backend and device are resolved per call from the input's device, not fixed by ``patch``.
A model patched on meta and materialised afterwards (``to_empty``, as FSDP2's meta init and ``init_empty_weights``
do) runs fused calls; the per-device choice is made on the first call on that device. (CPU only here: moving to
CUDA after patching is the same code path with device type "cuda", which only a GPU can confirm.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlora
from peft import LoraConfig, get_peft_model
from tests.conftest import randomize_lora


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_patch_on_meta_then_materialise_runs_fused(backend):
    with torch.device("meta"):
        model = get_peft_model(_mlp(), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    report = fastlora.patch(model, backend=backend)
    assert sorted(report.patched) == ["base_model.model.0", "base_model.model.2"] and not report.skipped, report
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    randomize_lora(model)
    reference = copy.deepcopy(model)
    fastlora.unpatch(reference)
    x = torch.randn(7, 12, requires_grad=True)
    y = model(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference(x_ref)
    y_ref.square().sum().backward()
    assert report.fused_calls == 2 and not report.fallback_calls, report
    # fp32, K <= 20: summation order only
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_backend_is_resolved_per_call_not_at_patch_time(monkeypatch):
    """Triton serves CPU tensors only under TRITON_INTERPRET=1: patched while it is set, the first call made after it
    is unset finds the backend unavailable for CPU and runs PEFT with that reason (a patch-time backend would have
    run Triton regardless). A meta input is a reported fallback too, and the CPU layer stays fused."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = get_peft_model(_mlp(), LoraConfig(r=4, target_modules=["0"]))
    report = fastlora.patch(model, backend="triton")
    assert report.patched == {"base_model.model.0": "triton"}
    monkeypatch.delenv("TRITON_INTERPRET")
    x = torch.randn(3, 12)
    model(x)
    (reason,) = report.fallback_calls
    assert reason.startswith("backend 'triton' cannot run on cpu") and report.fused_calls == 0, report

    with torch.device("meta"):
        model = get_peft_model(_mlp(), LoraConfig(r=4, target_modules=["0"]))
    report = fastlora.patch(model, backend="torch")
    assert model(torch.empty(3, 12, device="meta")).shape == (3, 6)  # PEFT's forward on meta
    assert report.fused_calls == 0 and dict(report.fallback_calls) == {"input on the meta device (nothing to compute)": 1}
    model.to_empty(device="cpu")
    model(x)
    assert report.fused_calls == 1 and model.base_model.model[0].forward._backends == {"cpu": "torch"}
