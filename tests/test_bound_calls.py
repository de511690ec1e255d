"""Bound calls (fastlora.functions.lora.bound_call, kept by fastlora.wiring.plan_memo): a patched layer's repeated calls on
a native graph skip the plan and the wrappers. They must compute exactly what the unbound call computes (same op, same
arguments, same dropout draws: compared bitwise, outputs and gradients), and stop applying whenever the graph choice
could differ: another shape, ``requires_grad`` on x or an adapter, a forced path or a tuning reset.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastlora
from fastlora import tuning
from fastlora.backends import cpp
from tests.conftest import lora_layer_model

HALF_GRAPH = "native_half" if cpp.native_half_gemm(torch.bfloat16) else "native"
CASES = [  # base, dtype, x's shape, dropout, the C++ graph
    ("dense", torch.float32, (7, 48), 0.0, "native"),
    ("dense", torch.float32, (2, 5, 48), 0.25, "native"),
    ("nf4", torch.float32, (3, 48), 0.1, "native"),  # double-quantized absmax: resolved per call
    ("dense", torch.bfloat16, (2, 9, 48), 0.0, HALF_GRAPH),
    ("nf4", torch.bfloat16, (17, 48), 0.0, HALF_GRAPH),
    ("nf4", torch.bfloat16, (5, 48), 0.2, "native"),
]


def _force(monkeypatch, graph: str) -> None:
    """Layer calls forced onto ``graph`` (run-time timing could pick a graph that does not bind)."""
    monkeypatch.setenv(tuning.PATH_ENV, f"lora_layer={graph},lora_layer_inference={graph}")
    tuning.reset()


@pytest.fixture(autouse=True)
def _fresh_decisions():
    yield
    tuning.reset()  # after monkeypatch has put FASTLORA_PATH back


def _patched(base: str, dtype: torch.dtype, dropout: float):
    model = lora_layer_model(48, 40, base=base, dtype=dtype, adapters=((8, 16, dropout, False),)).train()
    for param in model.parameters():  # random B, so that every gradient is non-zero
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.1)
    return model


def _step(model, x: torch.Tensor, grad_y: torch.Tensor, seed: int):
    """One forward and backward of the model's layer with the generator at ``seed``: y, dx, dA, dB."""
    layer = model.base_model.model.lin
    for param in layer.parameters():
        param.grad = None
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(grad_y)
    return [y.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]


def _bound_keys(model) -> list:
    memo = model.base_model.model.lin.forward._memo
    return [key for key, call in memo._calls.items() if call is not None]


@pytest.mark.parametrize("base,dtype,shape,dropout,graph", CASES)
def test_bound_calls_are_bitwise_the_unbound_call(monkeypatch, base, dtype, shape, dropout, graph):
    """The third call of a shape runs bound; each call is compared with a fresh copy's first (unbound) call at the
    same generator state: bitwise equal outputs and gradients, dropout masks included."""
    _force(monkeypatch, graph)
    model = _patched(base, dtype, dropout)
    reference = copy.deepcopy(model)
    fastlora.patch(model, backend="cpp")
    x, grad_y = torch.randn(shape).to(dtype), torch.randn(*shape[:-1], 40).to(dtype)
    for seed in range(3):
        got = _step(model, x, grad_y, seed)
        fresh = copy.deepcopy(reference)
        fastlora.patch(fresh, backend="cpp")
        want = _step(fresh, x, grad_y, seed)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    assert len(_bound_keys(model)) == 1  # the calls did run bound


def test_bound_calls_follow_forced_paths_and_resets(monkeypatch):
    _force(monkeypatch, "native")
    model = _patched("dense", torch.float32, 0.0)
    fastlora.patch(model, backend="cpp")
    layer = model.base_model.model.lin
    x = torch.randn(5, 48, requires_grad=True)
    for _ in range(3):
        assert type(layer(x).grad_fn).__name__ == "CppFunction"  # the C++ node, bound from the second call
    assert _bound_keys(model)
    with tuning.forced("lora_layer=function"):
        assert type(layer(x).grad_fn).__name__ == "LoRALinearFunctionBackward"
        assert type(layer(x).grad_fn).__name__ == "LoRALinearFunctionBackward"
    assert type(layer(x).grad_fn).__name__ == "CppFunction"
    monkeypatch.setenv(tuning.PATH_ENV, "lora_layer=function")
    tuning.reset()  # reads FASTLORA_PATH again: what was bound under the old decisions no longer applies
    assert type(layer(x).grad_fn).__name__ == "LoRALinearFunctionBackward"
    _force(monkeypatch, "native")
    assert type(layer(x).grad_fn).__name__ == "CppFunction"


@pytest.mark.parametrize("change", ["freeze A", "x without grad", "another shape", "no_grad"])
def test_what_the_graph_choice_reads_unbinds(monkeypatch, change):
    """After bound calls, a call that differs in what the graph choice reads computes PEFT's gradients (fp32:
    1e-5 of the largest value, summation order only)."""
    _force(monkeypatch, "native")
    model = _patched("dense", torch.float32, 0.0)
    reference = copy.deepcopy(model).base_model.model.lin
    fastlora.patch(model, backend="cpp")
    layer = model.base_model.model.lin
    x = torch.randn(6, 48)
    for _ in range(3):
        layer(x.requires_grad_()).sum().backward()
    for module in (layer, reference):
        for param in module.parameters():
            param.grad = None
        if change == "freeze A":
            module.lora_A["default"].weight.requires_grad_(False)
    x_new = torch.randn(11 if change == "another shape" else 6, 48, requires_grad=change != "x without grad")
    if change == "no_grad":
        with torch.no_grad():
            got, want = layer(x_new), reference(x_new)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
        return
    got, want = layer(x_new), reference(x_new)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    got.pow(2).sum().backward()
    want.pow(2).sum().backward()
    for mine, theirs in zip(layer.parameters(), reference.parameters()):
        assert (mine.grad is None) == (theirs.grad is None)
        if theirs.grad is not None:
            assert (mine.grad - theirs.grad).abs().max() <= 1e-5 * theirs.grad.abs().max()


def test_a_bound_call_that_raises_runs_unbound_and_counts_once(monkeypatch):
    _force(monkeypatch, "native")
    model = _patched("dense", torch.float32, 0.0)
    report = fastlora.patch(model, backend="cpp")
    layer = model.base_model.model.lin
    x = torch.randn(4, 48)
    layer(x), layer(x)
    (key,) = _bound_keys(model)

    def raising(_):
        raise RuntimeError("injected failure of a bound call")

    layer.forward._memo._calls[key] = raising
    got, want = layer(x), layer.forward.original(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert report.fused_calls == 3 and not report.internal_errors and not report.fallback_calls
    assert layer.forward._memo._calls[key] is None  # calls like it run unbound from now on


def test_bound_calls_are_kept_for_the_last_few_shapes(monkeypatch):
    """Variable sequence lengths: a layer keeps bound calls for at most BOUND_KEYS shapes, the newest; each call still
    matches PEFT (fp32: 1e-5 of the largest value)."""
    from fastlora.wiring.plan_memo import BOUND_KEYS

    _force(monkeypatch, "native")
    model = _patched("dense", torch.float32, 0.0)
    fastlora.patch(model, backend="cpp")
    layer = model.base_model.model.lin
    for length in range(1, 3 * BOUND_KEYS):
        x = torch.randn(2, length, 48)
        for _ in range(2):
            got, want = layer(x), layer.forward.original(x)
            assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    keys = _bound_keys(model)
    assert len(keys) == BOUND_KEYS and {key[0][1] for key in keys} == set(range(2 * BOUND_KEYS, 3 * BOUND_KEYS))
