"""Tiled MLP (fastlora.training.tiled_mlp, ``patch(tiled_mlp=...)``) on real transformers/PEFT models.

Tolerances. Without dropout, tiling changes no per-token arithmetic (each row's GEMMs are the same), only how
the parameters' gradients are summed over tokens (per shard, then across shards in fp32): fp32 runs agree with
the untiled model at 1e-5 relative (a few fp32 roundings of sums of ~60 terms), bf16 ones at 2e-2 (the
LoRA gradients of a bf16 model come from bf16 products rounded in different groupings). With dropout the
masks are per shard (the mask is a hash of the row index within the call), so the reference is the same shards
under plain autograd, no recompute: equal to fp32 rounding (1e-6) only if the recompute replays the very same
masks; a mask drawn afresh moves gradients by O(1).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import fastlora
from fastlora.training import tiled_mlp
from tests.conftest import TINY_LLAMA, randomize_lora, tiny_llama_peft
from tests.test_trainers import BEST_CPU_BACKEND, FP32_LOSS_TOL, max_abs_diff, train_with_trainer

SHARD = 7
SEQ = 31  # 2 x 31 = 62 tokens: 8 shards of 7, the last one of 6


class ShardedReference:
    """An MLP forward on the same shards with plain autograd (every shard's intermediates kept): the reference for
    tiling with dropout."""

    def __init__(self, mlp):
        self.mlp = mlp

    def __call__(self, x):
        flat = x.reshape(-1, x.shape[-1])
        parts = [type(self.mlp).forward(self.mlp, flat[s]) for s in tiled_mlp._shards(flat.shape[0], SHARD)]
        return torch.cat(parts).view(*x.shape[:-1], -1)


def _step(model, ids, *, tiled: bool, sharded_reference: bool = False, checkpointing: bool = False):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    report = fastlora.patch(model, backend=BEST_CPU_BACKEND, tiled_mlp=SHARD if tiled else False)
    mlps = [layer.mlp for layer in model.get_base_model().model.layers]
    if sharded_reference:
        for mlp in mlps:
            mlp.forward = ShardedReference(mlp)
    torch.manual_seed(99)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    if sharded_reference:
        for mlp in mlps:
            del mlp.forward
    fastlora.unpatch(model)
    if checkpointing:
        model.gradient_checkpointing_disable()
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, report


def _assert_grads_close(grads, ref, rtol):
    for name, g in grads.items():
        scale = ref[name].abs().max()
        assert scale > 0, name
        err = ((g - ref[name]).abs().max() / scale).item()
        assert err < rtol, f"{name}: relative error {err:.2e}"


def _two_adapters_on_a_subset(kind, dtype, dropout):
    """Adapter one on up_proj and down_proj only (gate_proj is a plain base layer), adapter two on gate_proj."""
    from tests.conftest import tiny_llama_base

    model = get_peft_model(tiny_llama_base(kind, dtype=dtype),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["up_proj", "down_proj"]))  # fmt: skip
    model.add_adapter("extra", LoraConfig(r=4, lora_alpha=4, lora_dropout=dropout, target_modules=["gate_proj", "down_proj"]))
    model.base_model.set_adapter(["default", "extra"])
    randomize_lora(model, std=0.05)
    return model


BUILDS = {
    "dense-fp32": (lambda dropout: tiny_llama_peft("dense", dtype=torch.float32, dropout=dropout), 1e-5),
    "qlora-fp32": (lambda dropout: tiny_llama_peft("qlora", dtype=torch.float32, dropout=dropout), 1e-5),
    "qlora-bf16": (lambda dropout: tiny_llama_peft("qlora", dtype=torch.bfloat16, dropout=dropout), 2e-2),
    "two-adapters-subset": (lambda dropout: _two_adapters_on_a_subset("qlora", torch.float32, dropout), 1e-5),
}


@pytest.mark.parametrize("build", list(BUILDS))
def test_matches_untiled_without_dropout(build):
    make, rtol = BUILDS[build]
    model = make(0.0)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, SEQ))
    ref_loss, ref_grads, _ = _step(model, ids, tiled=False)
    loss, grads, report = _step(model, ids, tiled=True)
    assert report.tiled_mlp == f"2 MLPs tiled in shards of {SHARD} tokens" and not report.untiled_mlps
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    _assert_grads_close(grads, ref_grads, rtol)


@pytest.mark.parametrize("build", ["dense-fp32", "qlora-fp32", "two-adapters-subset"])
def test_dropout_masks_replayed_in_the_recompute(build):
    make, _ = BUILDS[build]
    model = make(0.1)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, SEQ))
    ref_loss, ref_grads, _ = _step(model, ids, tiled=False, sharded_reference=True)
    loss, grads, _ = _step(model, ids, tiled=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    _assert_grads_close(grads, ref_grads, 1e-6)


def test_inside_gradient_checkpointing_with_dropout():
    """Checkpointing recomputes the decoder layer, whose tiled MLP recomputes again: both replays must draw the
    forward's masks, so the gradients equal the tiled model's without checkpointing."""
    model = tiny_llama_peft("dense", dtype=torch.float32, dropout=0.1)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, SEQ))
    ref_loss, ref_grads, _ = _step(model, ids, tiled=True)
    loss, grads, _ = _step(model, ids, tiled=True, checkpointing=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    _assert_grads_close(grads, ref_grads, 1e-6)


def test_gemma_geglu_matches_untiled():
    from transformers import GemmaConfig

    torch.manual_seed(0)
    config = GemmaConfig(**{**TINY_LLAMA, "head_dim": 16}, hidden_activation="gelu_pytorch_tanh")
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_lora(model, std=0.05)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (1, SEQ))
    ref_loss, ref_grads, _ = _step(model, ids, tiled=False)
    loss, grads, report = _step(model, ids, tiled=True)
    assert not report.untiled_mlps
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(grads, ref_grads, 1e-5)


def test_fused_gate_up_mlp_is_reported_untiled():
    from transformers import Phi3Config

    config = Phi3Config(**{k: v for k, v in TINY_LLAMA.items()}, pad_token_id=0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules="all-linear"))
    report = fastlora.patch(model, backend=BEST_CPU_BACKEND, tiled_mlp=True)
    assert report.tiled_mlp == "0 MLPs tiled in shards of hidden_size tokens (fewer if GPU memory is short), 2 left untiled"
    assert set(report.untiled_mlps.values()) == {
        "Phi3MLP is not a gated MLP (no gate_proj, up_proj: a mixture of experts or a fused gate_up_proj)"
    }
    assert "untiled MLPs" in str(report)


def test_no_grad_and_single_shard_calls_and_unpatch():
    """Evaluation (no_grad) runs the shards too and gives the untiled outputs; a call of at most one shard runs
    the MLP's own forward; unpatch restores every MLP."""
    model = tiny_llama_peft("dense", dtype=torch.float32)
    model.eval()
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, SEQ))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    fastlora.patch(model, backend=BEST_CPU_BACKEND, tiled_mlp=SHARD)
    mlp = model.get_base_model().model.layers[0].mlp
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-6)
    x = torch.randn(1, SHARD, TINY_LLAMA["hidden_size"], requires_grad=True)
    def tiled(y):  # the view of the tiled Function's output, or the untiled MLP's own graph
        return type(y.grad_fn.next_functions[0][0]).__name__ == "TiledMLPFunctionBackward"

    assert not tiled(mlp(x)) and tiled(mlp(torch.cat([x, x], 1)))
    fastlora.unpatch(model)
    assert "forward" not in mlp.__dict__
    with pytest.raises(ValueError, match="tokens per shard"):
        fastlora.patch(model, backend=BEST_CPU_BACKEND, tiled_mlp=0)
    assert "forward" not in mlp.__dict__ and not fastlora.is_patched(model.get_base_model().model.layers[0].mlp.up_proj)


def test_automatic_shard_on_cpu_is_hidden_size():
    model = tiny_llama_peft("dense", dtype=torch.float32)
    mlp = model.get_base_model().model.layers[0].mlp
    assert tiled_mlp.shard_size(mlp, torch.zeros(500, TINY_LLAMA["hidden_size"])) == TINY_LLAMA["hidden_size"]


@pytest.mark.timeout(300)
def test_trainer_with_checkpointing_and_fused_loss_matches_untiled(tmp_path):
    runs = {}
    for tiled in (False, True):
        model = tiny_llama_peft("dense", dtype=torch.float32)
        fastlora.patch(model, backend=BEST_CPU_BACKEND, fused_cross_entropy=True, tiled_mlp=SHARD if tiled else False)
        runs[tiled] = train_with_trainer(model, tmp_path / str(tiled), gradient_checkpointing=True, max_steps=3)
    assert max_abs_diff(runs[True].losses, runs[False].losses) < FP32_LOSS_TOL
    assert max_abs_diff(runs[True].grad_norms, runs[False].grad_norms) < FP32_LOSS_TOL


def test_a_refused_option_leaves_nothing_installed(monkeypatch):
    """patch with offload + a bad shard size raises, and neither the offload nor any LoRA layer stays installed."""
    model = tiny_llama_peft("dense", dtype=torch.float32)
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="tokens per shard"):
        fastlora.patch(model, backend=BEST_CPU_BACKEND, offload_checkpoints=True, tiled_mlp=-3)
    layers = model.get_base_model().model.layers
    assert "_set_gradient_checkpointing" not in model.get_base_model().__dict__
    assert not any(type(layer._gradient_checkpointing_func).__name__ == "OffloadingCheckpoint" for layer in layers)
    assert not any(fastlora.is_patched(m) for m in model.modules())
