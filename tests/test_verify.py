"""Issue 14: LoRA stacked on another adapter layer is never fused silently; verify mode catches a broken fused path;
adapters added after ``patch`` are patched as they appear; PEFT models of other methods are left unchanged."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from torch import nn

import fastlora
from fastlora.backends import reference
from fastlora.wiring.fused_forward import FusedForward
from fastlora.wiring.patch import is_patched
from peft import IA3Config, LoHaConfig, LoraConfig, PromptTuningConfig, get_peft_model
from tests.conftest import lora_layer_model, randomize_lora


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 3)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


def test_lora_over_loha_gives_peft_output_and_says_why():
    # The reproduction: a mixed model with LoRA stacked on a LoHa layer.
    model = get_peft_model(MLP(), LoHaConfig(target_modules=["lin0"], init_weights=False), adapter_name="inner", mixed=True)
    model.add_adapter("lora", LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    model.set_adapter(["inner", "lora"])
    x = torch.randn(5, 10, requires_grad=True)
    expected = model(x)
    grad_expected = torch.autograd.grad(expected.sum(), [x] + [p for p in model.parameters() if p.requires_grad])

    report = fastlora.patch(model, backend="torch")
    assert not report.patched
    (reason,) = report.skipped.values()
    assert "LoHa" in reason and "peft.tuners.loha" in reason
    got = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)  # PEFT's own forward: bit for bit
    grad_got = torch.autograd.grad(got.sum(), [x] + [p for p in model.parameters() if p.requires_grad])
    for g, e in zip(grad_got, grad_expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)  # the LoHa adapter trains too


def _broken(monkeypatch, op: str, factor: float):
    original = getattr(reference, op)

    def wrong(*args):
        out = original(*args)
        return tuple(o * factor for o in out) if isinstance(out, tuple) else out * factor

    monkeypatch.setattr(reference, op, wrong)


@pytest.mark.parametrize("op,what", [("lora_linear", "output"), ("lora_down_grad", "gradient of lora_A"), ("lora_linear_grad_input", "input gradient")])
def test_verify_catches_a_broken_fused_path_and_falls_back_for_good(monkeypatch, op, what, caplog):
    model = lora_layer_model(24, 40, adapters=((4, 8, 0.0, False),))
    expected_model = lora_layer_model(24, 40, adapters=((4, 8, 0.0, False),))
    expected_model.load_state_dict(model.state_dict())
    report = fastlora.patch(model, backend="torch", verify=True)
    _broken(monkeypatch, op, 1.5)  # off by 50%: what a dropped term or a wrong scale looks like
    x = torch.randn(3, 7, 24)
    with pytest.warns(RuntimeWarning, match="verify"), caplog.at_level(logging.ERROR, "fastlora"):
        got = model(x)
    (layer_name,) = report.verify_failures
    assert layer_name.endswith("lin") and what in report.verify_failures[layer_name]
    assert "differs from PEFT's by 0.5" in report.verify_failures[layer_name]
    assert any("verify" in r.message for r in caplog.records)
    torch.testing.assert_close(got, expected_model(x), rtol=0, atol=0)  # this call already ran PEFT's forward
    # Later calls, any shape, stay on PEFT's path and are counted as such.
    model(torch.randn(2, 24))
    assert report.fused_calls == 0
    assert sum(n for reason, n in report.fallback_calls.items() if reason.startswith("verify:")) == 2
    assert "1 layers failed" in str(report)


def test_verify_passes_once_per_signature_and_leaves_training_unchanged(monkeypatch):
    # Dropout on: verification runs both sides with dropout off and its own generator, so the user's random stream
    # (dropout masks, here) and the training are exactly what they are without verification.
    def run(verify: bool):
        torch.manual_seed(3)
        model = lora_layer_model(16, 12, adapters=((4, 8, 0.1, False), (2, 2, 0.0, True)))
        report = fastlora.patch(model, backend="torch", verify=verify)
        model.train()
        torch.manual_seed(4)
        outs = [model(torch.randn(5, 16)) for _ in range(2)] + [model(torch.randn(2, 3, 16))]
        return report, [o.detach() for o in outs], model

    report, outs, model = run(True)
    plain_report, plain_outs, _ = run(False)
    for a, b in zip(outs, plain_outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert report.verify and not report.verify_failures
    assert sum(report.verified.values()) == 2  # shapes (5, 16) and (2, 3, 16); the repeated shape is not verified again
    assert report.fused_calls == 3 and not report.fallback_calls
    assert not plain_report.verify and not plain_report.verified
    model.eval()  # eval mode is a new signature
    model(torch.randn(5, 16))
    assert sum(report.verified.values()) == 3


def test_verify_from_the_environment(monkeypatch):
    monkeypatch.setenv("FASTLORA_VERIFY", "1")
    model = lora_layer_model(8, 8)
    report = fastlora.patch(model, backend="torch")
    model(torch.randn(2, 8))
    assert report.verify and sum(report.verified.values()) == 1
    assert fastlora.patch(lora_layer_model(8, 8), backend="torch", verify=False).verify is False


def test_adapter_added_after_patch_is_patched_on_creation(caplog):
    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], r=4, lora_alpha=8))
    report = fastlora.patch(model, backend="torch")
    assert list(report.patched) == ["base_model.model.lin0"]
    with caplog.at_level(logging.INFO, "fastlora"):
        model.add_adapter("late", LoraConfig(target_modules=["lin0", "lin1"], r=2, lora_alpha=4))
    assert report.patched_after == ["base_model.model.lin1"] and is_patched(model.base_model.model.lin1)
    assert any("added after patch" in r.message for r in caplog.records)
    randomize_lora(model)
    model.base_model.set_adapter(["default", "late"])
    reference_model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], r=4, lora_alpha=8))
    reference_model.add_adapter("late", LoraConfig(target_modules=["lin0", "lin1"], r=2, lora_alpha=4))
    reference_model.base_model.set_adapter(["default", "late"])
    reference_model.load_state_dict(model.state_dict())
    x = torch.randn(4, 10)
    torch.testing.assert_close(model(x), reference_model(x), rtol=1e-5, atol=1e-6)
    assert report.fused_calls == 2 and not report.fallback_calls  # both layers fused, the new one included
    assert "patched when added after patch()" in str(report)

    assert fastlora.unpatch(model) == 2
    assert "inject_adapter" not in model.base_model.__dict__  # PEFT's own injection is back
    model.add_adapter("later", LoraConfig(target_modules=["lin1"], r=2))
    assert not any(is_patched(m) for m in model.modules())


@pytest.mark.parametrize(
    "config,method",
    [
        (PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), "PROMPT_TUNING"),
        (IA3Config(task_type="CAUSAL_LM", target_modules="all-linear", feedforward_modules=[]), "IA3"),
    ],
)
def test_peft_model_of_another_method_is_left_unchanged_and_reported(config, method, caplog):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import TINY_LLAMA

    model = get_peft_model(AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)), config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with caplog.at_level(logging.WARNING, "fastlora"):
        report = fastlora.patch(model)
    assert report.nothing_to_fuse and method in report.nothing_to_fuse and not report.patched
    assert any(method in r.message for r in caplog.records)
    assert not any(isinstance(m.__dict__.get("forward"), FusedForward) or "inject_adapter" in m.__dict__ for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_plain_module_is_still_an_error():
    with pytest.raises(ValueError, match="no PEFT LoRA layers"):
        fastlora.patch(MLP())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastlora.unpatch(MLP()) == 0


def test_fused_cross_entropy_through_patch_matches_and_unpatches():
    from tests.conftest import tiny_llama_peft

    model = tiny_llama_peft("dense", dtype=torch.float32)
    reference = tiny_llama_peft("dense", dtype=torch.float32)
    ids = torch.randint(0, 128, (2, 11))
    report = fastlora.patch(model, backend="torch", fused_cross_entropy=True)
    assert report.fused_loss.startswith("fused linear cross-entropy") and "loss: fused" in str(report)
    loss, expected = model(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)  # fp32: summation order only
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    fastlora.unpatch(model)
    lm = model.get_base_model()
    assert "forward" not in lm.__dict__ and model(input_ids=ids, labels=ids).logits is not None


def test_fused_cross_entropy_refused_for_lora_on_lm_head_says_why(caplog):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import TINY_LLAMA

    model = get_peft_model(AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)), LoraConfig(target_modules=["q_proj", "lm_head"]))
    with caplog.at_level(logging.WARNING, "fastlora"):
        report = fastlora.patch(model, backend="torch", fused_cross_entropy=True)
    assert report.fused_loss == "PEFT's loss (not fused: lm_head has a LoRA adapter)"
    assert any("lm_head has a LoRA adapter" in r.message for r in caplog.records)
    assert "forward" not in model.get_base_model().__dict__


def test_verify_covers_mixed_adapter_batches():
    model = lora_layer_model(12, 10, adapters=((4, 8, 0.0, False), (2, 4, 0.0, False)))
    expected_model = lora_layer_model(12, 10, adapters=((4, 8, 0.0, False), (2, 4, 0.0, False)))
    expected_model.load_state_dict(model.state_dict())
    report = fastlora.patch(model, backend="torch", verify=True)
    model.eval()
    expected_model.eval()
    x = torch.randn(3, 12)
    for names in (["default", "extra1", "__base__"], ["extra1", "__base__", "default"], ["default"] * 3):
        with torch.no_grad():
            got, want = model(x, adapter_names=names), expected_model(x, adapter_names=names)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the first two batches use the same set of adapters (one signature); the third, another set, is verified too
    assert sum(report.verified.values()) == 2 and not report.verify_failures and report.fused_calls == 3


def test_deep_copy_of_a_patched_model_patches_its_own_new_adapters():
    import copy

    model = get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], r=4, lora_alpha=8))
    report = fastlora.patch(model, backend="torch")
    clone = copy.deepcopy(model)
    clone.add_adapter("late", LoraConfig(target_modules=["lin1"], r=2))
    assert is_patched(clone.base_model.model.lin1) and not hasattr(model.base_model.model.lin1, "lora_A")
    assert report.patched_after == []  # the original's report is untouched; the copy's watch reports into its copy
    reports = [f.report for f in (m.__dict__.get("forward") for m in clone.modules()) if isinstance(f, FusedForward)]
    assert len(reports) == 2 and reports[0] is reports[1] is not report
    assert reports[0].patched_after == ["base_model.model.lin1"]


def _ill_conditioned_model(seed: int):
    """LoRA-GA-like: max|W| ~ 2e7 that s·B·A cancels down to O(1) (W + s·B·A = a random O(1) matrix), so both PEFT's
    and fastlora's fp32 rounding errors exceed the exact input gradient (issue 20 item 3)."""
    from tests.conftest import lora_layer_model

    g = torch.Generator().manual_seed(seed)
    model = lora_layer_model(32, 32, bias=False, adapters=((32, 32, 0.0, False),))  # s = 1, full rank
    layer = model.base_model.model.lin
    with torch.no_grad():
        w = torch.randn(32, 32, generator=g, dtype=torch.float64) * 2e7
        a = torch.randn(32, 32, generator=g, dtype=torch.float64)
        b = (torch.randn(32, 32, generator=g, dtype=torch.float64) - w) @ torch.linalg.inv(a)
        layer.base_layer.weight.copy_(w)
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    return model


@pytest.mark.parametrize("seed", range(3))
def test_verify_judges_an_ill_conditioned_layer_against_float64(seed):
    """A fused path as exact as float64 differs from PEFT's fp32 result by far more than the tolerance here (PEFT's
    own rounding error exceeds the result); judged against float64 it passes."""
    from fastlora.wiring import verify

    model = _ill_conditioned_model(seed)
    layer = model.base_model.model.lin
    w, a, b = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight

    def exact_fused(inputs):
        merged = w.double() + layer.scaling["default"] * (b.double() @ a.double())
        return (inputs.double() @ merged.T).float()

    x = torch.randn(6, 32)
    peft = lambda inputs: type(layer).forward(layer, inputs)  # noqa: E731
    assert verify.compare_with_peft(layer, x, exact_fused, peft) is None
    # the previous criterion (PEFT as the reference) flags it: the float64 judgement is what passes it
    with pytest.MonkeyPatch.context() as m:
        m.setattr(verify, "_float64_run", lambda *args: None)
        assert verify.compare_with_peft(layer, x, exact_fused, peft) is not None


def test_verify_still_catches_a_broken_fused_path_on_an_ill_conditioned_layer(monkeypatch):
    """The same layer with the fused path dropping the adapter: off by ~2e7, caught."""
    import importlib

    patch_module = importlib.import_module("fastlora.wiring.fused_forward")
    model = _ill_conditioned_model(0)
    report = fastlora.patch(model, backend="torch", verify=True)
    real = patch_module.lora_linear
    monkeypatch.setattr(patch_module, "lora_linear", lambda x, base, adapters, backend: real(x, base, [a._replace(scale=0.0) for a in adapters], backend))
    with pytest.warns(RuntimeWarning, match="verify"):
        model(torch.randn(6, 32))
    assert "output" in report.verify_failures["base_model.model.lin"]
