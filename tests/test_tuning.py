"""Run-time path choice (fastlora.tuning) on the C++ backend: measurement, forcing, the on-disk cache, outputs.

Each test gets its own cache file (FASTLORA_TUNING_CACHE) and a fresh tuning state. Outputs of every candidate are
compared with the fp32 reference backend: fp32 within 1e-5 relative to the output's largest value (the paths differ
only in summation order: GEMM blocking, whole W vs panels), bf16 within 1e-2 (the composite rounds its bf16 base
product before adding the fp32 LoRA term: a few bf16 ulps of 2^-8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import fastlora
from fastlora import backends, tuning
from fastlora.backends import cpp
from fastlora.backends import reference as ref
from tests.conftest import lora_layer_model

pytestmark = pytest.mark.skipif(cpp.unavailable_reason() is not None, reason="C++ backend unavailable")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def fresh_tuning(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    monkeypatch.delenv(tuning.PATH_ENV, raising=False)
    tuning.reset()
    yield tmp_path / "tuning.json"
    monkeypatch.undo()
    tuning.reset()


def _inputs(base: str, m: int, n: int = 75, k: int = 200, r: int = 8, dtype=torch.float32):
    """Op arguments for one layer: K=200 (NF4 blocks cross rows), N=75, one adapter with scale 2."""
    if base == "nf4":
        import bitsandbytes.functional as bnbF

        packed, state = bnbF.quantize_4bit(torch.randn(n, k) / k**0.5, blocksize=64, quant_type="nf4")
        weight, absmax, blocksize = packed.reshape(-1), state.absmax.float(), 64
    else:
        weight, absmax, blocksize = (torch.randn(n, k) / k**0.5).to(dtype), None, 0
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    a, b = torch.randn(r, k) * 0.1, torch.randn(n, r) * 0.1
    seeds = torch.zeros(1, dtype=torch.int64)
    s = ref.lora_down(x, a, [r], seeds, [0.0], [2.0])
    ds, _ = ref.lora_up_grad(dy, b, s, [r], [2.0])
    return {
        "lora_down": (x, a, [r], seeds, [0.0], [2.0]),
        "lora_linear": (x, weight, absmax, blocksize, torch.randn(n).to(dtype), s, b),
        "lora_up_grad": (dy, b, s, [r], [2.0]),
        "lora_down_grad": (ds, x, [r], seeds, [0.0]),
        "lora_linear_grad_input": (dy, weight, absmax, blocksize, ds, a, [r], seeds, [0.0]),
    }


def _assert_close(got, want, dtype):
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert g.shape == w.shape and g.dtype == w.dtype
        error = (g.float() - w.float()).abs().max().item() / max(w.float().abs().max().item(), 1e-12)
        assert error <= TOLERANCE[dtype], error


def test_m_buckets_are_powers_of_four():
    assert [tuning.m_bucket(m) for m in (1, 2, 4, 5, 16, 17, 512, 513, 10**6)] == [1, 4, 4, 16, 16, 64, 1024, 1024, 16384]


@pytest.mark.parametrize("base,dtype", [("dense", torch.float32), ("dense", torch.bfloat16), ("nf4", torch.float32), ("nf4", torch.bfloat16)])
@pytest.mark.parametrize("m", [1, 33])
def test_every_candidate_matches_reference(base, dtype, m):
    inputs = _inputs(base, m, dtype=dtype)
    impl = tuning.implementation("cpp", "cpu")
    for op, args in inputs.items():
        want = getattr(ref, op)(*args)
        key = tuning.shape_key("cpp", op, args, "test")
        applicable = [name for name, c in impl.candidates[op].items() if c.applies(key)]
        assert len(applicable) >= 2, (op, applicable)  # always the C++ path(s) and the composite
        for name in applicable:
            with tuning.forced(f"{op}={name}"):
                _assert_close(getattr(impl, op)(*args), want, dtype)
            assert tuning.decisions()[-1].path == name


def test_slow_candidate_is_never_chosen():
    # Listed first (the default, which keeps ties) and correct, but 5 ms slower per call than the real paths.
    def slow(*args):
        time.sleep(0.005)
        return cpp.lora_linear(*args)

    candidates = cpp.candidates()
    candidates["lora_linear"] = {"slow": tuning.Candidate(slow), **candidates["lora_linear"]}
    impl = tuning.TunedOps("cpp", "cpu", cpp, candidates)
    for base in ("dense", "nf4"):
        args = _inputs(base, 5)["lora_linear"]
        _assert_close(impl.lora_linear(*args), ref.lora_linear(*args), torch.float32)
        decision = tuning.decisions()[-1]
        assert decision.source == "measured here" and decision.path != "slow"
        # (the real path's own time is not bounded: a loaded machine can stall any call; the choice is what counts)
        assert decision.times_us["slow"] >= 5000 and decision.times_us["slow"] > decision.times_us[decision.path]


def test_forced_path_wins_and_is_reported(monkeypatch):
    monkeypatch.setenv(tuning.PATH_ENV, "panels")
    tuning.reset()
    impl = tuning.implementation("cpp", "cpu")
    inputs = _inputs("nf4", 7)
    impl.lora_linear(*inputs["lora_linear"])
    impl.lora_down(*inputs["lora_down"])
    linear, down = tuning.decisions()
    assert (linear.path, linear.source) == ("panels", f"forced by {tuning.PATH_ENV}")
    # An op without that path is measured as usual, and says the forced path did not apply.
    assert down.path in ("cpp", "torch") and down.source.endswith("'panels' does not apply here")

    monkeypatch.setenv(tuning.PATH_ENV, "lora_linear=fused")  # per op: must exist for that op, or it is an error
    tuning.reset()
    assert impl.lora_linear(*inputs["lora_linear"]) is not None and tuning.decisions()[-1].path == "fused"
    with pytest.raises(ValueError, match="has only"):
        impl.lora_linear(*_inputs("dense", 7)["lora_linear"])
    monkeypatch.setenv(tuning.PATH_ENV, "no_such_op=whole")
    with pytest.raises(ValueError, match="unknown op"):
        tuning.reset()


def test_choices_are_reused_from_the_cache(fresh_tuning):
    impl = tuning.implementation("cpp", "cpu")
    args = _inputs("nf4", 20)["lora_linear"]
    impl.lora_linear(*args)
    first = tuning.decisions()[-1]
    assert first.source == "measured here"
    stored = json.loads(fresh_tuning.read_text())
    assert stored["versions"] == tuning.versions()
    assert stored["devices"][first.key.device][first.key.text]["path"] == first.path
    tuning.reset()  # a new process in all but name: the memo is gone, the file stays
    impl.lora_linear(*args)
    again = tuning.decisions()[-1]
    assert (again.path, again.source) == (first.path, "cache")
    assert tuning.stored_decisions(first.key.device)[0].key == first.key


_CHILD = """
import torch
from fastlora import backends, tuning
impl = tuning.implementation("cpp", "cpu")
torch.manual_seed(0)
x, w, s, b = torch.randn(9, 130), torch.randn(70, 130), torch.randn(9, 4), torch.randn(70, 4)
impl.lora_linear(x, w, None, 0, None, s, b)
d = tuning.decisions()[-1]
print(d.path, "|", d.source, "|", round(tuning.measurement_seconds(), 4))
"""


def test_cache_round_trips_across_processes(fresh_tuning):
    env = {**os.environ, tuning.CACHE_ENV: str(fresh_tuning)}
    env.pop(tuning.PATH_ENV, None)
    run = lambda: subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)  # noqa: E731
    first = run().stdout.strip().split(" | ")
    second = run().stdout.strip().split(" | ")
    assert first[1] == "measured here" and float(first[2]) > 0
    assert second[:2] == [first[0], "cache"] and float(second[2]) == 0.0  # the second process timed nothing


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"format": 1, "versions": {"torch": "0.0"}, "devices": {}})])
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(fresh_tuning, content):
    fresh_tuning.write_text(content)
    tuning.reset()
    args = _inputs("dense", 3)["lora_linear"]
    with pytest.warns(UserWarning, match="tuning cache"):
        y = tuning.implementation("cpp", "cpu").lora_linear(*args)
    _assert_close(y, ref.lora_linear(*args), torch.float32)
    assert tuning.decisions()[-1].source == "measured here"
    assert json.loads(fresh_tuning.read_text())["versions"] == tuning.versions()  # rewritten for this version


def test_shipped_table_seeds_missing_keys(tmp_path, monkeypatch):
    args = _inputs("nf4", 40)["lora_linear"]
    key = tuning.shape_key("cpp", "lora_linear", args, tuning.device_name(torch.device("cpu")))
    shipped = tmp_path / "shipped.json"
    shipped.write_text(json.dumps({"devices": {key.device: {key.text: {"path": "panels", "times_us": {}}}}}))
    monkeypatch.setattr(tuning.store, "shipped_table_path", lambda: shipped)
    tuning.reset()
    tuning.implementation("cpp", "cpu").lora_linear(*args)
    assert (tuning.decisions()[-1].path, tuning.decisions()[-1].source) == ("panels", "shipped table")


def test_patched_model_reports_its_paths():
    model = lora_layer_model(200, 75, base="nf4", dtype=torch.float32)
    fastlora.patch(model, backend="cpp")
    x = torch.randn(2, 5, 200, requires_grad=True)
    model(x).sum().backward()
    ops = {d.key.op for d in tuning.decisions()}
    # the layer call's graph (fastlora.functions.graph), and the ops that its "function" candidate ran while it was timed
    assert ops == {"lora_layer", *tuning.TUNED_OPS}
    assert all(d.key.m_bucket == 16 and d.source == "measured here" for d in tuning.decisions())


def test_one_measurement_per_bucket_and_forced_blocks_do_not_leak():
    impl = tuning.implementation("cpp", "cpu")
    for m in (17, 40, 64):  # one M bucket (64): measured once, then looked up
        impl.lora_linear(*_inputs("nf4", m)["lora_linear"])
    assert len(tuning.decisions()) == 1 and tuning.decisions()[0].key.m_bucket == 64
    spent = tuning.measurement_seconds()
    with tuning.forced("panels"):
        impl.lora_linear(*_inputs("nf4", 40)["lora_linear"])
        assert tuning.decisions()[-1].path == "panels"
    args = _inputs("nf4", 40)["lora_linear"]
    _assert_close(impl.lora_linear(*args), ref.lora_linear(*args), torch.float32)
    assert tuning.measurement_seconds() == spent  # back to the measured choice, nothing timed again


def test_tune_command_prints_its_choices(capsys):
    from fastlora import cli

    assert cli.main(["tune", "--model", "micro", "--tokens", "1-4", "--bases", "nf4", "--device", "cpu", "--backend", "cpp"]) == 0
    out = capsys.readouterr().out
    # micro: 4 distinct (N, K) shapes x 2 M buckets (1, 4); every tuned op of each
    assert "cpp|lora_linear|m4|n128|k128|r16|float32|nf4|- ->" in out and "cpp|lora_down_grad|m1|" in out
    assert len([line for line in out.splitlines() if "|lora_linear|" in line]) == 8


@pytest.mark.interpreter
@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_every_triton_candidate_matches_reference(base):
    """The CUDA backend's candidate list (kernels/dispatch.py CANDIDATES plus the torch composite), each run on CPU
    tensors under the Triton interpreter, fp32 (tl.dot in IEEE fp32 there): within 1e-5 of the reference."""
    if backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("needs TRITON_INTERPRET=1")
    from fastlora.backends import triton as triton_backend

    candidates = triton_backend.candidates()
    for op, args in _inputs(base, 19, n=45, k=70).items():
        want = getattr(ref, op)(*args)
        assert len(candidates[op]) >= 2
        for name, candidate in candidates[op].items():
            _assert_close(candidate.fn(*args), want, torch.float32)
