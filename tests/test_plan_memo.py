"""The plan memo (fastlora.wiring.plan_memo): a patched layer reuses its last plan while the state it was read from holds,
and plans again after any change that could alter it. Each change below is made after a memoized call; the next
call must plan again and give PEFT's own forward's output (fp32: 1e-5 of the largest value, summation order only).
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import fastlora
from tests.conftest import Wrapper, lora_layer_model, peft_layer_model

TOLERANCE = 1e-5


@pytest.fixture
def planning(monkeypatch):
    """Counts ``call_plan`` calls of patched layers."""
    patch_module = sys.modules["fastlora.wiring.fused_forward"]
    calls = []
    real = patch_module.call_plan

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(patch_module, "call_plan", counted)
    return calls


def _layer(base="dense", adapters=((4, 8, 0.0, False),)):
    model = lora_layer_model(48, 40, base=base, dtype=torch.float32, bias=True, adapters=adapters).eval()
    report = fastlora.patch(model, backend="cpp")
    return model.base_model.model.lin, report


def _assert_peft(layer, x):
    got = layer(x)
    want = layer.forward.original(x)
    error = (got - want).abs().max().item() / want.abs().max().item()
    assert error <= TOLERANCE, error


def test_memoized_calls_do_not_plan_again(planning):
    layer, report = _layer()
    x = torch.randn(5, 48)
    for _ in range(4):
        _assert_peft(layer, x)
    # one plan for the first call; the PEFT reference calls go through PEFT's forward, not the plan
    assert len(planning) == 1 and report.fused_calls == 4


def _two_adapters():
    layer, report = _layer(adapters=((4, 8, 0.0, False), (2, 4, 0.0, False)))
    layer.set_adapter("default")
    return layer, report


CHANGES = {
    "set_adapter": lambda layer: layer.set_adapter("extra1"),
    "scale": lambda layer: layer.set_scale("default", 0.5),
    "scaling dict entry": lambda layer: layer.scaling.__setitem__("default", 3.0),
    "new lora_A weight": lambda layer: setattr(layer.lora_A["default"], "weight", nn.Parameter(torch.randn(4, 48))),
    "new lora_B module": lambda layer: layer.lora_B.__setitem__("default", nn.Linear(4, 40, bias=False)),
    "base weight data swapped": lambda layer: setattr(layer.base_layer.weight, "data", torch.randn(40, 48)),
    "new base bias": lambda layer: setattr(layer.base_layer, "bias", nn.Parameter(torch.randn(40), requires_grad=False)),
    "base bias removed": lambda layer: setattr(layer.base_layer, "bias", None),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_plans_again_and_matches_peft(planning, change):
    layer, _ = _two_adapters()
    x = torch.randn(3, 48)
    _assert_peft(layer, x)
    _assert_peft(layer, x)
    assert len(planning) == 1
    CHANGES[change](layer)
    _assert_peft(layer, x)
    assert len(planning) == 2


@pytest.mark.parametrize("change", ["disable", "merge", "requires_grad"])
def test_a_change_to_an_unfusable_state_falls_back_and_back(change):
    layer, report = _layer()
    x = torch.randn(3, 48)
    _assert_peft(layer, x)
    if change == "disable":
        layer.enable_adapters(False)
        _assert_peft(layer, x)
        layer.enable_adapters(True)
    elif change == "merge":
        layer.merge()
        _assert_peft(layer, x)
        layer.unmerge()
    else:
        layer.base_layer.weight.requires_grad_(True)
        with torch.no_grad():
            _assert_peft(layer, x)
        layer.base_layer.weight.requires_grad_(False)
    assert sum(report.fallback_calls.values()) == 1
    _assert_peft(layer, x)  # fused again, with a fresh plan
    assert report.fused_calls == 2


def test_train_eval_and_dropout_changes_plan_again(planning):
    """The dropout probability in effect (the module's p, and whether it trains) is part of the plan."""
    layer, _ = _layer(adapters=((4, 8, 0.25, False),))
    x = torch.randn(3, 48)
    _assert_peft(layer, x)  # eval: no dropout
    layer.train()
    layer(x)
    assert len(planning) == 2
    layer.lora_dropout["default"].p = 0.5
    layer(x)
    assert len(planning) == 3
    layer.eval()
    _assert_peft(layer, x)
    assert len(planning) == 4


def test_nf4_quant_state_rewritten_in_place_plans_again(planning):
    """An NF4 base whose (nested) absmax is rewritten in place: the plan and its resolved absmax are rebuilt."""
    layer, _ = _layer(base="nf4")
    x = torch.randn(3, 48)
    _assert_peft(layer, x)
    state = layer.base_layer.weight.quant_state
    with torch.no_grad():
        (state.state2.absmax if state.nested else state.absmax).mul_(1.5)
    _assert_peft(layer, x)
    assert len(planning) == 2


def test_autocast_calls_plan_every_time(planning):
    """Under autocast the plan casts W for the call: never memoized."""
    layer, _ = _layer()
    x = torch.randn(3, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            y = layer(x)
        want = layer.forward.original(x)
    assert y.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())  # bf16 rounding
    assert len(planning) == 3


def _both_active(**config):
    model = peft_layer_model(Wrapper(nn.Linear(48, 40)), ((4, 8, 0.0, False), (2, 4, 0.0, False)), **config).eval()
    report = fastlora.patch(model, backend="cpp")
    layer = model.base_model.model.lin
    assert layer.active_adapters == ["default", "extra1"]
    return layer, report


SECOND_ADAPTER_CHANGES = {
    "its scaling entry": lambda layer: layer.scaling.__setitem__("extra1", 3.0),
    "its lora_B module": lambda layer: layer.lora_B.__setitem__("extra1", nn.Linear(2, 40, bias=False)),
    "active list shortened in place": lambda layer: layer._active_adapter.pop(),
    "active list reordered": lambda layer: layer.set_adapter(["extra1", "default"]),
}


@pytest.mark.parametrize("change", list(SECOND_ADAPTER_CHANGES))
def test_several_active_adapters_are_memoized_and_watched(planning, change):
    """Two adapters summed in one call: memoized like one; a change to either (or to the active list, even in place)
    plans again and still equals PEFT."""
    layer, report = _both_active()
    x = torch.randn(6, 48)
    for _ in range(3):
        _assert_peft(layer, x)
    assert len(planning) == 1 and report.fused_calls == 3
    SECOND_ADAPTER_CHANGES[change](layer)
    _assert_peft(layer, x)
    assert len(planning) == 2


def test_memoized_plan_sees_in_place_parameter_updates(planning):
    """What an optimizer step does (A, B and lora_bias of both adapters updated in place) needs no new plan: the plan
    holds the parameters themselves, so the next call computes with the new values, as PEFT does."""
    layer, _ = _both_active(lora_bias=True)
    x = torch.randn(6, 48)
    _assert_peft(layer, x)
    with torch.no_grad():
        for name in ("default", "extra1"):
            layer.lora_A[name].weight.add_(torch.randn_like(layer.lora_A[name].weight))
            layer.lora_B[name].weight.add_(torch.randn_like(layer.lora_B[name].weight))
            layer.lora_B[name].bias.add_(torch.randn_like(layer.lora_B[name].bias))
    _assert_peft(layer, x)
    assert len(planning) == 1
