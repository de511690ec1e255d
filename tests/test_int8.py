"""LoRA over bitsandbytes 8-bit bases (``lora.bnb.Linear8bitLt``, ``Int8Params`` with per-row SCB) is fused on every
backend: the kernels read W = int8 · SCB / 127 exactly as bitsandbytes dequantizes it, a patched layer matches
unpatched PEFT (outputs and gradients of x, A, B, bias), is closer to a float64 computation than bitsandbytes'
LLM.int8 matmul, and PEFT's merge/unmerge/disable still work on it."""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch
from torch import nn

import fastlora
from fastlora import ops
from fastlora.backends.reference import int8_dequantize
from fastlora.formats.dropout import draw_seeds, keep_mask
from tests.conftest import Wrapper, peft_layer_model
from tests.test_layer_parity import (
    CPU_BACKENDS,
    assert_bf16_autocast_close,
    assert_close_fp32,
    assert_half_output_no_worse_than_peft,
    assert_patched_matches_peft_fp32,
    relative_error,
    run,
)

CASES = [(1, 33, 17), (7, 64, 45), (130, 70, 96)]  # (M, K, N): one token, odd sizes, more tokens than features


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def int8_linear(k: int, n: int, *, bias: bool) -> bnb.nn.Linear8bitLt:
    """A bitsandbytes Linear8bitLt with random weights, quantized as bitsandbytes quantizes on load."""
    lin = bnb.nn.Linear8bitLt(k, n, bias=bias, has_fp16_weights=False)
    codes, scb, _ = bnbF.int8_vectorwise_quant((torch.randn(n, k) / k**0.5).half())
    lin.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scb)
    if bias:
        lin.bias = nn.Parameter(torch.randn(n) * 0.1, requires_grad=False)
    return lin


def int8_layer_model(k: int, n: int, *, bias: bool = True, adapters=((4, 8, 0.0, False),)):
    """A PEFT model around one 8-bit layer ("lin"); ``adapters`` = (r, alpha, dropout, rslora), all active."""
    wrapper = Wrapper(int8_linear(k, n, bias=bias))
    wrapper.is_loaded_in_8bit = True  # PEFT picks lora.bnb.Linear8bitLt only for models flagged 8-bit
    model = peft_layer_model(wrapper, adapters)
    layer = model.base_model.model.lin
    assert type(layer).__name__ == "Linear8bitLt" and layer.__module__ == "peft.tuners.lora.bnb"
    return model


def int8_weight(base: nn.Module) -> torch.Tensor:
    """The 8-bit base's W in fp32, exactly as bitsandbytes dequantizes it."""
    scb = base.state.SCB if base.state.SCB is not None else base.weight.SCB
    return bnbF.int8_vectorwise_dequant(base.weight.data, scb)


def float64_reference(model, x, dy, seeds=None):
    """The LoRA linear in float64 from the layer's own tensors (W dequantized exactly), with the given masks."""
    layer = model.base_model.model.lin
    base = layer.get_base_layer()
    x64 = x.double().detach().requires_grad_(True)
    y = x64 @ int8_weight(base).double().T
    if base.bias is not None:
        y = y + base.bias.double()
    for i, name in enumerate(layer.active_adapters):
        a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        p = layer.lora_dropout[name].p if isinstance(layer.lora_dropout[name], nn.Dropout) else 0.0
        drop_x = x64
        if p > 0 and layer.training:
            drop_x = x64 * keep_mask(seeds[i], p, x.shape[0], x.shape[1]).double() / (1 - p)
        y = y + layer.scaling[name] * (drop_x @ a.T) @ b.T
    (gx,) = torch.autograd.grad(y, x64, dy.double())
    return y.detach(), gx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernels_read_w_as_bitsandbytes_dequantizes(dtype, backend):
    """dy = I and no LoRA term: the input-gradient op returns the W it read, which must equal bitsandbytes'
    ``int8_vectorwise_dequant`` cast to the compute dtype, bit for bit (a product with the identity is exact)."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter rounds bf16 casts toward zero and its bf16 tl.dot is wrong (triton#11584)")
    n, k = 37, 53
    lin = int8_linear(k, n, bias=False)
    codes, scb = lin.weight.data, lin.weight.SCB
    expected = bnbF.int8_vectorwise_dequant(codes, scb)
    assert torch.equal(int8_dequantize(codes, scb, torch.float32), expected)
    impl = ops.implementation(backend, "cpu")
    eye = torch.eye(n, dtype=dtype)
    zeros_s, zeros_a, seeds = torch.zeros(n, 1), torch.zeros(1, k), torch.zeros(1, dtype=torch.int64)
    got = impl.lora_linear_grad_input(eye, codes, scb, 0, zeros_s, zeros_a, [1], seeds, [0.0])
    assert got.dtype == dtype and torch.equal(got, expected.to(dtype))


@pytest.mark.parametrize("m,k,n", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_adapters", [1, 2])
def test_fp32_parity_with_peft(m, k, n, bias, n_adapters, backend):
    """Training mode, fp32: on CPU PEFT's 8-bit layer dequantizes W (bitsandbytes' MatMul8bitFp) and multiplies
    in fp32, as fastlora does. Its W rounds SCB/127 first (one fp32 ulp from bitsandbytes' own dequantization), and
    the sums run in another order: 1e-5 relative (a few hundred ulps) with the floor scaled to each tensor."""
    adapters = ((4, 8, 0.0, False), (3, 5, 0.0, True))[:n_adapters]  # the second uses rslora scaling
    model = int8_layer_model(k, n, bias=bias, adapters=adapters)
    if bias:
        model.base_model.model.lin.get_base_layer().bias.requires_grad_(True)
    assert_patched_matches_peft_fp32(model, backend, torch.randn(m, k), torch.randn(m, n), 1 + 2 * n_adapters + bias)


@pytest.mark.parametrize("m,k,n", CASES[1:])
def test_closer_to_float64_than_llm_int8(m, k, n, backend):
    """In eval mode bitsandbytes runs LLM.int8 (activations quantized row-wise to int8, columns with |x| > 6 in
    16-bit): compared with float64 on the exact dequantized W, fastlora (W dequantized, fp32 GEMM) must be at
    least as close as PEFT, in eval and in training mode."""
    model = int8_layer_model(k, n, adapters=((4, 8, 0.0, False), (2, 4, 0.0, False)))
    x, dy = torch.randn(m, k), torch.randn(m, n)
    x[:, 3] *= 8.0  # an outlier column: LLM.int8 computes it in fp16
    y64, _ = float64_reference(model, x, dy)
    errors = {}
    for patched in (False, True):
        if patched:
            report = fastlora.patch(model, backend=backend)
        for mode in ("eval", "train"):
            model.train(mode == "train")
            with torch.no_grad():
                errors[(patched, mode)] = relative_error(model(x), y64)
    print(f"relative errors vs float64: {errors}")
    assert report.fused_calls == 2 and not report.fallback_calls
    assert errors[(True, "eval")] <= errors[(False, "eval")]
    # Training mode: PEFT's W is within one fp32 ulp of the exact one: both errors are fp32 rounding (< 1e-6).
    assert errors[(True, "train")] <= max(errors[(False, "train")], 1e-6)
    assert errors[(True, "eval")] == errors[(True, "train")]  # fastlora does not switch algorithms with the mode


def assert_half_precision_no_worse_than_peft(y, g, y_peft, g_peft, y64, gx64, dtype) -> None:
    """fastlora's output and input gradient are no farther from float64 than PEFT's, give or take half an output
    ulp (one rounding of the result), and within 2 ulps; adapter gradients within 1e-3 of PEFT's (relative to their
    largest value: both accumulate in fp32 from the same rounded inputs)."""
    assert_half_output_no_worse_than_peft(y, g["x"], y_peft, g_peft["x"], y64, gx64, dtype)
    for name in g:
        if name != "x":
            scale = g_peft[name].abs().max().item()
            torch.testing.assert_close(g[name], g_peft[name], rtol=1e-3, atol=1e-3 * scale, msg=lambda s: f"{name}: {s}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", CASES[1:])
def test_half_precision_no_worse_than_peft(dtype, m, k, n, backend):
    """bf16/fp16 inputs (bitsandbytes computes in x's dtype): PEFT rounds W, the base output and the LoRA term in
    half precision; fastlora rounds W (like PEFT) and the output once. Against float64 on the same inputs, fastlora's
    error may not exceed PEFT's by more than half an output ulp, and stays within 2 ulps. Adapter gradients are fp32
    in both (PEFT's from the half base output's gradient): within 1e-3 relative, with the floor at the tensor's scale
    (half-precision dy and x enter both; Triton's TF32 LoRA dots add 2^-10)."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 tl.dot is wrong (triton#11584); bf16 runs in the GPU tests")
    model = int8_layer_model(k, n, adapters=((4, 8, 0.0, False), (2, 4, 0.0, False)))
    model.base_model.model.lin.get_base_layer().bias.data = torch.randn(n, dtype=dtype) * 0.1
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    y_peft, g_peft = run(model, x, dy)
    y64, gx64 = float64_reference(model, x, dy)
    fastlora.patch(model, backend=backend)
    y, g = run(model, x, dy)
    assert y.dtype == y_peft.dtype == dtype and g["x"].dtype == dtype
    assert_half_precision_no_worse_than_peft(y, g, y_peft, g_peft, y64, gx64, dtype)


def test_autocast(backend):
    """Under bf16 autocast bitsandbytes' training-mode 8-bit matmul (dequantize, F.linear) runs in bf16, and so
    does fastlora's base term (its LoRA term in fp32): outputs and gradients agree to bf16 rounding (see
    assert_bf16_autocast_close), and the output dtype is autocast's."""
    if backend == "triton":
        pytest.skip("bf16 autocast: the Triton interpreter's bf16 tl.dot is wrong (triton#11584)")
    model = int8_layer_model(64, 48)
    x, dy = torch.randn(9, 64), torch.randn(9, 48, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, g_ref = run(model, x, dy)
    report = fastlora.patch(model, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, g = run(model, x, dy)
    assert report.fused_calls == 1 and not report.fallback_calls
    assert_bf16_autocast_close(y, g, y_ref, g_ref)


def test_dropout_matches_masked_reference(backend):
    """Dropout in training mode uses fastlora's own counter-based masks (PEFT draws others): exact against a
    float64 computation with those masks, per adapter."""
    model = int8_layer_model(70, 40, adapters=((4, 8, 0.3, False), (2, 2, 0.1, False)))
    assert_dropout_matches_masked_reference(model, backend, float64_reference, m=33)


def assert_dropout_matches_masked_reference(model, backend: str, float64_reference, m: int) -> None:
    """Training-mode call of the one-layer ``model`` patched on ``backend``: output and input gradient equal
    ``float64_reference(model, x, dy, seeds)`` under the seeds the call draws (fp32 tolerance)."""
    layer = model.base_model.model.lin
    k, n = layer.in_features, layer.out_features
    model.train()
    report = fastlora.patch(model, backend=backend)
    x, dy = torch.randn(m, k), torch.randn(m, n)
    torch.manual_seed(1234)
    seeds = draw_seeds(len(layer.active_adapters), "cpu")
    torch.manual_seed(1234)
    y, g = run(model, x, dy)
    y64, gx64 = float64_reference(model, x, dy, seeds)
    assert report.fused_calls == 1 and not report.fallback_calls
    assert_close_fp32(y, y64.float())
    assert_close_fp32(g["x"], gx64.float())


def assert_triton_paths_match_reference(weight, absmax, dtype, path):
    """Both Triton launchers (forward, input gradient) on ``path`` ("fused" or "split") against the reference ops,
    with random LoRA inputs (two adapters' worth of dropout on the gradient). fp32: 1e-5 relative; fp16: W and the
    output are rounded to fp16 (2^-11) and sums of K or N terms carry a few such roundings. Needs the interpreter.

    Usage: ``assert_triton_paths_match_reference(codes, scb, torch.float16, "split")``
    """
    from fastlora.kernels.lora_linear import lora_linear
    from fastlora.kernels.lora_linear_grad_input import lora_linear_grad_input

    (n, k), m, r = weight.shape, 19, 5
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    s, b, ds, a = torch.randn(m, r), torch.randn(n, r), torch.randn(m, r), torch.randn(r, k)
    bias, seeds = torch.randn(n).to(dtype), torch.tensor([7])
    ref = ops.implementation("torch", "cpu")
    got = (
        lora_linear(x, weight, absmax, 0, bias, s, b, path=path),
        lora_linear_grad_input(dy, weight, absmax, 0, ds, a, [r], seeds, [0.2], path=path),
    )
    expected = (
        ref.lora_linear(x, weight, absmax, 0, bias, s, b),
        ref.lora_linear_grad_input(dy, weight, absmax, 0, ds, a, [r], seeds, [0.2]),
    )
    tol = 1e-5 if dtype == torch.float32 else 4 * 2.0**-11
    for out, want in zip(got, expected):
        scale = want.float().abs().max().item()
        torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.interpreter
def test_triton_paths(path, dtype):
    """Both Triton paths for an 8-bit W (fused: int8 tiles dequantized in registers; split: dequantized into the
    reused buffer, then the GEMM and the epilogue) against the reference ops."""
    if ops.backends.unavailable_reason("triton", "cpu") is not None:
        pytest.skip("needs TRITON_INTERPRET=1")
    lin = int8_linear(70, 45, bias=False)
    assert_triton_paths_match_reference(lin.weight.data, lin.weight.SCB, dtype, path)


def test_merge_unmerge_disable_and_merge_and_unload(backend):
    """PEFT's own 8-bit merge (dequantize, add B·A, requantize) still works on a patched model: merged calls and
    disabled adapters run PEFT's forward and are counted, unmerge brings fused calls back, and merge_and_unload
    returns the bitsandbytes layer with the adapters folded in (lossy: requantized to int8)."""
    model = int8_layer_model(48, 32, adapters=((4, 8, 0.0, False),))
    model.train()
    x = torch.randn(6, 48)
    report = fastlora.patch(model, backend=backend)
    with torch.no_grad():
        fused = model(x)
        base_only = model.base_model.model.lin.get_base_layer()(x)
        model.merge_adapter()
        merged = model(x)
        with model.disable_adapter():  # unmerges as a side effect, as PEFT does
            disabled = model(x)
        unmerged = model(x)
    assert report.fallback_calls["adapters merged"] == 1 and report.fallback_calls["adapters disabled"] == 1
    assert report.fused_calls == 2
    scale = fused.abs().max().item()
    # int8 requantization moves each W element by up to half a step (SCB/127/2 per row): a few 1e-2 of the output.
    torch.testing.assert_close(merged, fused, rtol=0, atol=0.05 * scale)
    torch.testing.assert_close(disabled, base_only, rtol=0, atol=0.05 * scale)
    torch.testing.assert_close(unmerged, fused, rtol=0, atol=0.05 * scale)
    unloaded = model.merge_and_unload()
    assert type(unloaded.lin) is bnb.nn.Linear8bitLt
    with torch.no_grad():
        torch.testing.assert_close(unloaded(x), fused, rtol=0, atol=0.05 * scale)


def test_fp16_weights_8bit_layer_is_not_patched():
    """An 8-bit layer that keeps fp16 weights (bitsandbytes requantizes them on every call) is left to PEFT, with
    the reason in the report."""
    model = int8_layer_model(32, 16)
    base = model.base_model.model.lin.get_base_layer()
    base.weight = bnb.nn.Int8Params(torch.randn(16, 32).half(), requires_grad=False, has_fp16_weights=True)
    report = fastlora.patch(model, backend="torch")
    assert not report.patched
    assert "8-bit base weight of dtype torch.float16" in report.skipped["base_model.model.lin"]
