"""The C++ backend's "half" path (csrc/lora_half.cpp): W converted to x's dtype (bf16/fp16) and the base GEMMs run
in it, the fp32 LoRA term added and the sum rounded once more; and its run-time candidates ("half" for the base ops,
"native_half" for the whole-layer graph).

Tolerances: the weight conversion is exact (checked bit for bit through an identity x, whose products are exact);
the numerics are held to PEFT's: against float64 on the same half-precision inputs, the error may exceed PEFT's by
at most half an output ulp (:func:`tests.test_layer_parity.assert_half_output_no_worse_than_peft`)."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import backends, tuning
from fastlora.backends import cpp
from fastlora.formats.dropout import draw_seeds, keep_mask
from tests.conftest import lora_layer_model
from tests.test_layer_parity import assert_half_output_no_worse_than_peft, float64_reference, run

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None, reason="needs the C++ backend")

HALF = cpp.PATH_CODES["half"]
ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
NO_DROPOUT = ([0], [1.0])


@pytest.fixture(autouse=True)
def _fresh_choices(tmp_path, monkeypatch):
    """No choices made and a cache of the test's own; every test leaves none behind."""
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    tuning.reset()
    yield
    monkeypatch.undo()
    tuning.reset()


@pytest.fixture(params=["avx512", "avx2", "portable"])
def thin_isa(request):
    """Run a test once per code path of the half path: the AVX-512 kernels (thin products, NF4 rounded in
    registers), the AVX2 ones (blocks widened for fp32 BLAS), the portable ones (each only where the CPU has it)."""
    if request.param == "avx512" and not cpp.has_avx512():
        pytest.skip("CPU without AVX-512")
    if request.param == "avx2" and not cpp.has_avx2():
        pytest.skip("CPU without AVX2")
    previous = cpp.set_avx2_enabled(request.param != "portable"), cpp.set_avx512_enabled(request.param == "avx512")
    yield request.param
    cpp.set_avx2_enabled(previous[0])
    cpp.set_avx512_enabled(previous[1])


@pytest.fixture(params=["whole", "panels"])
def layout(request):
    """W converted whole into the reused buffer, or by small panels (several rows/columns each, a partial last)."""
    whole = 1 << 30 if request.param == "whole" else 0
    previous = cpp.set_whole_weight_bytes(whole), cpp.set_panel_bytes(3000)
    yield request.param
    cpp.set_whole_weight_bytes(previous[0])
    cpp.set_panel_bytes(previous[1])


def _base(kind: str, n: int, k: int):
    """(weight, absmax, blocksize, W in fp32 as the kernels compute it) of a random frozen base of ``kind``."""
    import bitsandbytes.functional as bnbF

    w = torch.randn(n, k) / k**0.5
    if kind == "nf4":
        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        return packed.reshape(-1), state.absmax.float(), 64, bnbF.dequantize_4bit(packed, state).float()
    if kind == "int8":
        codes, scb, _ = bnbF.int8_vectorwise_quant(w.half())
        return codes, scb, 0, bnbF.int8_vectorwise_dequant(codes, scb)
    dense = w.to({"bf16": torch.bfloat16, "fp16": torch.float16}[kind])
    return dense, None, 0, dense.float()


@pytest.mark.parametrize("kind", ["nf4", "int8", "bf16", "fp16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_weight_is_w_rounded_once(kind, dtype, layout, thin_isa):
    """Through x = I (forward) and dy = I (grad_input), with a zero LoRA term, the half path returns W (Wᵀ) in x's
    dtype: it must equal the fp32 W rounded to that dtype (nearest even) bit for bit, whole or by panels, on the
    AVX-512 (NF4 rounded in registers), AVX2 and portable code. n·k odd: a half-used last NF4 byte."""
    n, k = 75, 37
    weight, absmax, blocksize, w32 = _base(kind, n, k)
    seeds = torch.zeros(1, dtype=torch.int64)
    eye_k, eye_n = torch.eye(k, dtype=dtype), torch.eye(n, dtype=dtype)
    y = cpp._direct_ops().lora_linear(eye_k, weight, absmax, blocksize, None, torch.zeros(k, 2), torch.zeros(n, 2), HALF, None)
    dx = cpp._direct_ops().lora_linear_grad_input(
        eye_n, weight, absmax, blocksize, torch.zeros(n, 2), torch.zeros(2, k), [2], seeds, *NO_DROPOUT, HALF
    )
    assert y.dtype == dx.dtype == dtype
    assert torch.equal(y, w32.to(dtype).t()) and torch.equal(dx, w32.to(dtype))


def _float64(x, w32, bias, s, b):
    y = x.double() @ w32.double().t() + s.double() @ b.double().t()
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("kind", ["nf4", "int8", "bf16"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_half_products_round_like_peft_at_most(kind, dtype, bias, layout, thin_isa):
    """Forward and grad_input on the half path against float64 on the same inputs (W as dequantized in fp32): the
    roundings are W to x's dtype, the base GEMM's result, and the sum: within 3 ulps of the largest value (PEFT's
    own path has one more rounding, of its LoRA term). A dropped bias or LoRA term is off by tens of percent."""
    m, n, k, r = 33, 75, 200, 8
    weight, absmax, blocksize, w32 = _base(kind, n, k)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    s, b = torch.randn(m, r), torch.randn(n, r) / r**0.5
    ds, a = torch.randn(m, r), torch.randn(r, k) / k**0.5
    bias_t = torch.randn(n).to(dtype) if bias else None
    seeds = torch.zeros(1, dtype=torch.int64)
    y = cpp._direct_ops().lora_linear(x, weight, absmax, blocksize, bias_t, s, b, HALF, None)
    dx = cpp._direct_ops().lora_linear_grad_input(dy, weight, absmax, blocksize, ds, a, [r], seeds, *NO_DROPOUT, HALF)
    y64 = _float64(x, w32, bias_t, s, b)
    dx64 = dy.double() @ w32.double() + ds.double() @ a.double()
    for got, want in ((y, y64), (dx, dx64)):
        assert got.dtype == dtype
        error = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert error <= 3 * ULP[dtype], error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_sum_rounds_to_nearest_even(dtype, thin_isa):
    """y = round(round(x·Wᵀ) + bias) with x = I and a zero LoRA term: bit for bit what torch gives for
    (Wᵀ + bias).to(dtype), on each code path (NaN: any NaN), with exact ties (half an ulp above 1 rounds down to even, one and a
    half up), NaN, ±inf, overflow, exact zero and a subnormal sum; 21 columns: a partial SIMD tile."""
    ulp = ULP[dtype] * 2  # of 1.0
    n, k = 21, 5
    tiny = torch.finfo(dtype).tiny  # the smallest normal: W = tiny, bias = -tiny/2 sums to a subnormal
    weight = torch.ones(n, k, dtype=dtype)
    weight[9] = tiny
    bias = torch.randn(n) * 0.01
    bias[:10] = torch.tensor([ulp / 2, 3 * ulp / 2, -ulp / 4, float("nan"), float("inf"), -float("inf"), 1e6, -1.0 + 1e-9, -1.0, -tiny / 2])
    y = cpp._direct_ops().lora_linear(torch.eye(k, dtype=dtype), weight, None, 0, bias, torch.zeros(k, 2), torch.zeros(n, 2), HALF, None)
    want = (weight.float().t() + bias).to(dtype)
    assert torch.equal(y.isnan(), want.isnan())  # NaN stays NaN (torch's vectorized rounding may set its sign bit)
    numbers = ~want.isnan()
    assert torch.equal(y[numbers].view(torch.int16), want[numbers].view(torch.int16))


def test_half_path_with_column_scale_and_dropout():
    """The two half-path cases that continue in fp32: a column scale (DoRA) y = c·(x·Wᵀ + S·Bᵀ) + bias, and dx with
    dropout masks on the LoRA term, each against the fp32 path on the same call (masks from the same seed): within
    3 bf16 ulps of the largest value."""
    m, n, k, r = 20, 48, 64, 4
    weight, absmax, blocksize, _ = _base("nf4", n, k)
    x, dy = torch.randn(m, k).bfloat16(), torch.randn(m, n).bfloat16()
    s, b, scale, bias = torch.randn(m, r), torch.randn(n, r), torch.rand(n) + 0.5, torch.randn(n).bfloat16()
    direct, whole = cpp._direct_ops(), cpp.PATH_CODES["whole"]
    got, want = (direct.lora_linear(x, weight, absmax, blocksize, bias, s, b, path, scale) for path in (HALF, whole))
    seeds, a, ds = torch.tensor([7]), torch.randn(r, k), torch.randn(m, r)
    thresholds, keep = cpp._dropout_args((0.3,))
    dx = [direct.lora_linear_grad_input(dy, weight, absmax, blocksize, ds, a, [r], seeds, thresholds, keep, path) for path in (HALF, whole)]
    without_dropout = direct.lora_linear_grad_input(dy, weight, absmax, blocksize, ds, a, [r], seeds, *NO_DROPOUT, whole)
    for g, w in ((got, want), (dx[0], dx[1])):
        assert g.dtype == torch.bfloat16
        assert (g.float() - w.float()).abs().max() <= 3 * ULP[torch.bfloat16] * w.float().abs().max()
    assert (without_dropout.float() - dx[1].float()).abs().max() > 0.1  # the masks mattered


def test_half_path_needs_half_compute():
    weight, absmax, blocksize, _ = _base("nf4", 16, 32)
    with pytest.raises(RuntimeError, match="bf16 or fp16"):
        cpp._direct_ops().lora_linear(torch.randn(2, 32), weight, absmax, blocksize, None, torch.zeros(2, 2), torch.zeros(16, 2), HALF, None)


# ---- the thin LoRA products with a half-precision operand (csrc/half_thin.cpp) -------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n,r", [(1, 7, 5, 3), (9, 40, 33, 21), (37, 300, 75, 8), (1100, 300, 130, 16), (9000, 20, 17, 4),
                                     (5, 0, 4, 2), (0, 8, 4, 2), (6, 9, 4, 0)])  # fmt: skip
def test_thin_products_of_half_operands_are_fp32(dtype, m, k, n, r, thin_isa):
    """S = s·x·Aᵀ, dS = s·dy·B, dB = dyᵀ·S and dA = dSᵀ·x with bf16/fp16 x and dy: x and dy are widened to fp32
    exactly, block by block (several row and column blocks, a partial last, row chunks of a tall x; empty
    extents; ranks in AVX-512 tiles of 16, 8, 4, 2 and 1), and multiplied in fp32, on each code path: against
    float64 within fp32 summation error (1e-5 of the largest value for these lengths). A rounded operand would be
    off by ~1e-3."""
    torch.manual_seed(m + k + n + r)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    a, b, s = torch.randn(r, k), torch.randn(n, r), torch.randn(m, r)
    seeds = torch.zeros(1, dtype=torch.int64)
    got_s = cpp.lora_down(x, a, [r], seeds, [0.0], [2.0])
    got_ds, got_db = cpp.lora_up_grad(dy, b, s, [r], [2.0])
    got_da = cpp.lora_down_grad(s, x, [r], seeds, [0.0])
    x64, dy64 = x.double(), dy.double()
    wanted = (2.0 * x64 @ a.double().t(), 2.0 * dy64 @ b.double(), dy64.t() @ s.double(), s.double().t() @ x64)
    for got, want in zip((got_s, got_ds, got_db, got_da), wanted):
        assert got.dtype == torch.float32 and got.shape == want.shape and got.is_contiguous()
        if want.numel():
            assert (got.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


# ---- through PEFT: the candidates, and the numerics against PEFT's -------------------------------------------------


@pytest.fixture
def native_half(monkeypatch):
    """The half candidates offered whatever this CPU is (their numerics do not depend on its speed)."""
    monkeypatch.setattr(cpp, "native_half_gemm", lambda dtype: dtype in (torch.bfloat16, torch.float16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapters,forced", [(((8, 16, 0.0, False),), "lora_layer=native_half"),
                                             (((4, 8, 0.0, False), (2, 4, 0.0, False)), "half")])  # fmt: skip
def test_forced_half_no_worse_than_peft(monkeypatch, native_half, dtype, adapters, forced):
    """A QLoRA layer computing in bf16/fp16 on the half path (one adapter: the C++ node; two: the Function with the
    "half" ops), output and dx against float64 on the same inputs: no farther than PEFT's plus half an ulp; the
    adapter gradients (fp32 in both) equal PEFT's to 1e-2 relative (both from the same half-precision x and dy,
    but PEFT's dS is from its rounded LoRA chain)."""
    monkeypatch.setenv(tuning.PATH_ENV, forced)
    tuning.reset()
    m, k, n = 37, 96, 80
    model = lora_layer_model(k, n, base="nf4", dtype=dtype, adapters=adapters)
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    y_peft, g_peft = run(model, x, dy)
    y64, gx64 = float64_reference(model, x, dy)
    report = fastlora.patch(model, backend="cpp")
    y, g = run(model, x, dy)
    assert report.fused_calls == 1 and not report.fallback_calls
    assert y.dtype == dtype and g["x"].dtype == dtype
    assert_half_output_no_worse_than_peft(y, g["x"], y_peft, g_peft["x"], y64, gx64, dtype)
    for name in g:
        if name != "x":
            torch.testing.assert_close(g[name], g_peft[name], rtol=1e-2, atol=1e-2 * g_peft[name].abs().max().item())
    paths = {d.key.op: d.path for d in tuning.decisions()}
    if len(adapters) == 1:
        assert paths["lora_layer"] == "native_half"
    else:
        assert paths["lora_linear"] == paths["lora_linear_grad_input"] == "half"


@pytest.mark.parametrize("native", [True, False])
def test_half_candidates_measured_where_the_cpu_multiplies_bf16(monkeypatch, native):
    """A bf16 QLoRA layer times "native_half" beside "native" and "function" (and, on the Function, the "half" base
    ops beside the fp32 ones) only where the CPU multiplies bf16 natively; fp32 compute never offers them."""
    monkeypatch.setattr(cpp, "native_half_gemm", lambda dtype: native and dtype == torch.bfloat16)
    for dtype, adapters in ((torch.bfloat16, ((4, 8, 0.0, False),)), (torch.bfloat16, ((4, 8, 0.0, False), (2, 4, 0.0, False))),
                            (torch.float32, ((4, 8, 0.0, False),))):  # fmt: skip
        model = lora_layer_model(64, 48, base="nf4", dtype=dtype, adapters=adapters)
        fastlora.patch(model, backend="cpp")
        model(torch.randn(20, 64).to(dtype).requires_grad_()).sum().backward()
    timed = {(d.key.op, d.key.dtype): set(d.times_us) for d in tuning.decisions()}
    assert ("half" in timed[("lora_linear", "bfloat16")]) == native
    assert ("half" in timed[("lora_linear_grad_input", "bfloat16")]) == native
    assert timed[("lora_layer", "bfloat16")] == ({"native", "native_half", "function"} if native else {"native", "function"})
    assert timed[("lora_layer", "float32")] == {"native", "function"}
    assert all("half" not in times for (op, dtype), times in timed.items() if dtype == "float32")


# ---- "native_half_lora": the LoRA products in x's dtype too, for adapters kept in that dtype ---------------------


class _GivenMask(torch.nn.Module):
    """PEFT's dropout with a given mask: ``x * (keep / (1-p))``, the factor in x's dtype as ``nn.Dropout`` makes its
    noise; so PEFT and fastlora drop the same elements and both compare with one float64 computation."""

    def __init__(self, keep: torch.Tensor, p: float):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * (self.keep.to(x.dtype) / (1 - self.p))


def _float64_with_adapter_grads(layer, x, dy, keep, p):
    """y, dx, dA, dB in float64 from the layer's own tensors (W dequantized exactly), dropout by ``keep``."""
    base = layer.get_base_layer()
    if hasattr(base.weight, "quant_state"):
        from fastlora.functions.nf4_weight import NF4Weight

        w = NF4Weight.from_params4bit(base.weight).dequantize(torch.float32).double()
    else:
        w = base.weight.double()
    x64 = x.double().requires_grad_()
    adapter = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    a64, b64 = (t.detach().double().requires_grad_() for t in adapter)
    drop_x = x64 if keep is None else x64 * keep.double() / (1 - p)
    y = x64 @ w.T + layer.scaling["default"] * (drop_x @ a64.T) @ b64.T
    if base.bias is not None:
        y = y + base.bias.double()
    return (y.detach(), *torch.autograd.grad(y, (x64, a64, b64), dy.double()))


def _relative(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("m,k,n", [(37, 96, 80), (1, 130, 33)])
def test_half_lora_no_farther_from_float64_than_peft(monkeypatch, native_half, base, dtype, p, m, k, n):
    """Adapters kept in x's dtype, the layer forced onto "native_half_lora" (every product in that dtype): y, dx,
    dA and dB against float64 on the same inputs, weights and dropout masks, each no farther than PEFT's own (which
    runs its LoRA chain in that dtype, rounding after every product) by more than half an ulp of that dtype. Odd
    shapes, one token, bias, dropout on and off. Computing S, dS or a term in fp32 and rounding differently stays
    within it; a dropped scale, mask or term is off by tens of percent."""
    monkeypatch.setenv(tuning.PATH_ENV, "lora_layer=native_half_lora")
    tuning.reset()
    model = lora_layer_model(k, n, base=base, dtype=dtype, adapters=((8, 16, p, False),))
    layer = model.base_model.model.lin
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
    model.train()
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    torch.manual_seed(1234)
    seeds = draw_seeds(1, "cpu")
    keep = keep_mask(seeds[0], p, m, k) if p > 0 else None
    dropout = layer.lora_dropout["default"]
    if keep is not None:
        layer.lora_dropout["default"] = _GivenMask(keep, p)
    y_peft, g_peft = run(model, x, dy)
    layer.lora_dropout["default"] = dropout
    want = _float64_with_adapter_grads(layer, x, dy, keep, p)
    report = fastlora.patch(model, backend="cpp")
    torch.manual_seed(1234)  # fastlora draws the same seed
    y, g = run(model, x, dy)
    assert report.fused_calls == 1 and not report.fallback_calls
    assert [d.path for d in tuning.decisions() if d.key.op == "lora_layer"] == ["native_half_lora"]
    names = ("x", "base_model.model.lin.lora_A.default.weight", "base_model.model.lin.lora_B.default.weight")
    ulp = ULP[dtype]
    outputs = zip(("y", *names), (y, *(g[name] for name in names)), (y_peft, *(g_peft[name] for name in names)), want)
    for name, got, peft, exact in outputs:
        assert got.dtype == dtype
        error, peft_error = _relative(got, exact), _relative(peft, exact)
        assert error <= peft_error + 0.5 * ulp, (name, error, peft_error)


def test_half_lora_is_offered_only_for_adapters_in_x_dtype(native_half):
    """fp32 adapters (PEFT's default, autocast_adapter_dtype=True) make PEFT compute its LoRA chain in fp32: the
    graph choice times "native_half_lora" only for adapters in x's dtype, under a key of their own; the C++ node
    rejects mixed dtypes."""
    for adapter_dtype in (torch.float32, torch.bfloat16):
        model = lora_layer_model(64, 48, base="nf4", dtype=torch.bfloat16)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(adapter_dtype)
        fastlora.patch(model, backend="cpp")
        model(torch.randn(20, 64).bfloat16().requires_grad_()).sum().backward()
    timed = {d.key.dtype: set(d.times_us) for d in tuning.decisions() if d.key.op == "lora_layer"}
    assert timed == {"bfloat16": {"native", "native_half", "function"},
                     "bfloat16+bfloat16 adapter": {"native", "native_half", "native_half_lora", "function"}}  # fmt: skip
    weight, absmax, blocksize, _ = _base("nf4", 16, 32)
    with pytest.raises(RuntimeError, match="must all be bf16 or all fp16"):
        cpp.lora_layer(torch.randn(2, 32).bfloat16(), torch.randn(4, 32), torch.randn(16, 4).bfloat16(), weight,
                       absmax, blocksize, None, torch.zeros(1, dtype=torch.int64), 0.0, 2.0, "half_lora")  # fmt: skip


def test_half_lora_would_be_far_from_peft_with_fp32_adapters():
    """Why "native_half_lora" is not offered for fp32 adapters (PEFT's default): PEFT then computes its LoRA chain
    in fp32, so its adapter gradients are fp32-accurate, and the chain in bf16 (adapter weights rounded to bf16) is
    more than 100x farther from float64 in dA and dB."""
    m, k, n = 37, 96, 80
    model = lora_layer_model(k, n, base="dense", dtype=torch.bfloat16, adapters=((8, 16, 0.0, False),))
    layer = model.base_model.model.lin
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x, dy = torch.randn(m, k).to(torch.bfloat16), torch.randn(m, n).to(torch.bfloat16)
    _, g_peft = run(model, x, dy)
    _, _, da64, db64 = _float64_with_adapter_grads(layer, x, dy, None, 0.0)
    adapter = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    a, b = (t.detach().bfloat16().requires_grad_() for t in adapter)
    base, seeds = layer.get_base_layer(), torch.zeros(1, dtype=torch.int64)
    y = cpp.lora_layer(x, a, b, base.weight, None, 0, base.bias, seeds, 0.0, layer.scaling["default"], "half_lora")
    da, db = torch.autograd.grad(y, (a, b), dy)
    for got, name, exact in ((da, "lora_A", da64), (db, "lora_B", db64)):
        peft_error = _relative(g_peft[f"base_model.model.lin.{name}.default.weight"], exact)
        assert _relative(got, exact) > 100 * peft_error, (_relative(got, exact), peft_error)
