"""Offloaded checkpoints (fastlora.training.offload, ``patch(offload_checkpoints=True)``) on real transformers/PEFT models.

The offloaded step runs the same operations as transformers' own checkpointing (forward under no_grad, recompute
with gradients in backward, the random generators replayed), only with the layer input copied out and back, so
gradients and losses are compared for exact equality (``torch.equal``), not within a tolerance. The tiny models'
layer inputs are far below MIN_BYTES (1 MiB), so the tests lower the bound to 0 to offload every layer.
"""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from peft import LoraConfig

import fastlora
from fastlora.training import offload
from tests.conftest import TINY_LLAMA, lora_layer_model, randomize_lora, tiny_llama_peft
from tests.test_trainers import BEST_CPU_BACKEND, FP32_LOSS_TOL, max_abs_diff, train_with_trainer

SEQ = 29  # odd: no shape lines up with anything


@pytest.fixture
def offload_everything(monkeypatch):
    monkeypatch.setattr(offload, "MIN_BYTES", 0)


def _two_adapter_subset(kind: str, dtype) -> torch.nn.Module:
    """Two active adapters, the second on a subset of the projections, both with dropout."""
    model = tiny_llama_peft(kind, dtype=dtype, dropout=0.1)
    model.add_adapter("extra", LoraConfig(r=4, lora_alpha=4, lora_dropout=0.2, target_modules=["v_proj", "up_proj"]))
    model.base_model.set_adapter(["default", "extra"])
    randomize_lora(model, std=0.05)
    return model


def _step(model, ids, offloaded: bool, **patch_options):
    """Loss and trainable gradients of one checkpointed training step (generators reset before it)."""
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = fastlora.patch(model, backend=BEST_CPU_BACKEND, offload_checkpoints=offloaded, **patch_options)
    torch.manual_seed(1234)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    fastlora.unpatch(model)
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, report


@pytest.mark.parametrize("build", ["dense-fp32", "qlora-bf16", "dense-dropout", "qlora-two-adapters-subset"])
def test_gradients_identical_to_checkpointing_on_device(build, offload_everything):
    kinds = {
        "dense-fp32": lambda: tiny_llama_peft("dense", dtype=torch.float32),
        "qlora-bf16": lambda: tiny_llama_peft("qlora", dtype=torch.bfloat16),
        "dense-dropout": lambda: tiny_llama_peft("dense", dtype=torch.float32, dropout=0.1),
        "qlora-two-adapters-subset": lambda: _two_adapter_subset("qlora", torch.bfloat16),
    }
    model = kinds[build]()
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, SEQ))
    ref_loss, ref_grads, _ = _step(model, ids, offloaded=False)
    loss, grads, report = _step(model, ids, offloaded=True)
    assert report.offload_calls == {"offloaded": TINY_LLAMA["num_hidden_layers"]}, str(report)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), f"{name}: max diff {(g - ref_grads[name]).abs().max():.3e}"
        assert g.abs().sum() > 0, name  # every adapter, in every layer, got a gradient


def test_with_fused_loss_and_tiled_mlp_identical(offload_everything):
    """The three long-context options together, against fused loss + tiled MLP with checkpoints on the device."""
    model = tiny_llama_peft("dense", dtype=torch.float32, dropout=0.1)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (1, SEQ))
    options = dict(fused_cross_entropy=True, tiled_mlp=6)
    ref_loss, ref_grads, _ = _step(model, ids, offloaded=False, **options)
    loss, grads, report = _step(model, ids, offloaded=True, **options)
    assert "fused linear cross-entropy" in str(report) and report.tiled_mlp
    assert torch.equal(loss, ref_loss)
    for name, g in grads.items():
        assert torch.equal(g, ref_grads[name]), name


def test_small_inputs_stay_on_device_with_the_checkpoint_that_was_there():
    """At the real bound the tiny model's 29 x 64 inputs are kept, counted, and gradients are still right."""
    model = tiny_llama_peft("dense", dtype=torch.float32)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (1, SEQ))
    ref_loss, ref_grads, _ = _step(model, ids, offloaded=False)
    loss, grads, report = _step(model, ids, offloaded=True)
    assert report.offload_calls == {"kept on the device (input under 1 MiB)": TINY_LLAMA["num_hidden_layers"]}
    assert "kept on the device" in str(report)
    assert torch.equal(loss, ref_loss)


def test_checkpointing_enabled_after_patch_is_offloaded_and_unpatch_restores(offload_everything):
    """Trainer enables checkpointing after patch (gradient_checkpointing=True): the offload must still apply; unpatch
    puts transformers' checkpoint function back."""
    model = tiny_llama_peft("dense", dtype=torch.float32)
    report = fastlora.patch(model, backend=BEST_CPU_BACKEND, offload_checkpoints=True)
    assert "off now" in report.offload
    lm = model.get_base_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    layers = lm.model.layers
    assert all(isinstance(layer._gradient_checkpointing_func, offload.OffloadingCheckpoint) for layer in layers)
    model.train()
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (1, SEQ))
    model(input_ids=ids, labels=ids).loss.backward()
    assert report.offload_calls["offloaded"] == len(layers)
    # Host memory: one buffer per layer input; a second step reuses them.
    per_step = offload.host_bytes(model)
    assert per_step == len(layers) * SEQ * TINY_LLAMA["hidden_size"] * 4
    model(input_ids=ids, labels=ids).loss.backward()
    assert offload.host_bytes(model) == per_step
    fastlora.unpatch(model)
    assert "_set_gradient_checkpointing" not in lm.__dict__
    assert not any(isinstance(layer._gradient_checkpointing_func, offload.OffloadingCheckpoint) for layer in layers)


def test_backward_prefetches_the_previous_layer():
    """Fetching layer i's input starts layer i-1's copy back (double buffering); one already backwarded is not."""
    copies = offload.HostCopies()
    xs = [torch.randn(5, 3) for _ in range(3)]
    stashes = [copies.stash(x) for x in xs]
    for x in xs:
        x.zero_()  # the stash holds a copy, not the tensor
    assert stashes[1]._on_device is None
    assert torch.equal(stashes[2].fetch(), stashes[2].host) and not torch.equal(stashes[2].host, xs[2])
    assert stashes[1]._on_device is not None and stashes[0]._on_device is None
    stashes[0].backward_done = True
    assert torch.equal(stashes[1].fetch(), stashes[1].host)
    assert stashes[0]._on_device is None


def test_refusals_are_reported():
    report = fastlora.patch(lora_layer_model(8, 8), backend=BEST_CPU_BACKEND, offload_checkpoints=True)
    assert report.offload.startswith("not offloaded: Wrapper is not a transformers PreTrainedModel")


def test_keyword_tensor_needing_gradient_is_kept(offload_everything):
    """A tensor captured by the layer's partial that needs a gradient would lose it: that call is not offloaded."""
    counts = Counter()
    checkpoint = offload.OffloadingCheckpoint(lambda f, *a: f(*a), torch.nn.Linear(2, 2), offload.HostCopies(), counts)
    scale = torch.ones(1, requires_grad=True)
    out = checkpoint(functools.partial(lambda x, scale: x * scale, scale=scale), torch.randn(3, 2))
    out.sum().backward()
    assert scale.grad is not None and counts == {"kept on the device (a keyword tensor of the layer needs a gradient)": 1}


@pytest.mark.timeout(300)
def test_trainer_with_checkpointing_offload_and_fused_loss_matches(offload_everything, tmp_path):
    """HF Trainer, gradient_checkpointing=True (enabled by Trainer after patch), LoRA dropout, fused loss: the
    offloaded run logs the same losses as the run with checkpoints on the device (fp32 tolerance of
    tests/test_trainers.py; the operations are the same, so in practice they are equal)."""
    runs = {}
    for offloaded in (False, True):
        model = tiny_llama_peft("dense", dtype=torch.float32, dropout=0.1)
        report = fastlora.patch(model, backend=BEST_CPU_BACKEND, fused_cross_entropy=True, offload_checkpoints=offloaded)
        runs[offloaded] = train_with_trainer(model, tmp_path / str(offloaded), gradient_checkpointing=True,
                                             gradient_checkpointing_kwargs={"use_reentrant": False}, max_steps=3)  # fmt: skip
    assert report.offload_calls["offloaded"] == 3 * TINY_LLAMA["num_hidden_layers"]
    assert max_abs_diff(runs[True].losses, runs[False].losses) < FP32_LOSS_TOL
    assert max_abs_diff(runs[True].grad_norms, runs[False].grad_norms) < FP32_LOSS_TOL
    assert runs[True].losses[-1] < runs[True].losses[0]


def test_bench_long_context_contenders_patch_the_options_and_undo_them(offload_everything):
    """``fastlora bench --long-context on``: the contenders' names, and each patches its options for its steps only."""
    import dataclasses

    from fastlora.bench.settings import default_settings
    from fastlora.bench.training import LoRAModel, contender_patched, train_contenders

    settings = dataclasses.replace(default_settings("cpu"), train_backends=("torch",), train_long_context=True)
    contenders = train_contenders(settings)
    assert list(contenders.values()) == [None, "torch", "torch+loss", "torch+loss+offload", "torch+loss+tiled", "torch+loss+offload+tiled"]
    model = tiny_llama_peft("dense", dtype=torch.float32)
    lora = LoRAModel(model, {}, ())
    with contender_patched(lora, "torch+loss+offload+tiled", checkpointing=True) as report:
        assert report.fused_loss.startswith("fused") and "gradient checkpointing on now" in report.offload and report.tiled_mlp
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert "_set_gradient_checkpointing" not in model.get_base_model().__dict__
