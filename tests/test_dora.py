"""DoRA (``use_dora=True``) runs fused and computes what PEFT's DoRA computes: outputs and the gradients of x, A, B,
the magnitude and the base bias, over dense and NF4 bases, every backend; dropout exactly against a float64 run
of fastlora's own masks; PEFT's weight-norm inference cache, merge/unmerge/disable; tiny-Llama training parity."""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnbF
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import dora as peft_dora
from torch import nn

import fastlora
from fastlora.backends import unavailable_reason
from fastlora.formats.dropout import keep_mask
from tests.conftest import Wrapper, nf4_linear, randomize_lora, tiny_llama_base
from tests.test_layer_parity import CPU_BACKENDS, assert_close_fp32, run
from tests.test_model_parity import train

STEPS = 10


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def dora_layer_model(k, n, *, base="dense", dtype=torch.float32, r=4, dropout=0.0, bias=True, trainable_bias=False):
    lin = nn.Linear(k, n, bias=bias).to(dtype) if base == "dense" else nf4_linear(k, n, bias=bias, compute_dtype=dtype)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, use_dora=True, target_modules=["lin"])
    model = get_peft_model(Wrapper(lin, base != "dense"), cfg)
    randomize_lora(model)  # B random too, so ‖W + s·B·A‖ differs from ‖W‖
    layer = model.base_model.model.lin
    set_magnitudes(layer)
    if bias and trainable_bias:
        layer.get_base_layer().bias.requires_grad_(True)
    return model


def set_magnitudes(layer):
    """m as DoRA initializes it (the row norms of W + s·B·A, which randomize_lora overwrote), then moved 0.5x-1.5x
    per row so that g = m / ‖·‖ differs from 1 in every row."""
    with torch.no_grad():
        for name, magnitude in layer.lora_magnitude_vector.items():
            w = layer.get_base_layer().weight
            w = bnbF.dequantize_4bit(w.data, w.quant_state) if hasattr(w, "quant_state") else w
            delta = layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight
            norm = (w.float() + delta.float()).norm(dim=1)
            magnitude.weight.copy_(norm * (torch.rand_like(norm) + 0.5))


def pair(**kwargs):
    torch_state = torch.random.get_rng_state()
    reference = dora_layer_model(**kwargs)
    torch.random.set_rng_state(torch_state)
    patched = dora_layer_model(**kwargs)
    return reference, patched


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("k,n,m", [(70, 45, 13), (128, 96, 1)])
def test_dora_layer_matches_peft_fp32(backend, base, k, n, m):
    reference, patched = pair(k=k, n=n, base=base, trainable_bias=True)
    report = fastlora.patch(patched, backend=backend)
    x, dy = torch.randn(3, m, k), torch.randn(3, m, n)
    y_ref, g_ref = run(reference, x, dy)
    y, g = run(patched, x, dy)
    assert report.fused_calls == 1 and not report.fallback_calls, report
    assert g.keys() == g_ref.keys() and any("magnitude" in key for key in g) and any("bias" in key for key in g)
    # fp32 throughout: PEFT sums W + s·B·A per element, fastlora expands the square; both are a few ulps. Triton
    # under the interpreter runs fp32 tl.dot as IEEE (1e-5 holds there too).
    assert_close_fp32(y, y_ref, "y")
    for key in g_ref:
        assert_close_fp32(g[key], g_ref[key], key)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("k,n,m", [(300, 45, 13), (513, 33, 5)])
def test_dora_with_bias_at_initialisation_is_bit_identical_to_peft(backend, k, n, m):
    """PEFT's own ``test_lora_use_dora_linear`` demands that DoRA at initialisation (B = 0, g = 1) leaves a biased
    base layer's output unchanged under ``allclose``'s default tolerance, which a 1-ulp difference in the bias add
    fails. The output is compared exactly (fp32, dense base; these backends' base GEMM is ATen's, as PEFT's). K > 256:
    below that MKL does not split K, and x·Wᵀ + b then happens to round as addmm does."""
    if unavailable_reason(backend, "cpu") is not None:
        pytest.skip(unavailable_reason(backend, "cpu"))
    lin = nn.Linear(k, n)
    x = torch.rand(3, m, k)
    base_y = lin(x).detach()
    reference = get_peft_model(Wrapper(copy.deepcopy(lin)), LoraConfig(r=4, use_dora=True, target_modules=["lin"]))
    patched = get_peft_model(Wrapper(copy.deepcopy(lin)), LoraConfig(r=4, use_dora=True, target_modules=["lin"]))
    report = fastlora.patch(patched, backend=backend)
    for training in (False, True):  # inference op, then the autograd function
        reference.train(training), patched.train(training)
        y_ref, y = reference(x.clone().requires_grad_(training)), patched(x.clone().requires_grad_(training))
        assert torch.equal(y_ref, base_y)
        assert torch.equal(y, y_ref), (y - y_ref).abs().max()
    assert report.fused_calls == 2 and not report.fallback_calls, report


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dora_layer_matches_peft_half(dtype):
    reference, patched = pair(k=96, n=40, dtype=dtype, trainable_bias=True)
    fastlora.patch(patched, backend="cpp" if dtype == torch.bfloat16 else "torch")
    x, dy = torch.randn(2, 9, 96).to(dtype), torch.randn(2, 9, 40).to(dtype)
    y_ref, g_ref = run(reference, x, dy)
    y, g = run(patched, x, dy)
    # Half precision: PEFT rounds the base output to the dtype before adding the fp32 DoRA term, fastlora rounds
    # once at the end; each side carries ~1 ulp (bf16 2^-8, fp16 2^-11) of the output magnitude, gradients a few.
    tol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-9
    for key, expected in {"y": y_ref, **g_ref}.items():
        actual = y if key == "y" else g[key]
        err = (actual.float() - expected.float()).norm() / expected.float().norm()
        assert err < tol, f"{key}: relative error {err:.2e}"


def test_dora_dropout_exact_against_float64_with_own_masks(backend, monkeypatch):
    """With dropout while training, PEFT's DoRA takes the (g-1) base term from the dropped x. Masks differ from
    PEFT's, so the check is exact against the same formula in float64 with fastlora's masks (seeds captured)."""
    k, n, m, p = 70, 45, 11, 0.3
    model = dora_layer_model(k, n, dropout=p)
    fastlora.patch(model, backend=backend)
    captured = []
    from fastlora.functions import lora as autograd

    real_seeds = autograd._seeds
    monkeypatch.setattr(autograd, "_seeds", lambda a, device: captured.append(real_seeds(a, device)) or captured[-1])
    model.train()
    x, dy = torch.randn(m, k), torch.randn(m, n)
    y, g = run(model, x, dy)

    layer = model.base_model.model.lin
    w, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
    a, bb = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    mag = layer.lora_magnitude_vector["default"].weight.double().detach().requires_grad_(True)
    s = layer.scaling["default"]
    x64 = x.double().requires_grad_(True)
    keep = keep_mask(captured[0][0], p, m, k).double()
    x_d = x64 * keep / (1 - p)
    norm = (w + s * bb @ a).norm(dim=1)
    g64 = mag / norm
    y64 = x64 @ w.T + b + (g64 - 1) * (x_d @ w.T) + g64 * (s * (x_d @ a.T) @ bb.T)
    gx, gm = torch.autograd.grad(y64, (x64, mag), dy.double())
    assert_close_fp32(y, y64.float(), "y")
    assert_close_fp32(g["x"], gx.float(), "x")
    assert_close_fp32(g["base_model.model.lin.lora_magnitude_vector.default.weight"], gm.float(), "magnitude")


def test_dora_dropout_statistically_matches_peft():
    """Over many draws the mean output with dropout equals PEFT's mean (different masks, same distribution)."""
    k, n, p, draws = 32, 8, 0.25, 400
    reference, patched = pair(k=k, n=n, dropout=p)
    fastlora.patch(patched, backend="torch")
    x = torch.randn(1, k).expand(draws, k)
    with torch.no_grad():
        means = [model.train()(x).mean(0) for model in (reference, patched)]
        spread = reference.train()(x).std(0)
    # Means of 400 draws differ by ~sqrt(2/400) standard deviations; 5 of those is a loose, non-flaky bound.
    assert ((means[0] - means[1]).abs() <= 5 * spread * (2 / draws) ** 0.5 + 1e-5).all()


def test_dora_weight_norm_cache_matches_peft(monkeypatch):
    monkeypatch.setattr(peft_dora, "ENABLE_DORA_CACHING", True)
    reference, patched = pair(k=48, n=24)
    report = fastlora.patch(patched, backend="torch")
    x = torch.randn(5, 48)
    with torch.no_grad():
        y_ref = reference.eval()(x)
        y = patched.eval()(x)
        layer = patched.base_model.model.lin
        cache = layer.lora_magnitude_vector["default"]._dora_cache
        assert "weight-norm-default" in cache  # filled as PEFT fills it
        cache["weight-norm-default"] = cache["weight-norm-default"] * 2  # and read from it, as PEFT reads it
        y_halved = patched(x)
    assert report.fused_calls == 2 and not report.fallback_calls
    assert_close_fp32(y, y_ref, "y")
    bias = layer.base_layer.bias
    assert_close_fp32(y_halved - bias, (y - bias) / 2, "y with the cached norm doubled")
    patched.train()
    assert not cache  # PEFT clears its cache on train(): the next call computes the norm again


def test_dora_merge_unmerge_disable_still_behave():
    reference, patched = pair(k=40, n=24)
    report = fastlora.patch(patched, backend="torch")
    x = torch.randn(4, 40)
    with torch.no_grad():
        y = patched(x)
        assert_close_fp32(y, reference(x), "fused")
        patched.merge_adapter()
        assert_close_fp32(patched(x), y, "merged (PEFT's DoRA merge)")
        patched.unmerge_adapter()
        assert_close_fp32(patched(x), y, "unmerged")
        with patched.disable_adapter():
            assert_close_fp32(patched(x), reference.base_model.model.lin.base_layer(x), "disabled")
    assert report.fused_calls == 2
    assert report.fallback_calls == {"adapters merged": 1, "adapters disabled": 1}


def test_dora_with_other_active_adapters_is_reported():
    model = dora_layer_model(32, 16)
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["lin"]))
    model.base_model.set_adapter(["default", "plain"])
    report = fastlora.patch(model, backend="torch")
    model(torch.randn(3, 32))
    assert report.fallback_calls == {"DoRA with other active adapters": 1}


def tiny_llama_dora(kind, dtype):
    model = tiny_llama_base(kind, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules="all-linear"))
    randomize_lora(model, std=0.05)
    return model


@pytest.mark.parametrize("kind,dtype,tol", [("dense", torch.float32, 1e-4), ("qlora", torch.bfloat16, 2e-2)])
def test_tiny_llama_dora_training_matches_peft(kind, dtype, tol, tmp_path):
    data = [torch.randint(0, 128, (2, 24)) for _ in range(2)]
    batches = [data[i % 2] for i in range(STEPS)]
    reference, patched = tiny_llama_dora(kind, dtype), tiny_llama_dora(kind, dtype)
    # Same weights before training: the patched model's adapter file equals PEFT's byte for byte.
    reference.save_pretrained(tmp_path / "ref")
    report = fastlora.patch(patched, backend="cpp")
    patched.save_pretrained(tmp_path / "ours")
    file = "adapter_model.safetensors"
    assert (tmp_path / "ref" / file).read_bytes() == (tmp_path / "ours" / file).read_bytes()
    assert len(report.patched) == 14 and not report.skipped
    ref_losses, losses = train(reference, batches), train(patched, batches)
    assert report.fused_calls == 14 * STEPS and not report.fallback_calls, report
    diff = max(abs(a - b) for a, b in zip(ref_losses, losses))
    print(f"{kind} {dtype} DoRA per-step losses: PEFT {ref_losses}\n fastlora {losses}\n max |diff| {diff:.2e}")
    # fp32: summation order only (as the LoRA model test); bf16 QLoRA: one bf16 rounding per layer output, through
    # 2 decoder layers and 10 AdamW steps (as tests/test_model_parity.py states).
    assert diff < tol
    assert losses[-2] < losses[0]  # the same batch, 8 steps later: it actually trains


def test_dora_over_8bit_base_is_fused_and_as_close_to_float64_as_peft(backend):
    """8-bit base (``lora.bnb.Linear8bitLt``): PEFT's own layer runs LLM.int8, so both are compared with the DoRA
    formula in float64 over W = int8 · SCB / 127; fastlora must be fused, within fp32 rounding of it (1e-5) and no
    farther from it than PEFT."""
    from tests.test_int8 import int8_linear, int8_weight

    def build():
        wrapper = Wrapper(int8_linear(70, 45, bias=True))
        wrapper.is_loaded_in_8bit = True
        model = get_peft_model(wrapper, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["lin"]))
        randomize_lora(model)
        return model

    state = torch.random.get_rng_state()
    reference = build()
    torch.random.set_rng_state(state)
    patched = build()
    report = fastlora.patch(patched, backend=backend)
    x, dy = torch.randn(2, 5, 70), torch.randn(2, 5, 45)
    (y_ref, g_ref), (y, g) = run(reference, x, dy), run(patched, x, dy)
    assert report.fused_calls == 1 and not report.fallback_calls, report

    layer = patched.base_model.model.lin
    w, b = int8_weight(layer.get_base_layer()).double(), layer.get_base_layer().bias.double()
    a, bb = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    s = layer.scaling["default"]
    magnitude = layer.lora_magnitude_vector["default"].weight.double()
    x64 = x.double().requires_grad_(True)
    y64 = magnitude / (w + s * bb @ a).norm(dim=1) * (x64 @ w.T + s * (x64 @ a.T) @ bb.T) + b
    (gx64,) = torch.autograd.grad(y64, x64, dy.double())
    for name, ours, peft, exact in (("y", y, y_ref, y64), ("x", g["x"], g_ref["x"], gx64)):
        err = lambda t: ((t.double() - exact).norm() / exact.norm()).item()  # noqa: E731
        message = f"{name}: fastlora {err(ours):.1e}, PEFT {err(peft):.1e}"
        assert err(ours) < 1e-5 and err(ours) <= max(err(peft), 1e-6), message


def test_dora_layer_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) traces the DoRA path (the fused ops as custom ops, the norm math around them)
    and gives PEFT's outputs and gradients (fp32, as above)."""
    reference, patched = pair(k=48, n=24, trainable_bias=True)
    fastlora.patch(patched, backend="torch")
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    x, dy = torch.randn(4, 48), torch.randn(4, 24)
    (y_ref, g_ref), (y, g) = run(reference, x, dy), run(compiled, x, dy)
    assert_close_fp32(y, y_ref, "y")
    for key in g_ref:
        assert_close_fp32(g[key if key == "x" else f"_orig_mod.{key}"], g_ref[key], key)


def test_dora_under_bf16_autocast_matches_peft():
    """fp32 layer under CPU bf16 autocast: fused (no fallback), within bf16 rounding of PEFT (2^-7 relative: one
    rounding of 2^-8 on each side; ‖W‖² is then recomputed per call from autocast's bf16 copy of W)."""
    reference, patched = pair(k=64, n=32, trainable_bias=True)
    report = fastlora.patch(patched, backend="cpp")
    x, dy = torch.randn(4, 64), torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (y_ref, g_ref), (y, g) = run(reference, x, dy), run(patched, x, dy)
    assert report.fused_calls == 1 and not report.fallback_calls, report
    assert y.dtype == y_ref.dtype == torch.bfloat16
    for key, expected in {"y": y_ref, **g_ref}.items():
        actual = y if key == "y" else g[key]
        err = (actual.float() - expected.float()).norm() / expected.float().norm()
        assert err < 2.0**-7, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_lora_linear_scaled_op(backend, base):
    """The op DoRA's epilogue runs on: y = c ⊙ (x·Wᵀ + S·Bᵀ) + bias, per backend against the fp32 reference (1e-5:
    fp32, summation order only), the registered op equal to the eager entry, and its schema and fake implementation
    checked by opcheck."""
    from fastlora import ops
    from fastlora.backends import reference as ref
    from fastlora.functions.nf4_weight import NF4Weight

    k, n, m, r = 70, 45, 9, 5
    if base == "dense":
        weight, absmax, blocksize = torch.randn(n, k), None, 0
    else:
        nf4 = NF4Weight.from_params4bit(nf4_linear(k, n, bias=False, compute_dtype=torch.float32).weight)
        weight, absmax, blocksize = nf4.packed, nf4.absmax, nf4.blocksize
    x, bias, scale = torch.randn(m, k), torch.randn(n), torch.rand(n) + 0.5
    lora_s, lora_b = torch.randn(m, r), torch.randn(n, r)
    args = (x, weight, absmax, blocksize, bias, lora_s, lora_b, scale)
    expected = ref.lora_linear(*args)
    got = ops.lora_linear_scaled(*args, backend)
    assert_close_fp32(got, expected, "y")
    unscaled = ref.lora_linear(x, weight, absmax, blocksize, None, lora_s, lora_b)
    assert_close_fp32(expected, scale * unscaled + bias, "reference against its definition")
    if backend != "triton":  # opcheck's fake-tensor runs are backend-independent: the CPU ones suffice
        assert torch.equal(torch.ops.fastlora.lora_linear_scaled(*args, backend), got)
        checks = ("test_schema", "test_faketensor")
        torch.library.opcheck(ops.lora_linear_scaled.op, (*args, backend), test_utils=checks)


def test_dora_over_conv1d_matches_peft_and_caches_row_norms(monkeypatch):
    """GPT-2's Conv1D (``fan_in_fan_out``): W [K, N] read transposed; ‖W‖² is computed once, not per call, though
    the transposed view is made per call (fp32: summation order only)."""
    from transformers.pytorch_utils import Conv1D

    from fastlora.functions import dora

    def build():
        config = LoraConfig(r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True, target_modules=["lin"])
        model = get_peft_model(Wrapper(Conv1D(45, 70)), config)
        randomize_lora(model)
        with torch.no_grad():
            model.base_model.model.lin.lora_magnitude_vector["default"].weight.uniform_(0.5, 1.5)
        return model

    state = torch.random.get_rng_state()
    reference = build()
    torch.random.set_rng_state(state)
    patched = build()
    report = fastlora.patch(patched, backend="cpp")
    computed = []
    real = dora._squared_row_norms
    monkeypatch.setattr(dora, "_squared_row_norms", lambda *a: computed.append(1) or real(*a))
    x, dy = torch.randn(3, 70), torch.randn(3, 45)
    for _ in range(3):
        (y_ref, g_ref), (y, g) = run(reference, x, dy), run(patched, x, dy)
    assert report.fused_calls == 3 and not report.fallback_calls, report
    assert len(computed) == 1
    assert_close_fp32(y, y_ref, "y")
    for key in g_ref:
        assert_close_fp32(g[key], g_ref[key], key)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_bench_dora_case_checks_against_its_reference(base):
    """The benchmark's DoRA layer case ("<base>+dora"): PEFT and fastlora both pass the fp32 reference check that
    precedes timing (so the reference formula is PEFT's DoRA), then are timed; no split or dense contender."""
    import dataclasses

    from fastlora.bench import layers
    from fastlora.bench.models import LinearShape
    from fastlora.bench.settings import default_settings
    from fastlora.bench.timing import TimingPolicy

    cpu, shape = torch.device("cpu"), LinearShape("q_proj", 64, 48, bias=True)
    settings = dataclasses.replace(default_settings("cpu"), backends=("torch", "cpp"))
    fixture = layers.make_fixture(shape, base, rank=4, dtype=torch.float32, device=cpu, seed=0)
    contenders, unavailable = layers.contenders_for(fixture, settings, cpu, dora=True)
    assert {c.name for c in contenders} == {"peft", "fastlora[torch]", "fastlora[cpp]"}
    assert {c.computes for c in contenders} == {"dora"}
    case = layers.LayerCase("micro", shape, 8, f"{base}+dora", "fwd+bwd", 4, torch.float32)
    quick = TimingPolicy(budget_s=0.0, min_rounds=2, max_rounds=2)
    for record in layers.run_case(case, fixture, contenders, unavailable, cpu, None, quick):
        assert record.status == "ok" and record.check_error <= record.tolerance, (record.contender, record.detail)
        assert record.median_s > 0
