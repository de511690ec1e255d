"""The C++ CPU backend ("cpp") against the torch reference and bitsandbytes.

Tolerances (the reference also computes in fp32 and rounds once, so only fp32 summation order differs):
- fp32 outputs: rtol 1e-5, atol 1e-5 x max|reference| (GEMM reduction order over K or N terms).
- bf16 / fp16 outputs: at most one rounding step apart: rtol 2**-7 (bf16) / 2**-10 (fp16), atol 1e-3 x max|ref|.
- NF4 dequantization, the nested-absmax resolve and the dropout masks: bit for bit.

An NF4 or low-precision W takes one of three paths: few tokens (M <= the fused limit, NF4 only) go through the
fused row kernels that never write W out; otherwise W is converted whole into a reused buffer when it fits
(the default at these sizes), else panel by panel. Most parity tests force the panel path with tiny panels, so
every shape spans several panels with a partial last one and panel edges fall mid-block and mid-byte; the path
tests run the fused and whole-W paths on the same cases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import bitsandbytes.functional as bnbF
from fastlora import backends, ops
from fastlora.backends import cpp
from fastlora.backends import reference as ref
from fastlora.formats.dropout import apply_dropout, keep_mask

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("no C++ compiler: the cpp backend falls back to torch here", allow_module_level=True)

# A failed build must fail these tests, not skip them: a compiler is present.
BUILD_FAILURE = cpp.unavailable_reason()

FP32_RTOL = 1e-5
LOW_PRECISION_RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}
# Small enough that the 75x200 test weight spans 5 row panels and 13 column panels.
TINY_PANEL_BYTES = 3000

# (ranks, dropout probabilities) of the stacked adapters.
ONE_ADAPTER = ([8], [0.0])
THREE_ADAPTERS_DROPOUT = ([4, 8, 3], [0.0, 0.1, 0.5])


@pytest.fixture(autouse=True)
def _built():
    assert BUILD_FAILURE is None, BUILD_FAILURE


@pytest.fixture
def tiny_panels():
    """Force the panel path: no whole-W buffer, no fused few-token kernels, tiny panels."""
    previous = cpp.set_panel_bytes(TINY_PANEL_BYTES), cpp.set_whole_weight_bytes(0), cpp.set_fused_tokens(0)
    yield
    cpp.set_panel_bytes(previous[0])
    cpp.set_whole_weight_bytes(previous[1])
    cpp.set_fused_tokens(previous[2])


@pytest.fixture(params=["fused", "whole"])
def weight_path(request):
    """Force the fused few-token kernels (every M here) or the whole-W buffer (never fused)."""
    previous = cpp.set_fused_tokens(10**6 if request.param == "fused" else 0), cpp.set_whole_weight_bytes(1 << 30)
    yield request.param
    cpp.set_fused_tokens(previous[0])
    cpp.set_whole_weight_bytes(previous[1])


@pytest.fixture(params=["avx2", "portable"])
def isa(request):
    """Run a test once per code path (the AVX2 one only where the CPU has it)."""
    if request.param == "avx2" and not cpp.has_avx2():
        pytest.skip("CPU without AVX2")
    previous = cpp.set_avx2_enabled(request.param == "avx2")
    yield request.param
    cpp.set_avx2_enabled(previous)


def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    if expected.dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=FP32_RTOL, atol=1e-5 * scale + 1e-30)
    else:
        rtol = LOW_PRECISION_RTOL[expected.dtype]
        torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=1e-3 * scale + 1e-30)


def quantized(n: int, k: int, blocksize: int, nested: bool, dtype=torch.float32):
    """(packed bytes, fp32 absmax resolved by the reference, bitsandbytes state) of a random NF4 weight."""
    packed, state = bnbF.quantize_4bit(
        (torch.randn(n, k) / k**0.5).to(dtype), blocksize=blocksize, compress_statistics=nested, quant_type="nf4"
    )
    if nested:
        s2 = state.state2
        absmax = ref.nf4_resolve_absmax(state.absmax, s2.code, s2.absmax, s2.blocksize, float(state.offset))
    else:
        absmax = state.absmax.float()
    return packed.view(torch.uint8).reshape(-1), absmax, state


# ---- NF4 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(7, 100), (7, 9), (75, 200), (3, 130), (1, 1)])  # odd n*k: half-used last byte
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_dequantize_bit_exact_vs_bitsandbytes(n, k, blocksize, nested, isa):
    packed, _, state = quantized(n, k, blocksize, nested)
    if nested:
        s2 = state.state2
        absmax = cpp.nf4_resolve_absmax(state.absmax, s2.code, s2.absmax, s2.blocksize, float(state.offset))
        assert torch.equal(absmax, ref.nf4_resolve_absmax(state.absmax, s2.code, s2.absmax, s2.blocksize, float(state.offset)))
    else:
        absmax = state.absmax
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state.dtype = dtype
        got = cpp.nf4_dequantize(packed, absmax, blocksize, n, k, dtype)
        expected = bnbF.dequantize_4bit(packed.view(-1, 1), state)
        assert got.dtype == dtype
        assert torch.equal(got, expected), f"{dtype}: max diff {(got.float() - expected.float()).abs().max()}"


# ---- dropout masks -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_masks_bit_exact(p, isa):
    m, k = 33, 200
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    x = torch.randn(m, k)
    # dA = I^T @ drop(x) is drop(x) exactly: each output is one product by 1.0 plus exact zeros.
    dropped = cpp.lora_down_grad(torch.eye(m), x, [m], seed, [p])
    assert torch.equal(dropped, apply_dropout(x, seed[0], p))
    # dx = dy @ 0 + (I @ A) * keep / (1-p): the backward mask applied to A.
    a = torch.randn(m, k)
    dx = cpp.lora_linear_grad_input(torch.zeros(m, 5), torch.zeros(5, k), None, 64, torch.eye(m), a, [m], seed, [p])
    assert torch.equal(dx == 0, ~keep_mask(seed[0], p, m, k))
    assert torch.equal(dx, ref.lora_linear_grad_input(torch.zeros(m, 5), torch.zeros(5, k), None, 64, torch.eye(m), a, [m], seed, [p]))


# ---- thin LoRA ops -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 7, 33, 130])
@pytest.mark.parametrize("adapters", [ONE_ADAPTER, THREE_ADAPTERS_DROPOUT], ids=["one", "three_dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_thin_ops_match_reference(m, adapters, dtype):
    ranks, dropout_p = adapters
    n, k, r = 75, 200, sum(ranks)
    seeds = torch.randint(0, 2**31 - 1, (len(ranks),), dtype=torch.int64)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    a, b, s = torch.randn(r, k), torch.randn(n, r), torch.randn(m, r)
    scales = [0.5 + 0.75 * i for i in range(len(ranks))]  # LoRA scales: 0.5, 1.25, 2.0
    assert_matches(cpp.lora_down(x, a, ranks, seeds, dropout_p, scales), ref.lora_down(x, a, ranks, seeds, dropout_p, scales))
    for got, expected in zip(cpp.lora_up_grad(dy, b, s, ranks, scales), ref.lora_up_grad(dy, b, s, ranks, scales)):
        assert_matches(got, expected)
    assert_matches(cpp.lora_down_grad(s, x, ranks, seeds, dropout_p), ref.lora_down_grad(s, x, ranks, seeds, dropout_p))


# ---- fused forward and input gradient ------------------------------------------------------------------------

# (name, blocksize, nested) for NF4 bases; "dense" bases use x's dtype, as PEFT's nn.Linear does.
BASES = [("nf4", 64, True), ("nf4", 128, False), ("nf4", 256, True), ("dense", 0, False)]


def _layer(base, m, n, k, ranks, dtype, bias):
    kind, blocksize, nested = base
    if kind == "nf4":
        weight, absmax, _ = quantized(n, k, blocksize, nested)
    else:
        weight, absmax = (torch.randn(n, k) / k**0.5).to(dtype), None
    r = sum(ranks)
    return dict(
        x=torch.randn(m, k).to(dtype),
        dy=torch.randn(m, n).to(dtype),
        weight=weight,
        absmax=absmax,
        blocksize=blocksize,
        bias=torch.randn(n).to(dtype) if bias else None,
        s=torch.randn(m, r),
        b=torch.randn(n, r) * 0.1,
        a=torch.randn(r, k) * 0.1,
        ds=torch.randn(m, r),
    )


def _check_fused(layer, ranks, dropout_p, seeds):
    t = layer
    inputs = {name: v.clone() for name, v in t.items() if isinstance(v, torch.Tensor)}
    y = cpp.lora_linear(t["x"], t["weight"], t["absmax"], t["blocksize"], t["bias"], t["s"], t["b"])
    assert_matches(y, ref.lora_linear(t["x"], t["weight"], t["absmax"], t["blocksize"], t["bias"], t["s"], t["b"]))
    args = (t["dy"], t["weight"], t["absmax"], t["blocksize"], t["ds"], t["a"], ranks, seeds, dropout_p)
    assert_matches(cpp.lora_linear_grad_input(*args), ref.lora_linear_grad_input(*args))
    for name, before in inputs.items():  # e.g. a one-token output that aliased the bias
        assert torch.equal(t[name], before), f"{name} was modified"


@pytest.mark.parametrize("m", [1, 7, 33, 130])
@pytest.mark.parametrize("base", BASES, ids=lambda b: f"{b[0]}{b[1] or ''}{'_nested' if b[2] else ''}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "adapters,bias", [(ONE_ADAPTER, True), (THREE_ADAPTERS_DROPOUT, False)], ids=["one_bias", "three_dropout"]
)
def test_fused_matches_reference_across_panels(m, base, dtype, adapters, bias, tiny_panels):
    ranks, dropout_p = adapters
    seeds = torch.randint(0, 2**31 - 1, (len(ranks),), dtype=torch.int64)
    # K = 200: not a multiple of 64 (NF4 blocks cross rows) nor of the panel width; N = 75 likewise.
    _check_fused(_layer(base, m, 75, 200, ranks, dtype, bias), ranks, dropout_p, seeds)


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("n,k", [(75, 200), (40, 256)])  # K=200: rows start mid-block and off the 32-step grid
@pytest.mark.parametrize("base", BASES, ids=lambda b: f"{b[0]}{b[1] or ''}{'_nested' if b[2] else ''}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "adapters,bias", [(ONE_ADAPTER, True), (THREE_ADAPTERS_DROPOUT, False)], ids=["one_bias", "three_dropout"]
)
def test_fused_and_whole_weight_paths_match_reference(m, n, k, base, dtype, adapters, bias, weight_path, isa):
    ranks, dropout_p = adapters
    seeds = torch.randint(0, 2**31 - 1, (len(ranks),), dtype=torch.int64)
    _check_fused(_layer(base, m, n, k, ranks, dtype, bias), ranks, dropout_p, seeds)


@pytest.mark.parametrize("m", [1, 4, 5, 130])  # defaults: fused up to 4 tokens, whole W above
@pytest.mark.parametrize("base", BASES[:1] + BASES[3:], ids=["nf4", "dense"])
def test_fused_matches_reference_default_panels(m, base, isa):
    ranks, dropout_p = THREE_ADAPTERS_DROPOUT
    seeds = torch.randint(0, 2**31 - 1, (3,), dtype=torch.int64)
    _check_fused(_layer(base, m, 300, 520, ranks, torch.float32, True), ranks, dropout_p, seeds)


def test_dense_bf16_weight_with_fp32_input():
    # PEFT keeps A and B in fp32 over a bf16 base; a base weight of another dtype than x is converted per panel.
    layer = _layer(("dense", 0, False), 7, 75, 200, [8], torch.float32, True)
    layer["weight"] = layer["weight"].bfloat16()
    _check_fused(layer, [8], [0.0], torch.zeros(1, dtype=torch.int64))


def test_autocast_does_not_lower_internal_precision():
    # Under bf16 autocast the ATen matmuls inside the ops would run in bf16 unless the ops shield them.
    ranks, dropout_p = THREE_ADAPTERS_DROPOUT
    seeds = torch.randint(0, 2**31 - 1, (3,), dtype=torch.int64)
    t = _layer(("nf4", 64, True), 33, 75, 200, ranks, torch.float32, True)
    fwd_args = (t["x"], t["weight"], t["absmax"], 64, t["bias"], t["s"], t["b"])
    bwd_args = (t["dy"], t["weight"], t["absmax"], 64, t["ds"], t["a"], ranks, seeds, dropout_p)
    up_args = (t["dy"], t["b"], t["s"], ranks, [2.0] * len(ranks))
    expected = (cpp.lora_linear(*fwd_args), cpp.lora_linear_grad_input(*bwd_args), cpp.lora_up_grad(*up_args))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (cpp.lora_linear(*fwd_args), cpp.lora_linear_grad_input(*bwd_args), cpp.lora_up_grad(*up_args))
    for g, e in zip(got[:2] + got[2], expected[:2] + expected[2]):
        assert g.dtype == torch.float32 and torch.equal(g, e)


# ---- registration and fallback -------------------------------------------------------------------------------


def test_auto_picks_cpp_on_cpu():
    assert backends.resolve("auto", "cpu") == "cpp"


def test_registered_ops_route_to_cpp():
    layer = _layer(("nf4", 64, True), 7, 75, 200, [8], torch.bfloat16, True)
    args = (layer["x"], layer["weight"], layer["absmax"], 64, layer["bias"], layer["s"], layer["b"])
    expected = ref.lora_linear(*args)
    assert_matches(ops.lora_linear(*args, "cpp"), expected)  # eager: direct call
    assert_matches(ops.lora_linear.op(*args, "cpp"), expected)  # through the dispatcher (CPU kernel)


@pytest.mark.parametrize("name", ["lora_down", "lora_linear", "lora_up_grad", "lora_down_grad", "lora_linear_grad_input"])
def test_registered_op_passes_opcheck_with_cpp(name):
    from tests.test_ops import _op_calls, _sample

    args = _op_calls(_sample())[name][:-1] + ("cpp",)
    torch.library.opcheck(getattr(ops, name).op, args, test_utils=("test_schema", "test_faketensor"))


def test_build_from_clean(tmp_path):
    """A fresh build directory compiles the sources and the result loads and computes (in a new process), even with
    the ``lock`` file a killed build leaves behind there (torch would wait on it forever)."""
    script = textwrap.dedent(
        """
        import time, torch
        from fastlora.backends import cpp, reference as ref
        from fastlora.formats.dropout import apply_dropout
        start = time.perf_counter()
        cpp.build()
        print(f"built in {time.perf_counter() - start:.1f} s")
        x, a = torch.randn(5, 70), torch.randn(4, 70)
        seeds = torch.tensor([3])
        assert torch.equal(cpp.lora_down_grad(torch.eye(5), x, [5], seeds, [0.3]), apply_dropout(x, 3, 0.3))
        torch.testing.assert_close(cpp.lora_down(x, a, [4], seeds, [0.0], [2.0]), ref.lora_down(x, a, [4], seeds, [0.0], [2.0]))
        """
    )
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "lock").touch()
    env = dict(os.environ, FASTLORA_BUILD_DIR=str(tmp_path / "build"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list((tmp_path / "build").glob("*.so")), "no shared library in the fresh build directory"
    print(done.stdout)


def test_build_failure_falls_back_and_is_reported(tmp_path):
    """Without a working C++ compiler: fastlora imports, the cpp backend says why it cannot run, "auto" resolves to
    the torch reference on CPU, and patch reports that backend (in a new process with a fresh build directory)."""
    script = textwrap.dedent(
        """
        import torch, fastlora
        from fastlora import backends
        from fastlora.backends import cpp
        from tests.conftest import lora_layer_model
        reason = cpp.unavailable_reason()
        assert reason, "a failed build must give a reason"
        assert backends.resolve("auto", "cpu") == "torch"
        model = lora_layer_model(16, 8)
        report = fastlora.patch(model)
        assert set(report.patched.values()) == {"torch"}, report
        x = torch.randn(3, 16)
        with torch.no_grad():
            y = model(x)
        fastlora.unpatch(model)
        with torch.no_grad():
            torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
        print("reason:", reason.splitlines()[-1])
        """
    )
    env = dict(os.environ, FASTLORA_BUILD_DIR=str(tmp_path / "build"), CXX="/bin/false", CC="/bin/false")
    env.pop("FASTLORA_BACKEND", None)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1]
    )
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
