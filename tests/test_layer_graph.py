"""The per-call graph choice (fastlora.functions.graph) and its C++ candidate, the whole layer as one C++ autograd node
(``cpp.lora_layer``, csrc/lora_layer.cpp): outputs and gradients against float64 math and against fastlora's own
Function on the torch reference backend (same dropout seeds), for every base the C++ ops serve, and through PEFT
models with each graph forced.

Tolerances: fp32 compute, so 1e-5 of the largest value (summation order only; a wrong scale or a dropped term is
off by tens of percent); a bf16 output adds its own rounding (2**-8 relative: 1e-2)."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import backends, tuning
from fastlora.formats.dropout import draw_seeds
from fastlora.functions.lora import LoRALinearFunction, _Config
from tests.conftest import lora_layer_model

pytestmark = pytest.mark.skipif(backends.unavailable_reason("cpp", "cpu") is not None, reason="needs the C++ backend")

FP32 = 1e-5


@pytest.fixture(autouse=True)
def _fresh_choices(tmp_path, monkeypatch):
    """Every test starts with no choices made and an empty cache of its own, and leaves none behind (a forced path
    set here must not outlive the test)."""
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    tuning.reset()
    yield
    monkeypatch.undo()
    tuning.reset()


def _close(got: torch.Tensor, want: torch.Tensor, tolerance: float) -> None:
    assert got.shape == want.shape
    error = (got.double() - want.double()).abs().max().item() / max(want.double().abs().max().item(), 1e-12)
    assert error <= tolerance, error


def _base(kind: str, n: int, k: int):
    """(weight, absmax, blocksize, W as float64) of a random frozen base of ``kind``."""
    w = torch.randn(n, k) / k**0.5
    if kind == "nf4":
        import bitsandbytes.functional as bnbF

        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        dense = bnbF.dequantize_4bit(packed, state).double()
        return packed.reshape(-1), state.absmax.float(), 64, dense
    if kind == "int8":
        import bitsandbytes.functional as bnbF

        codes, scb, _ = bnbF.int8_vectorwise_quant(w.half())
        return codes, scb, 0, bnbF.int8_vectorwise_dequant(codes, scb).double()
    dtype = {"dense": torch.float32, "bf16": torch.bfloat16}[kind]
    w = w.to(dtype)
    return w, None, 0, w.double()


@pytest.mark.parametrize("kind", ["dense", "bf16", "nf4", "int8"])
@pytest.mark.parametrize("m", [1, 7])
@pytest.mark.parametrize("bias", [False, True])
def test_native_layer_matches_float64(kind, m, bias):
    """No dropout: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ and the gradients of x, A and B, against float64 math on the same W."""
    n, k, r, scale = 33, 130, 5, 1.75
    weight, absmax, blocksize, w64 = _base(kind, n, k)
    x_dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    x = torch.randn(m, k).to(x_dtype).requires_grad_()
    a, b = (torch.randn(r, k) * 0.1).requires_grad_(), (torch.randn(n, r) * 0.1).requires_grad_()
    b0 = torch.randn(n).to(x_dtype) if bias else None
    y = _native(x, a, b, weight, absmax, blocksize, b0, 0.0, scale)
    grad_y = torch.randn(m, n).to(x_dtype)
    got = (y, *torch.autograd.grad(y, (x, a, b), grad_y))

    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, a, b))
    y64 = x64 @ w64.T + scale * (x64 @ a64.T) @ b64.T + (0 if b0 is None else b0.double())
    want = (y64, *torch.autograd.grad(y64, (x64, a64, b64), grad_y.double()))
    tolerance = 1e-2 if x_dtype is torch.bfloat16 else FP32
    for g, w, dtype in zip(got, want, (x_dtype, x_dtype, torch.float32, torch.float32)):
        assert g.dtype == dtype
        _close(g, w, tolerance)


@pytest.mark.parametrize("kind", ["dense", "nf4"])
def test_native_layer_with_dropout_matches_the_reference_function(kind):
    """Dropout p=0.3: the node regenerates the same masks in backward as fastlora's Function on the torch reference
    backend does with the same seed."""
    n, k, r, p, scale = 40, 192, 8, 0.3, 2.0
    weight, absmax, blocksize, _ = _base(kind, n, k)
    x = torch.randn(9, k, requires_grad=True)
    a, b = (torch.randn(r, k) * 0.1).requires_grad_(), (torch.randn(n, r) * 0.1).requires_grad_()
    seeds = draw_seeds(1, "cpu")
    grad_y = torch.randn(9, n)
    y = _native(x, a, b, weight, absmax, blocksize, None, p, scale, seeds)
    got = (y, *torch.autograd.grad(y, (x, a, b), grad_y))
    config = _Config(blocksize, (r,), (scale,), (p,), "torch")
    y_ref = LoRALinearFunction.apply(x, weight, absmax, None, seeds, None, config, a, b)
    want = (y_ref, *torch.autograd.grad(y_ref, (x, a, b), grad_y))
    for g, w in zip(got, want):
        _close(g, w, FP32)
    # the dropout mattered: without it the LoRA term differs
    y_no_drop = _native(x, a, b, weight, absmax, blocksize, None, 0.0, scale, seeds)
    assert (y_no_drop - y).abs().max() > 1e-3


def test_native_layer_gradients_follow_what_requires_them():
    """Only A and B trainable (x frozen): no dx; bf16 adapter weights get bf16 gradients; no graph without grad."""
    from fastlora.backends import cpp

    weight = torch.randn(16, 24)
    x = torch.randn(3, 24)
    a, b = torch.randn(4, 24).bfloat16().requires_grad_(), torch.randn(16, 4).bfloat16().requires_grad_()
    seeds = torch.zeros(1, dtype=torch.int64)
    y = cpp.lora_layer(x, a, b, weight, None, 0, None, seeds, 0.0, 2.0)
    grad_a, grad_b = torch.autograd.grad(y.sum(), (a, b))
    assert grad_a.dtype == grad_b.dtype == torch.bfloat16
    _close(grad_b, (2.0 * (x @ a.float().T)).sum(0).expand(16, 4), 1e-2)
    with torch.no_grad():
        assert cpp.lora_layer(x, a, b, weight, None, 0, None, seeds, 0.0, 2.0).grad_fn is None
    with pytest.raises(RuntimeError, match="frozen"):
        cpp.lora_layer(x, a, b, weight, None, 0, torch.zeros(16, requires_grad=True), seeds, 0.0, 2.0)


def _native(x, a, b, weight, absmax, blocksize, bias, p, scale, seeds=None):
    from fastlora.backends import cpp

    seeds = torch.zeros(1, dtype=torch.int64) if seeds is None else seeds
    return cpp.lora_layer(x, a, b, weight, absmax, blocksize, bias, seeds, p, scale)


@pytest.mark.parametrize("graph_path", ["function", "autograd", "native"])
def test_forced_graph_through_peft_matches_peft(monkeypatch, graph_path):
    """A dense fp32 PEFT layer's forward+backward on each graph equals PEFT's: output and the gradients of x, A and
    B within 1e-5 (fp32, summation order only); the decision says it was forced."""
    model = lora_layer_model(200, 75, base="dense", dtype=torch.float32, bias=True)
    layer = model.base_model.model.lin
    x = torch.randn(3, 200, requires_grad=True)
    weights = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    want_y = model(x)
    want = torch.autograd.grad(want_y.sum(), weights)
    monkeypatch.setenv(tuning.PATH_ENV, f"lora_layer={graph_path}")
    tuning.reset()
    fastlora.patch(model, backend="cpp")
    got_y = model(x)
    got = torch.autograd.grad(got_y.sum(), weights)
    for g, w in zip((got_y, *got), (want_y, *want)):
        _close(g.detach(), w.detach(), FP32)
    layer_decisions = [d for d in tuning.decisions() if d.key.op == "lora_layer"]
    assert [(d.path, d.source) for d in layer_decisions] == [(graph_path, f"forced by {tuning.PATH_ENV}")]
    # the function graph runs the five tuned ops; the others none of them
    assert len(tuning.decisions()) == (6 if graph_path == "function" else 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dense_autograd_graph_is_peft_chain_at_few_rows_only(monkeypatch, dtype):
    """A dense bf16/fp16 W with PEFT's fp32 adapters: forced onto "autograd" (torch's nodes in PEFT's order: base
    output rounded to x's dtype, the LoRA chain in fp32, the sum rounded once) a call equals PEFT's output and x, A, B
    gradients to within one rounding of x's dtype (2**-8 relative for bf16, 2**-11 for fp16; the fused addmm may
    round the fp32 sum differently by an ulp before the final rounding). Unforced, "autograd" is timed with the other
    graphs at few rows and is not a candidate above HALF_AUTOGRAD_MAX_TOKENS rows (it saves x in fp32, as PEFT does)."""
    from fastlora.functions import graph

    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    model = lora_layer_model(96, 40, base="dense", dtype=dtype, bias=True)
    layer = model.base_model.model.lin
    assert layer.lora_A["default"].weight.dtype is torch.float32  # PEFT's default: adapters kept in fp32
    x = torch.randn(5, 96, dtype=dtype, requires_grad=True)
    weights = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # a LoRA term of the base's size, so both parts are checked
    want_y = model(x)
    want = torch.autograd.grad(want_y.float().square().sum(), weights)
    monkeypatch.setenv(tuning.PATH_ENV, "lora_layer=autograd")
    tuning.reset()
    fastlora.patch(model, backend="cpp")
    got_y = model(x)
    got = torch.autograd.grad(got_y.float().square().sum(), weights)
    for g, w in zip((got_y, *got), (want_y, *want)):
        _close(g.detach(), w.detach(), 2 * ulp)
    assert [d.path for d in tuning.decisions() if d.key.op == "lora_layer"] == ["autograd"]
    monkeypatch.delenv(tuning.PATH_ENV)
    tuning.reset()
    for rows in (3, graph.HALF_AUTOGRAD_MAX_TOKENS + 1):
        model(torch.randn(rows, 96, dtype=dtype, requires_grad=True)).float().sum().backward()
    timed = [set(d.times_us) for d in tuning.decisions() if d.key.op == "lora_layer"]
    assert len(timed) == 2 and "autograd" in timed[0] and "autograd" not in timed[1], timed


def test_graph_candidates_per_base_are_measured():
    """Dense fp32 times all three graphs; NF4 (and dropout) times the two that compute it; a training call and a
    frozen layer's call are separate keys (a trainable layer under no_grad shares the training key)."""
    for base in ("dense", "nf4"):
        model = lora_layer_model(200, 75, base=base, dtype=torch.float32)
        fastlora.patch(model, backend="cpp")
        model(torch.randn(2, 200, requires_grad=True)).sum().backward()
        with torch.no_grad():
            model(torch.randn(2, 200))
        model.requires_grad_(False)
        with torch.no_grad():
            model(torch.randn(2, 200))
    found = {(d.key.op, d.key.base): set(d.times_us) for d in tuning.decisions() if d.key.op.startswith("lora_layer")}
    assert found == {
        ("lora_layer", "float32"): {"native", "function", "autograd"},
        ("lora_layer_inference", "float32"): {"native", "function", "autograd"},
        ("lora_layer", "nf4"): {"native", "function"},
        ("lora_layer_inference", "nf4"): {"native", "function"},
    }
    assert all(d.source == "measured here" for d in tuning.decisions() if d.key.op.startswith("lora_layer"))


def test_stored_choice_without_a_new_candidate_is_measured_again(tmp_path):
    """A cache entry timed before a candidate existed (here: only "function" and "autograd") is not trusted: the key
    is measured again with every candidate, and the entry rewritten."""
    import json

    cache = tmp_path / "tuning.json"
    model = lora_layer_model(64, 48, base="dense", dtype=torch.float32)
    fastlora.patch(model, backend="cpp")
    model(torch.randn(1, 64, requires_grad=True)).sum().backward()
    payload = json.loads(cache.read_text())
    entries = next(iter(payload["devices"].values()))
    key = next(text for text in entries if "|lora_layer|" in text)
    entries[key] = {"path": "function", "times_us": {"function": 1.0, "autograd": 2.0}}
    cache.write_text(json.dumps(payload))

    tuning.reset()
    model(torch.randn(1, 64, requires_grad=True)).sum().backward()
    decision = next(d for d in tuning.decisions() if d.key.op == "lora_layer")
    assert decision.source == "measured here" and set(decision.times_us) == {"native", "function", "autograd"}
    rewritten = next(iter(json.loads(cache.read_text())["devices"].values()))[key]
    assert set(rewritten["times_us"]) == {"native", "function", "autograd"}


@pytest.mark.parametrize("reentrant", [True, False])
def test_native_graph_under_activation_checkpointing_trains_like_peft(monkeypatch, reentrant):
    """QLoRA (fp32 compute) with gradient checkpointing, every layer on the C++ node: recomputation runs inside the
    node's backward (when it unpacks x), and the per-step losses equal PEFT's within 1e-4 (fp32, as in
    test_model_parity)."""
    from tests.conftest import tiny_llama_peft
    from tests.test_model_parity import train

    monkeypatch.setenv(tuning.PATH_ENV, "lora_layer=native")
    tuning.reset()
    data = [torch.randint(0, 128, (2, 16)) for _ in range(2)]
    batches = [data[i % 2] for i in range(4)]
    models = [tiny_llama_peft("qlora", dtype=torch.float32, dropout=0.0) for _ in range(2)]
    for model in models:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    report = fastlora.patch(models[1], backend="cpp")
    reference, losses = train(models[0], batches), train(models[1], batches)
    assert report.fused_calls == 2 * 14 * len(batches) and not report.fallback_calls
    assert max(abs(a - b) for a, b in zip(reference, losses)) < 1e-4
    assert {d.path for d in tuning.decisions() if d.key.op == "lora_layer"} == {"native"}


@pytest.mark.parametrize("backend,forced", [("torch", None), ("cpp", "native"), ("cpp", None)])
def test_checkpointing_recomputes_the_same_dropout_masks(monkeypatch, tmp_path, backend, forced):
    """With dropout, recomputation under checkpointing regenerates the forward's masks (checkpoint restores the RNG
    state, and the seeds come from it): adapter gradients with and without checkpointing agree elementwise (fp32:
    1e-5 relative). On the C++ backend unforced, every layer's graph is measured during the first forward, which
    recomputation does not repeat: the measurement must leave the random generators as it found them, or the
    recomputed seeds (and masks) differ."""
    from tests.conftest import tiny_llama_peft

    if forced:
        monkeypatch.setenv(tuning.PATH_ENV, f"lora_layer={forced}")
    ids = torch.randint(0, 128, (2, 16))
    grads = []
    for checkpointing in (False, True):
        monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / f"checkpointing-{checkpointing}.json"))
        tuning.reset()  # each run measures anew
        model = tiny_llama_peft("dense", dtype=torch.float32, dropout=0.2)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        fastlora.patch(model, backend=backend)
        model.train()
        torch.manual_seed(42)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 28
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)
    sources = {d.source for d in tuning.decisions() if d.key.op == "lora_layer"}
    if backend == "cpp":
        assert sources == ({f"forced by {tuning.PATH_ENV}"} if forced else {"measured here"})


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_trainable_layer_rounds_the_same_with_grad_off(monkeypatch, reentrant):
    """QLoRA in bf16 (where "native" and "native_half" round differently), with the training and the inference graph
    forced apart: reentrant checkpointing runs each layer's first forward under no_grad, and a trainable layer must
    run the training decision there, or the loss (from that forward) and the gradients (from the recomputation with
    grad) come from two different roundings. Checked bitwise against the same step without checkpointing; a frozen
    layer under no_grad still takes the inference decision."""
    from tests.conftest import tiny_llama_peft

    monkeypatch.setenv(tuning.PATH_ENV, "lora_layer=native,lora_layer_inference=native_half")
    tuning.reset()
    ids = torch.randint(0, 128, (2, 16))
    losses = []
    for checkpointing in (False, True):
        model = tiny_llama_peft("qlora", dtype=torch.bfloat16)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        report = fastlora.patch(model, backend="cpp")
        model.train()
        losses.append(model(input_ids=ids, labels=ids).loss.detach())
        assert report.fused_calls == 14 and not report.fallback_calls
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=ids).loss)
    assert all(torch.equal(loss, losses[0]) for loss in losses), losses
    assert {d.key.op for d in tuning.decisions()} == {"lora_layer"}
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        frozen = model(input_ids=ids, labels=ids).loss
    assert {d.key.op for d in tuning.decisions()} == {"lora_layer", "lora_layer_inference"}
    assert not torch.equal(frozen, losses[0])  # the inference graph was run, and it rounds otherwise
