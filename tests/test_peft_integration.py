"""PEFT features keep working on a patched model: adapter files, reload, merge, disable, set_adapter, unpatch,
fallback reporting, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import fastlora
from fastlora.wiring.patch import is_patched
from tests.conftest import lora_layer_model, tiny_llama_base, tiny_llama_peft
from tests.test_model_parity import train


def _ids(batch=2, seq=16):
    return torch.randint(0, 128, (batch, seq))


@pytest.mark.parametrize("kind", ["qlora", "dense"])
def test_save_pretrained_identical_and_reloads(kind, tmp_path):
    from peft import PeftModel

    model = tiny_llama_peft(kind, dtype=torch.float32)
    model.save_pretrained(tmp_path / "before")
    state_keys_before = list(model.state_dict().keys())
    fastlora.patch(model, backend="torch")
    assert list(model.state_dict().keys()) == state_keys_before  # nothing registered on the layers
    model.save_pretrained(tmp_path / "patched")
    before = load_file(tmp_path / "before" / "adapter_model.safetensors")
    patched = load_file(tmp_path / "patched" / "adapter_model.safetensors")
    assert before.keys() == patched.keys() and len(before) == 28
    for key in before:
        assert torch.equal(before[key], patched[key]), key

    # Train a little while patched, save, reload into a fresh base: the reloaded model reproduces the outputs.
    train(model, [_ids() for _ in range(3)])
    model.save_pretrained(tmp_path / "trained")
    fresh = tiny_llama_base(kind, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "trained")
    model.eval()
    ids = _ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_disable_adapter_and_set_adapter_fall_back_and_count():
    model = lora_layer_model(48, 32, adapters=((4, 8, 0.0, False), (2, 4, 0.0, False)))
    layer = model.base_model.model.lin
    x = torch.randn(5, 48)
    with torch.no_grad():
        base_only = layer.get_base_layer()(x)
        both = model(x)
    report = fastlora.patch(model, backend="torch")
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(x), base_only)
        assert report.fallback_calls["adapters disabled"] == 1
        torch.testing.assert_close(model(x), both, rtol=1e-5, atol=1e-5)
        model.base_model.set_adapter("extra1")
        only_extra = model(x)
        assert report.fused_calls == 2
        fastlora.unpatch(model)
        torch.testing.assert_close(model(x), only_extra, rtol=1e-5, atol=1e-5)
    assert "adapters disabled: 1" in str(report)


@pytest.mark.parametrize("kind", ["qlora", "dense"])
def test_merge_and_unload(kind):
    model = tiny_llama_peft(kind, dtype=torch.float32)
    fastlora.patch(model, backend="torch")
    ids = _ids()
    model.eval()
    with torch.no_grad():
        fused = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    # Dense merge is exact up to fp32 rounding; a 4-bit merge requantizes W + BA (lossy, ~NF4 step of ~1/8 of a
    # block's absmax): compare loosely there.
    atol = 1e-4 if kind == "dense" else 0.3
    torch.testing.assert_close(merged, fused, rtol=0, atol=atol)


def test_merge_adapter_then_unmerge_uses_fresh_weights():
    """After merge_adapter the layer reports 'merged' calls; a 4-bit merge requantizes W, which invalidates the
    cached absmax, and unmerge brings fused calls back."""
    model = tiny_llama_peft("qlora", dtype=torch.float32)
    report = fastlora.patch(model, backend="torch")
    ids = _ids()
    model.eval()
    with torch.no_grad():
        model.merge_adapter()
        merged_out = model(input_ids=ids).logits
        assert report.fallback_calls["adapters merged"] == 14
        model.unmerge_adapter()
        unmerged_out = model(input_ids=ids).logits
        fastlora.unpatch(model)
        peft_out = model(input_ids=ids).logits
    assert report.fused_calls == 14
    torch.testing.assert_close(unmerged_out, peft_out, rtol=1e-5, atol=1e-5)
    assert merged_out.shape == unmerged_out.shape


def test_unpatch_restores_exactly():
    model = tiny_llama_peft("dense", dtype=torch.float32)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    originals = [m.forward for m in layers]
    assert all("forward" not in m.__dict__ for m in layers)
    fastlora.patch(model, backend="torch")
    assert all(is_patched(m) for m in layers)
    assert fastlora.unpatch(model) == 14
    assert all("forward" not in m.__dict__ for m in layers)
    assert [m.forward.__func__ for m in layers] == [o.__func__ for o in originals]
    assert fastlora.unpatch(model) == 0


def test_unpatch_restores_an_instance_forward_that_was_there():
    model = lora_layer_model(16, 8)
    layer = model.base_model.model.lin
    calls = []
    class_forward = type(layer).forward

    def hooked(x, *args, **kwargs):  # what e.g. an accelerate hook installs
        calls.append(1)
        return class_forward(layer, x, *args, **kwargs)

    layer.forward = hooked
    fastlora.patch(model, backend="torch")
    with model.disable_adapter():
        model(torch.randn(2, 16))  # fallback goes through the previous instance forward
    assert calls == [1]
    fastlora.unpatch(model)
    assert layer.forward is hooked


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains(reentrant):
    ids = [_ids() for _ in range(2)]
    batches = [ids[i % 2] for i in range(6)]
    reference = tiny_llama_peft("qlora", dtype=torch.float32, dropout=0.0)
    patched = tiny_llama_peft("qlora", dtype=torch.float32, dropout=0.0)
    for model in (reference, patched):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    report = fastlora.patch(patched, backend="torch")
    ref_losses = train(reference, batches)
    losses = train(patched, batches)
    # Recomputation runs the layers twice per step.
    assert report.fused_calls == 2 * 14 * len(batches) and not report.fallback_calls
    assert max(abs(a - b) for a, b in zip(ref_losses, losses)) < 1e-4  # fp32 tolerance as in test_model_parity
    assert losses[-1] < losses[0]


