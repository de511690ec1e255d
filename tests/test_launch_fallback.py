"""The guarded first launch (fastlora.tuning.guard): a kernel that raises at the first launch of a key falls back
to the composite or the reference op, with the reason in the decisions, the log and a LaunchFallbackWarning.

Failures are real where the CPU allows: a Triton launch that cannot compile (a non-power-of-2 tile: Triton's own
error) under the interpreter; elsewhere a raise injected into fastlora's own C++ launcher. The fallback computes the
same op: fp32 results are compared with the reference backend within 1e-5 of the output's largest value (the
paths differ only in summation order), and with dropout the masks are the same hash (same seeds), so training on
the fallback matches training on the reference backend step for step within that bound.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from types import SimpleNamespace

import pytest
import torch

import fastlora
from fastlora import backends, tuning
from fastlora.backends import cpp
from fastlora.backends import reference as ref
from tests.conftest import lora_layer_model, randomize_lora
from tests.test_tuning import fresh_tuning  # noqa: F401 - autouse: a cache file and fresh choices per test

needs_cpp = pytest.mark.skipif(cpp.unavailable_reason() is not None, reason="C++ backend unavailable")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    error = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-12)
    assert error <= 1e-5, error


def _raising(*args):
    raise RuntimeError("injected launch failure")


def _dropout_inputs(m=7, k=70, r=8):
    x, a = torch.randn(m, k), torch.randn(r, k) * 0.1
    return x, a, [r], torch.tensor([12345]), [0.25], [2.0]


@needs_cpp
def test_training_goes_on_when_a_single_candidate_op_raises(monkeypatch, caplog):
    """lora_down and lora_down_grad with dropout have one candidate on cpp (the composite has no masks): both raise
    at every launch; three training steps run on the reference ops, equal to training on the reference backend."""
    impl = tuning.implementation("cpp", "cpu")
    for op in ("lora_down", "lora_down_grad"):
        assert [n for n, c in impl.candidates[op].items() if c.applies(_key(op))] == ["cpp"]
        monkeypatch.setitem(impl.candidates[op], "cpp", tuning.Candidate(_raising))
    monkeypatch.setenv(tuning.PATH_ENV, "lora_layer=function")  # the layer on the tuned ops, not the C++ node
    tuning.reset()

    with caplog.at_level(logging.WARNING, logger="fastlora"):
        _trains_like_the_reference(lambda: lora_layer_model(70, 45, adapters=((8, 16, 0.25, False),)), (3, 5, 70), "lora_down")
    fallen = {f.op: f for f in tuning.launch_fallbacks()}
    assert set(fallen) == {"lora_down", "lora_down_grad"}
    assert all(f.failed == "cpp" and f.fallback == "reference" and "injected launch failure" in f.reason for f in fallen.values())
    sources = {d.key.op: d for d in tuning.decisions() if d.key.op in fallen}
    assert all(d.path == "reference" and d.source.startswith("fallback: 'cpp' failed at its first launch") for d in sources.values())
    assert sum("failed at its first launch" in r.message for r in caplog.records) == 2  # logged once per key


def _trains_like_the_reference(make_model, x_shape: tuple, warning: str):
    """Three SGD steps of ``make_model()`` patched with cpp (where a launch fails: a LaunchFallbackWarning matching
    ``warning``) and with the reference backend, from the same seed: every call fused, the losses within 1e-5
    relative (fp32, the paths differ in summation order only). Returns the cpp model's report."""
    losses, reports = {}, {}
    for backend in ("cpp", "torch"):
        torch.manual_seed(0)
        model = make_model()
        randomize_lora(model)
        reports[backend] = fastlora.patch(model, backend=backend)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        losses[backend] = []
        with pytest.warns(tuning.LaunchFallbackWarning, match=warning) if backend == "cpp" else contextlib.nullcontext():
            for _ in range(3):
                loss = model(torch.randn(*x_shape)).pow(2).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses[backend].append(loss.item())
        assert reports[backend].fused_calls == 3 and not reports[backend].fallback_calls
    for got, want in zip(losses["cpp"], losses["torch"]):
        assert abs(got - want) <= 1e-5 * abs(want)
    return reports["cpp"]


def _key(op: str) -> tuning.ShapeKey:
    return tuning.ShapeKey("cpp", op, 16, 0, 70, 8, "float32", "-", True, "cpu")


@needs_cpp
@pytest.mark.parametrize("source", ["forced", "cache", "shipped table", "measured"])
def test_a_chosen_path_that_raises_falls_back_to_the_composite(source, monkeypatch, tmp_path):
    """lora_linear on a dense fp32 W (cpp paths "blas" and the composite "torch"): the path the key was given —
    forced, read from the cache or the shipped table — raises at its first launch; the composite answers."""
    x, w, s, b = torch.randn(9, 130), torch.randn(70, 130), torch.randn(9, 4), torch.randn(70, 4)
    args = (x, w, None, 0, None, s, b)
    key = tuning.shape_key("cpp", "lora_linear", args, tuning.device_name(x.device))
    entry = {key.device: {key.text: {"path": "blas", "times_us": {}}}}
    if source == "forced":
        monkeypatch.setenv(tuning.PATH_ENV, "lora_linear=blas")
    elif source == "cache":
        _write_cache(monkeypatch, tmp_path, entry)
    elif source == "shipped table":
        shipped = tmp_path / "shipped.json"
        shipped.write_text(__import__("json").dumps({"devices": entry}))
        monkeypatch.setattr(tuning.store, "shipped_table_path", lambda: shipped)
    tuning.reset()
    candidates = cpp.candidates()
    candidates["lora_linear"]["blas"] = tuning.Candidate(_raising, candidates["lora_linear"]["blas"].applies)
    if source == "measured":  # every candidate raises while timed: the reference answers
        candidates["lora_linear"]["torch"] = tuning.Candidate(_raising, candidates["lora_linear"]["torch"].applies)
    impl = tuning.TunedOps("cpp", "cpu", cpp, candidates)
    with pytest.warns(tuning.LaunchFallbackWarning):
        y = impl.lora_linear(*args)
    _close(y, ref.lora_linear(*args))
    decision = tuning.decisions()[-1]
    assert decision.path == ("reference" if source == "measured" else "torch") and decision.source.startswith("fallback")
    # later calls of the key go straight to the fallback, without raising or warning again
    _close(impl.lora_linear(*args), ref.lora_linear(*args))
    assert len(tuning.launch_fallbacks()) == 1


def _write_cache(monkeypatch, tmp_path, entry) -> None:
    import json

    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"format": tuning.store.CACHE_FORMAT, "versions": tuning.versions(), "devices": entry}))
    monkeypatch.setenv(tuning.CACHE_ENV, str(path))


@needs_cpp
def test_errors_the_fallback_raises_too_and_out_of_memory_propagate(monkeypatch):
    impl = tuning.implementation("cpp", "cpu")
    x, a, ranks, seeds, p, scales = _dropout_inputs()
    with pytest.raises(RuntimeError):  # bad input (A's K does not match x's): the reference raises as well
        impl.lora_down(x, torch.randn(8, 71), ranks, seeds, p, scales)
    assert tuning.launch_fallbacks() == []

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setitem(impl.candidates["lora_down"], "cpp", tuning.Candidate(out_of_memory))
    with pytest.raises(torch.OutOfMemoryError):
        impl.lora_down(torch.randn(5, 33), torch.randn(8, 33), ranks, seeds, p, scales)
    assert tuning.launch_fallbacks() == []


def test_untuned_ops_are_guarded_too():
    """An op without candidates (nf4_dequantize) on a kernel backend whose launcher raises: the reference answers."""
    import bitsandbytes.functional as bnbF

    module = SimpleNamespace(nf4_dequantize=_raising)
    impl = tuning.TunedOps("cpp", "cpu", module, {})
    packed, state = bnbF.quantize_4bit(torch.randn(30, 96), blocksize=64, quant_type="nf4")
    args = (packed.reshape(-1), state.absmax.float(), 64, 30, 96, torch.float32)
    with pytest.warns(tuning.LaunchFallbackWarning, match="nf4_dequantize"):
        w = impl.nf4_dequantize(*args)
    assert torch.equal(w, ref.nf4_dequantize(*args))
    assert torch.equal(impl.nf4_dequantize(*args), w)  # the key now runs the reference without trying again
    assert [f.op for f in tuning.launch_fallbacks()] == ["nf4_dequantize"]


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")
def test_a_triton_kernel_that_cannot_compile_falls_back(monkeypatch):
    """The CUDA path's own TunedOps, on CPU tensors under the interpreter: lora_down with dropout has one candidate,
    the Triton kernel; given a config Triton cannot build (a 24-row tile: tl.arange needs a power of 2), its launch
    raises Triton's error, and the reference answers with the same dropout mask."""
    import triton

    from fastlora.backends import triton as triton_backend

    lora_down_module = importlib.import_module("fastlora.kernels.lora_down")  # the package exports its function

    bad = [triton.Config({"BLOCK_M": 24, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    monkeypatch.setattr(lora_down_module.lora_down_kernel, "early_config_prune", lambda configs, named_args, **kw: bad)
    impl = tuning.TunedOps("triton", "cpu", triton_backend, triton_backend.candidates("cpu"))
    args = _dropout_inputs(m=11, k=83)
    with pytest.warns(tuning.LaunchFallbackWarning, match="power of 2"):
        s = impl.lora_down(*args)
    _close(s, ref.lora_down(*args))
    (fallback,) = tuning.launch_fallbacks()
    assert (fallback.op, fallback.failed, fallback.fallback) == ("lora_down", "triton", "reference")
    assert "InterpreterError" in fallback.reason


@needs_cpp
def test_a_layer_graph_that_raises_falls_back_to_the_function(monkeypatch):
    """The C++ layer node ("native", FusedForward's graph on cpp) raises at launch: the layer's calls run on
    fastlora's Function (the tuned ops), training matches the reference backend, and the fallback is reported."""
    from fastlora.functions import graph

    monkeypatch.setattr(graph.cpp, "bound_lora_layer", lambda *args: _raising)
    monkeypatch.setenv(tuning.PATH_ENV, "lora_layer=native")
    tuning.reset()
    make_model = lambda: lora_layer_model(70, 45, base="nf4", adapters=((8, 16, 0.0, False),))  # noqa: E731
    report = _trains_like_the_reference(make_model, (2, 9, 70), "native")
    (fallback,) = report.launch_fallbacks
    assert (fallback.op, fallback.failed, fallback.fallback) == ("lora_layer", "native", "function")
    assert "failed to launch" in str(report) and "injected launch failure" in str(report)
