"""Issue 20, "a guard around everything fastlora does per call": an unexpected exception in fastlora's per-call code
(plan, memo, the fused op) runs PEFT's forward instead, reported as an internal error; the caller's own errors (a
wrong shape) still raise as PEFT raises them."""

from __future__ import annotations

import copy
import importlib
import logging
import re

import pytest
import torch

import fastlora
from fastlora.wiring.plan_memo import PlanMemo
from tests.conftest import lora_layer_model

LAYER = "base_model.model.lin"
patch_module = importlib.import_module("fastlora.wiring.fused_forward")  # where the layer call looks them up


def _grads(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    return y, [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


def _boom(*args, **kwargs):
    raise RuntimeError("injected fault\nsecond line")


@pytest.mark.internal_error_expected
@pytest.mark.parametrize("where", ["plan", "memo", "fused op"])
def test_fault_in_fastlora_runs_peft_and_is_reported_once(monkeypatch, caplog, where):
    model = lora_layer_model(24, 40, adapters=((4, 8, 0.0, False),))
    reference = copy.deepcopy(model)
    report = fastlora.patch(model, backend="torch")
    x = torch.randn(5, 24)
    if where == "memo":
        model(x)  # the first call captures the plan memo; the next ones ask it
        monkeypatch.setattr(PlanMemo, "holds", _boom)
    else:
        monkeypatch.setattr(patch_module, "call_plan" if where == "plan" else "lora_linear", _boom)
    fused_before = report.fused_calls
    with caplog.at_level(logging.ERROR, logger="fastlora"), pytest.warns(RuntimeWarning, match="internal error"):
        y, grads = _grads(model, x)
    y_ref, grads_ref = _grads(reference, x)
    # PEFT's own forward and backward ran: bit-identical to the unpatched model
    assert torch.equal(y, y_ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref))
    reason = "internal error: RuntimeError: injected fault"
    assert report.internal_errors == {LAYER: reason}
    assert report.fallback_calls[reason] == 1 and report.fused_calls == fused_before
    logged = [r for r in caplog.records if getattr(r, "fastlora_internal_error", None) == reason]
    assert len(logged) == 1 and logged[0].exc_info is not None and LAYER in logged[0].getMessage()
    # Later calls run PEFT without asking fastlora again (the layer is off for good), logged once only.
    monkeypatch.undo()
    model(x)
    assert report.fallback_calls[reason] == 2 and report.fused_calls == fused_before
    assert len([r for r in caplog.records if hasattr(r, "fastlora_internal_error")]) == 1
    assert "internal error" in str(report)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_callers_shape_error_raises_as_peft_raises_it(backend):
    model = lora_layer_model(24, 40)
    reference = copy.deepcopy(model)
    report = fastlora.patch(model, backend=backend)
    wrong = torch.randn(5, 23)
    with pytest.raises(RuntimeError) as peft_error:
        reference(wrong)
    with pytest.raises(type(peft_error.value), match=re.escape(str(peft_error.value))):
        model(wrong)
    assert not report.internal_errors and not report.fallback_calls
    model(torch.randn(5, 24))  # the layer stays fused
    assert report.fused_calls >= 1 and not report.fallback_calls
