"""NF4 experts (``fastlora.moe.quantize_experts``, ``fastlora.patch(quantize_experts="nf4")``): the storage is
bitsandbytes' ``quantize_4bit`` of each expert's [out, in] slice, bit for bit; NF4-expert models against PEFT run on
the dequantized NF4 weights (dense parameters holding exactly what ``dequantize_4bit`` gives).

Tolerances: fp32 outputs and gradients within 1e-5 relative of PEFT (both compute in fp32 on the same W values;
they differ by the order of K-long sums, as in tests/test_moe_parity.py); bf16 (fp16 under the interpreter) no
farther from float64 than PEFT by more than half an output ulp. The Triton kernel against the torch path
on the same NF4 weights: fp32 1e-5 relative; fp16 (both round W to fp16 as ``dequantize_4bit`` does, then
accumulate in fp32 and round the output once) 2e-3 relative, a few fp16 ulps.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import fastlora
from fastlora.moe import nf4_experts
from fastlora.moe import dequantize_experts, nf4_nbytes, quantize_experts
from fastlora.moe.nf4_experts import expert_stack
from fastlora.moe.nf4_quantize import experts_modules
from tests.moe_models import MODELS, VOCAB, peft_moe_model

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["torch", "cpp"] if not INTERPRETING else [pytest.param("triton", marks=pytest.mark.interpreter)]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tokens(seed=0, batch=2, length=9):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.logits.detach(), grads


def _reference(kind, **kwargs):
    """The same PEFT model on dense weights holding the dequantized NF4 values, on PEFT's own path."""
    model = peft_moe_model(kind, **kwargs)
    quantize_experts(model, progress=False)
    dequantize_experts(model)
    return model


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("nested", [True, False])
def test_storage_is_bitsandbytes_quantize_4bit_per_slice(kind, nested):
    import bitsandbytes.functional as bnbF

    model = peft_moe_model(kind, torch.bfloat16)
    dense = {(name, p): experts._parameters[p].detach().clone() for name, experts in experts_modules(model) for p in ("gate_up_proj", "down_proj")}
    summary = quantize_experts(model, compress_statistics=nested, progress=False)
    assert len(summary.projections) == len(dense) == 4 and len(summary.modules) == 2
    modules = dict(experts_modules(model))
    for (name, proj), weight in dense.items():
        experts = modules[name]
        assert proj not in experts._parameters  # the dense stack is freed
        stack = expert_stack(experts, proj)
        slices = weight.transpose(1, 2) if experts.is_transposed else weight  # expert e's [out, in] matrix
        dequantized = stack.dequantize()
        for e in range(slices.shape[0]):
            packed, state = bnbF.quantize_4bit(slices[e].contiguous(), blocksize=64, compress_statistics=nested, quant_type="nf4")
            assert torch.equal(stack.packed[e], packed.view(torch.uint8).reshape(-1))
            assert torch.equal(stack.absmax[e], state.absmax)
            if nested:
                assert torch.equal(stack.absmax2[e], state.state2.absmax) and torch.equal(stack.code2, state.state2.code)
                assert torch.equal(stack.offset[e], state.offset)
            assert torch.equal(dequantized[e], bnbF.dequantize_4bit(packed, state))
        stored = sum(b.nbytes for n, b in experts._buffers.items() if n.startswith(f"{proj}_nf4_"))
        assert summary.projections[f"{name}.{proj}"] == (weight.nbytes, stored) == (weight.nbytes, nf4_nbytes(*slices.shape, 64, nested))


@pytest.mark.parametrize("shape", [(3, 7, 33), (2, 5, 100)])  # odd N·K (a half-used last byte), blocks across rows
def test_odd_shapes_dequantize_like_bitsandbytes(shape):
    import bitsandbytes.functional as bnbF

    holder = nn.Module()
    holder.is_transposed = False
    holder.w = nn.Parameter(torch.randn(shape), requires_grad=False)
    weight = holder.w.detach().clone()
    nf4_experts.quantize_projection(holder, "w", 64, True)
    stack = expert_stack(holder, "w")
    for e in range(shape[0]):
        packed, state = bnbF.quantize_4bit(weight[e].contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(stack[e], bnbF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(MODELS) if not INTERPRETING else ["qwen3_moe"])
def test_outputs_and_gradients_match_peft_on_dequantized_weights(kind, backend):
    reference = _reference(kind).train()
    fused = peft_moe_model(kind).train()
    report = fastlora.patch(fused, backend=backend, quantize_experts="nf4")
    assert len(report.quantized_experts) == 4 and len(report.patched) == 4 and not report.skipped
    assert "expert weights in NF4" in str(report)
    ids = _tokens()
    logits, grads = _forward_backward(reference, ids)
    fused_logits, fused_grads = _forward_backward(fused, ids)
    assert _rel(fused_logits, logits) < 1e-5
    assert set(fused_grads) == set(grads) and len(grads) == 8
    for name, grad in grads.items():
        assert grad.abs().max() > 0 and _rel(fused_grads[name], grad) < 1e-5, name
    assert not report.fallback_calls and report.fused_calls == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"] if not INTERPRETING else ["gpt_oss"])
def test_half_precision_no_farther_from_float64_than_peft(kind, backend):
    """The experts layer on fixed routing, W the same NF4 values everywhere: fused (NF4), PEFT (dense copies) and
    float64; the bound of tests/test_moe_parity.py (half an output ulp beyond PEFT's own error)."""
    from tests.test_moe_parity import assert_no_farther_from_float64_than_peft, experts_layer_call

    dtype = torch.float16 if backend == "triton" else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    results = {}
    for label in ("peft", "fused", "float64"):
        model = peft_moe_model(kind, dtype=dtype, seed=5)
        for p in model.parameters():  # PEFT keeps ParamWrapper adapters in the weight's dtype
            p.data = p.data.to(dtype)
        quantize_experts(model, progress=False)
        if label == "fused":
            fastlora.patch(model, backend=backend)
        else:
            dequantize_experts(model)
        results[label] = experts_layer_call(model.double() if label == "float64" else model, dtype, label == "float64")
    assert_no_farther_from_float64_than_peft(results, dtype)


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_training_steps_match_peft_without_fallback():
    reference, fused = _reference("qwen3_moe").train(), peft_moe_model("qwen3_moe").train()
    report = fastlora.patch(fused, backend="cpp", quantize_experts="nf4")
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (reference, fused)]
    for step in range(4):
        ids = _tokens(seed=step)
        for model, optimizer in zip((reference, fused), optimizers):
            optimizer.zero_grad()
            model(ids, labels=ids).loss.backward()
            optimizer.step()
    trained = dict(reference.named_parameters())
    for name, param in fused.named_parameters():
        if param.requires_grad:
            assert _rel(param, trained[name]) < 1e-5, name
    assert not report.fallback_calls and report.fused_calls == 2 * 4


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_lora_on_attention_only_runs_nf4_experts():
    targets = dict(targets=[], target_modules=["q_proj", "v_proj"])
    reference, fused = _reference("olmoe", **targets), peft_moe_model("olmoe", **targets)
    report = fastlora.patch(fused, backend="cpp", quantize_experts="nf4")
    assert len(report.quantized_experts) == 4
    ids = _tokens(seed=3)
    logits, grads = _forward_backward(reference, ids)
    fused_logits, fused_grads = _forward_backward(fused, ids)
    assert _rel(fused_logits, logits) < 1e-5
    for name, grad in grads.items():
        assert _rel(fused_grads[name], grad) < 1e-5, name


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_disabled_adapters_stay_fused_on_nf4():
    reference, fused = _reference("mixtral"), peft_moe_model("mixtral")
    report = fastlora.patch(fused, backend="cpp", quantize_experts="nf4")
    ids = _tokens(seed=5)
    with reference.disable_adapter(), fused.disable_adapter():
        assert _rel(fused(ids).logits, reference(ids).logits) < 1e-5
    assert not report.fallback_calls and report.fused_calls == 2


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_fallback_runs_peft_on_dequantized_copies_with_a_reason():
    reference, fused = _reference("mixtral").eval(), peft_moe_model("mixtral").eval()
    report = fastlora.patch(fused, backend="torch", quantize_experts="nf4")
    for model in (reference, fused):  # eval: dropout is the identity, but PEFT's path is the one that honours it
        for name, module in model.named_modules():
            if name.endswith("mlp.experts"):
                module.lora_dropout["default"] = nn.Dropout(0.1)
    ids = _tokens(seed=6)
    torch.testing.assert_close(fused(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert sum(calls for reason, calls in report.fallback_calls.items() if "dropout" in reason) == 2
    assert all(nf4_experts.is_quantized(m) and "down_proj" not in m._parameters for _, m in experts_modules(fused))


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_adapter_file_is_peft_byte_for_byte(tmp_path):
    reference, fused = peft_moe_model("gpt_oss"), peft_moe_model("gpt_oss")
    fastlora.patch(fused, backend="cpp", quantize_experts="nf4")
    reference.save_pretrained(tmp_path / "peft")
    fused.save_pretrained(tmp_path / "nf4")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "nf4" / name).read_bytes() == (tmp_path / "peft" / name).read_bytes(), name


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_merge_and_unload_merges_into_dequantized_weights():
    reference, fused = _reference("qwen3_moe"), peft_moe_model("qwen3_moe")
    fastlora.patch(fused, backend="cpp", quantize_experts="nf4")
    ids = _tokens(seed=7)
    expected = reference.merge_and_unload()(ids).logits
    merged = fused.merge_and_unload()
    for _, experts in experts_modules(merged):
        assert not nf4_experts.is_quantized(experts) and experts._parameters["gate_up_proj"].dtype == torch.float32
        assert "forward" not in experts.__dict__
    assert _rel(merged(ids).logits, expected) < 1e-5


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_merge_adapter_dequantizes_then_merges_and_unmerges():
    reference, fused = _reference("olmoe"), peft_moe_model("olmoe")
    report = fastlora.patch(fused, backend="cpp", quantize_experts="nf4")
    ids = _tokens(seed=8)
    expected = reference(ids).logits
    fused.merge_adapter()
    assert not any(nf4_experts.is_quantized(m) for _, m in experts_modules(fused))
    assert _rel(fused(ids).logits, expected) < 1e-5 and report.fallback_calls["adapters merged"] == 2
    fused.unmerge_adapter()
    calls = report.fused_calls
    assert _rel(fused(ids).logits, expected) < 1e-5 and report.fused_calls == calls + 2  # fused again, on dense weights


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_unpatch_gives_peft_the_dequantized_weights():
    reference, fused = _reference("gpt_oss"), peft_moe_model("gpt_oss")
    fastlora.patch(fused, backend="torch", quantize_experts="nf4")
    assert fastlora.unpatch(fused) == 2
    assert not any("forward" in m.__dict__ for m in fused.modules())
    assert not any(nf4_experts.is_quantized(m) for _, m in experts_modules(fused))
    ids = _tokens(seed=4)
    torch.testing.assert_close(fused(ids).logits, reference(ids).logits, rtol=0, atol=0)


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_bad_requests_raise_before_changing_anything():
    from tests.moe_models import moe_model

    model = peft_moe_model("qwen3_moe")
    with pytest.raises(ValueError, match="quant_type"):
        fastlora.patch(model, backend="torch", quantize_experts="fp4")
    assert not any(nf4_experts.is_quantized(m) for _, m in experts_modules(model))
    assert not any("forward" in m.__dict__ for m in model.modules())  # patch undone
    trainable = moe_model("qwen3_moe")  # no PEFT: expert weights still trainable
    with pytest.raises(ValueError, match="requires grad"):
        quantize_experts(trainable)
    assert not any(nf4_experts.is_quantized(m) for _, m in experts_modules(trainable))


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_error_midway_leaves_no_module_quantized(monkeypatch):
    reference, original, model = _reference("qwen3_moe"), peft_moe_model("qwen3_moe"), peft_moe_model("qwen3_moe")
    real, calls = nf4_experts.quantize_projection, []

    def failing_third(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise RuntimeError("injected")
        real(*args)

    monkeypatch.setattr(nf4_experts, "quantize_projection", failing_third)
    with pytest.raises(RuntimeError, match="injected"):
        quantize_experts(model, progress=False)
    modules = [m for _, m in experts_modules(model)]
    assert not any(nf4_experts.is_quantized(m) or "forward" in m.__dict__ for m in modules)
    # Layer 0 was quantized and undone (dense, holding the NF4 values); layer 1 was never touched.
    for experts, source in zip(modules, ([m for _, m in experts_modules(reference)][0], [m for _, m in experts_modules(original)][1])):
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(experts._parameters[name], source._parameters[name]), name
    assert torch.isfinite(model(_tokens(seed=9)).logits).all()  # PEFT's own path runs


@pytest.mark.skipif(INTERPRETING, reason="CPU backends")
def test_meta_device_gives_accounted_bytes():
    import transformers

    from tests.moe_models import MODELS, _COMMON

    name, kwargs = MODELS["qwen3_moe"]
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**{**_COMMON, **kwargs}))
    model.requires_grad_(False)
    summary = quantize_experts(model, progress=False)
    experts = dict(experts_modules(model))
    held = sum(b.nbytes for m in experts.values() for b in m.buffers())
    assert summary.bytes_after == held and summary.bytes_before == 2 * (8 * 48 * 32 + 8 * 32 * 24) * 4


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRETING, reason="Triton kernels run under TRITON_INTERPRET=1 in their own process")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("experts,n,k,nested", [(5, 40, 64, True), (3, 24, 36, False), (4, 9, 33, True)])
def test_triton_grouped_op_matches_torch_on_nf4(dtype, experts, n, k, nested):
    from fastlora.moe.nf4_grouped import nf4_grouped_lora_linear

    torch.manual_seed(experts + n + k)
    holder = nn.Module()
    holder.is_transposed = False
    holder.w = nn.Parameter(torch.randn(experts, n, k).to(dtype), requires_grad=False)
    nf4_experts.quantize_projection(holder, "w", 64, nested)
    stack = expert_stack(holder, "w")
    counts = torch.tensor([3, 0, 7, 1, 2][:experts])  # an expert without rows, one with a single row
    offsets = counts.cumsum(0).int()
    rows, r = int(offsets[-1]), 3
    x = torch.randn(rows, k).to(dtype).requires_grad_()
    a = (torch.randn(experts, r, k) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(experts, n, r) * 0.3).to(dtype).requires_grad_()
    dy = torch.randn(rows, n).to(dtype)
    results = []
    for backend in ("torch", "triton"):
        y = nf4_grouped_lora_linear(x, offsets, stack, [(a, b, 1.5)], backend)
        results.append((y, *torch.autograd.grad(y, (x, a, b), dy)))
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    for expected, got in zip(*results):
        assert got.dtype == expected.dtype and _rel(got, expected) < tolerance


@pytest.mark.skipif(INTERPRETING, reason="static compilation needs Triton without the interpreter")
@pytest.mark.parametrize("transposed", [False, True])
def test_nf4_grouped_kernel_compiles_for_sm90(transposed):
    from tests.test_moe_triton_compile import SHARED_LIMIT_SM90, _compile

    from fastlora.kernels import grouped_lora as g

    pointers = {"x_ptr": "bf16", "w_ptr": "u8", "out_ptr": "bf16", "offsets_ptr": "i32", "tile_ends_ptr": "i32"}
    constexprs = dict(HAS_LORA=True, HAS_SCALE=False, BLOCK_E=128, BLOCK_R=16, BLOCK_M=g.BLOCK_M, BLOCK_N=g.BLOCK_N,
                      BLOCK_K=g.BLOCK_K, PRECISION="tf32", UPCAST=False, NF4=True, W_TRANSPOSED=transposed,
                      BLOCKSIZE=64, EVEN_K=True, ROW_SCALE=True)  # fmt: skip
    compiled = _compile(g.grouped_lora_kernel, pointers, constexprs)
    assert compiled.asm["cubin"] and compiled.metadata.shared <= SHARED_LIMIT_SM90
