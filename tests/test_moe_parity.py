"""Fused expert LoRA against PEFT's ``lora.ParamWrapper`` on tiny Qwen3-MoE, Mixtral, gpt-oss, OLMoE and
DeepSeek-V3 models built from transformers configs (random weights, LoRA B drawn non-zero).

Tolerances: fp32 outputs, gradients and parameters after 10 AdamW steps within 1e-5 relative of PEFT (both sides
compute in fp32; they differ by the order of a few K-long sums). 16-bit: the experts layer on fixed routing no
farther from float64 than PEFT by more than half an output ulp (PEFT rounds W + s·B·A to bf16 and the output;
fastlora computes in fp32 and rounds once), the bound of tests/test_layer_parity.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fastlora
from tests.conftest import patch_keeps_adapter_file
from tests.moe_models import VOCAB, peft_moe_model
from tests.moe_scope import BACKENDS, model_kinds
from tests.test_layer_parity import relative_error


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tokens(seed=0, batch=2, length=9):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), _lora_grads(model)


def _param_wrapper_names(model):
    from peft.tuners.lora.layer import ParamWrapper

    return {n for n, m in model.named_modules() if isinstance(m, ParamWrapper)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", model_kinds())
def test_outputs_and_gradients_match_peft(kind, backend):
    peft_model = peft_moe_model(kind).train()
    fused = copy.deepcopy(peft_model)
    report = fastlora.patch(fused, backend=backend)
    assert set(report.patched) == _param_wrapper_names(fused) and not report.skipped
    ids = _tokens()
    logits, grads = _forward_backward(peft_model, ids)
    fused_logits, fused_grads = _forward_backward(fused, ids)
    assert _rel(fused_logits, logits) < 1e-5
    assert set(fused_grads) == set(grads) and len(grads) == 4 * 2  # A and B of 2 expert weights in 2 layers
    for name, grad in grads.items():
        assert grad.abs().max() > 0 and _rel(fused_grads[name], grad) < 1e-5, name
    assert not report.fallback_calls and report.fused_calls == 2  # one call per layer's wrapper chain


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", model_kinds(interpreter_kinds=()))
def test_ten_training_steps_match_peft(kind, backend):
    peft_model = peft_moe_model(kind, seed=3).train()
    fused = copy.deepcopy(peft_model)
    report = fastlora.patch(fused, backend=backend)
    losses = {}
    for label, model in (("peft", peft_model), ("fused", fused)):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        losses[label] = []
        for step in range(10):
            ids = _tokens(seed=100 + step)
            loss = model(ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[label].append(loss.item())
    torch.testing.assert_close(torch.tensor(losses["fused"]), torch.tensor(losses["peft"]), rtol=1e-5, atol=0)
    trained = dict(peft_model.named_parameters())
    for name, param in fused.named_parameters():
        if param.requires_grad:
            assert _rel(param, trained[name]) < 1e-5, name
    assert not report.fallback_calls and report.fused_calls == 10 * 2


def _experts_and_routing(model, seed, tokens=13):
    experts = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    hidden_size = model.config.hidden_size
    num_experts = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else None
    num_experts = num_experts or getattr(model.config, "num_experts", None) or model.config.n_routed_experts
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=g)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:3] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, 3, generator=g), dim=-1)
    return experts, hidden, index, weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", model_kinds())
def test_half_precision_experts_no_farther_from_float64_than_peft(kind, backend):
    # bf16 on CPU; the interpreter's bf16 tl.dot is wrong (triton#11584), so Triton is checked in fp16 there.
    dtype = torch.float16 if backend == "triton" else torch.bfloat16
    model = peft_moe_model(kind, dtype=dtype, seed=5)
    for p in model.parameters():  # PEFT keeps ParamWrapper adapters in the weight's dtype
        p.data = p.data.to(dtype)
    results = {}
    for label in ("peft", "fused", "float64"):
        candidate = copy.deepcopy(model)
        if label == "float64":
            candidate = candidate.double()
        elif label == "fused":
            assert fastlora.patch(candidate, backend=backend).patched
        results[label] = experts_layer_call(candidate, dtype, label == "float64")
    assert_no_farther_from_float64_than_peft(results, dtype)


def experts_layer_call(model, dtype, float64: bool):
    """(output, input gradient) of the first experts layer of ``model`` on fixed routing and inputs rounded to
    ``dtype`` (computed in float64 when ``float64``: the eager experts implementation, grouped_mm has none)."""
    if float64:
        model.config._experts_implementation = "eager"
    layer, hidden, index, weights = _experts_and_routing(model, seed=6)
    cast = torch.float64 if float64 else dtype
    h = hidden.to(dtype).to(cast).requires_grad_(True)
    out = layer(h, index, weights.to(dtype).to(cast))
    out.backward(torch.ones_like(out))
    return out.detach(), h.grad


def assert_no_farther_from_float64_than_peft(results: dict, dtype) -> None:
    """``results["fused"]`` within half an output ulp of PEFT's distance to ``results["float64"]``."""
    (y, gx), (y_peft, gx_peft), (y64, gx64) = results["fused"], results["peft"], results["float64"]
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert relative_error(y, y64) <= relative_error(y_peft, y64) + 0.5 * ulp
    assert relative_error(gx, gx64) <= relative_error(gx_peft, gx64) + 0.5 * ulp
    assert relative_error(y, y64) < 4 * ulp


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_adapters_and_rslora(backend):
    peft_model = peft_moe_model("qwen3_moe", adapters=("one", "two"), use_rslora=True)
    peft_model.base_model.set_adapter(["one", "two"])
    fused = copy.deepcopy(peft_model)
    report = fastlora.patch(fused, backend=backend)
    ids = _tokens(seed=4)
    logits, grads = _forward_backward(peft_model, ids)
    fused_logits, fused_grads = _forward_backward(fused, ids)
    assert _rel(fused_logits, logits) < 1e-5
    assert any("two" in n for n in grads)
    for name, grad in grads.items():
        assert _rel(fused_grads[name], grad) < 1e-5, name
    assert not report.fallback_calls


def test_disabled_and_merged_adapters_run_peft_with_a_reason():
    peft_model = peft_moe_model("mixtral")
    fused = copy.deepcopy(peft_model)
    report = fastlora.patch(fused, backend="torch")
    ids = _tokens(seed=8)
    with peft_model.disable_adapter(), fused.disable_adapter():
        torch.testing.assert_close(fused(ids).logits, peft_model(ids).logits, rtol=0, atol=0)
    assert report.fallback_calls["adapters disabled"] == 2
    peft_model.merge_adapter()
    fused.merge_adapter()
    torch.testing.assert_close(fused(ids).logits, peft_model(ids).logits, rtol=0, atol=0)
    assert report.fallback_calls["adapters merged"] == 2
    peft_model.unmerge_adapter()
    fused.unmerge_adapter()
    before = report.fused_calls
    assert _rel(fused(ids).logits, peft_model(ids).logits) < 1e-5
    assert report.fused_calls == before + 2


def test_merge_and_unload_gives_peft_merged_model():
    peft_model = peft_moe_model("gpt_oss")
    fused = copy.deepcopy(peft_model)
    fastlora.patch(fused, backend="torch")
    ids = _tokens(seed=9)
    expected = fused(ids).logits.detach()
    merged = fused.merge_and_unload()
    assert not _param_wrapper_names(merged)
    assert _rel(merged(ids).logits, expected) < 1e-5


def test_dropout_module_runs_peft_with_a_reason():
    model = peft_moe_model("olmoe")
    report = fastlora.patch(model, backend="torch")
    wrapper = next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))
    wrapper.lora_dropout["default"] = nn.Dropout(0.1)
    model(_tokens())
    assert any("dropout" in reason for reason in report.fallback_calls)


def test_only_one_expert_weight_targeted():
    peft_model = peft_moe_model("deepseek_v3", targets=["mlp.experts.down_proj"], target_modules=["kv_a_proj_with_mqa", "o_proj"])
    fused = copy.deepcopy(peft_model)
    report = fastlora.patch(fused, backend="cpp")
    assert len(report.patched) == 2 + 4 and not report.skipped  # 2 expert wrappers, 4 linear LoRA layers
    ids = _tokens(seed=2)
    logits, grads = _forward_backward(peft_model, ids)
    fused_logits, fused_grads = _forward_backward(fused, ids)
    assert _rel(fused_logits, logits) < 1e-5
    for name, grad in grads.items():
        assert _rel(fused_grads[name], grad) < 1e-5, name


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_adapter_file_byte_identical_and_reloads(kind, tmp_path):
    from peft import PeftModel

    from tests.moe_models import moe_model

    model = peft_moe_model(kind)
    report = patch_keeps_adapter_file(model, tmp_path, "cpp")
    assert report.patched and not report.skipped
    reloaded = PeftModel.from_pretrained(moe_model(kind), tmp_path / "patched")
    ids = _tokens(seed=11)
    assert _rel(model(ids).logits, reloaded(ids).logits) < 1e-5


def test_unpatch_restores_peft_forward():
    model = peft_moe_model("qwen3_moe")
    fastlora.patch(model, backend="torch")
    assert fastlora.unpatch(model) == 2
    assert not any("forward" in m.__dict__ for m in model.modules())
    again = fastlora.patch(model, backend="torch")
    assert len(again.patched) == 4


def test_param_wrapper_outside_experts_is_left_on_peft_with_reason():
    from peft import LoraConfig, get_peft_model

    from tests.moe_models import moe_model

    model = get_peft_model(moe_model("qwen3_moe"), LoraConfig(r=2, target_parameters=["self_attn.q_proj.weight"]))
    report = fastlora.patch(model, backend="torch")
    assert report.skipped and all("not a transformers experts module" in r for r in report.skipped.values())
