"""Fused linear cross-entropy (fastlora.training.cross_entropy) against the unfused loss: F.cross_entropy of lm_head's logits
(as transformers' ForCausalLMLoss computes it) and real PEFT models.

Tolerances: fp32 runs compare to the unfused fp32 loss at 1e-5 relative (chunked sums reorder fp32 additions over
tokens; each logit is the same matmul row). bf16 runs round the logits to bf16 exactly like lm_head does, then
compute in fp32: 2e-2 relative on gradients (bf16's 2^-8 relative step on the logits' gradient, summed over the
vocabulary), 1e-3 on the loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import TINY_LLAMA
from fastlora.training.cross_entropy import install, linear_cross_entropy


def unfused(hidden, weight, labels, bias=None, num_items_in_batch=None, scale=1.0, softcap=None):
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits.float() / softcap) * softcap
    logits = logits.float() * scale
    shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100, reduction=reduction)
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def _inputs(dtype, batch=3, seq=37, hidden=48, vocab=301, bias=True):
    h = torch.randn(batch, seq, hidden, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden**0.5).to(dtype).requires_grad_()
    b = (torch.randn(vocab) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :7] = -100  # a prompt that is not trained on
    labels[2, -5:] = -100  # padding
    return h, w, b, labels


def _grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("kwargs", [{}, {"num_items_in_batch": 50}, {"scale": 0.0625}, {"softcap": 3.0}],
                         ids=["mean", "num_items_in_batch", "logit_scale", "softcap"])  # fmt: skip
@pytest.mark.parametrize("chunk", [1, 16, 1000])
def test_matches_unfused_fp32(kwargs, chunk):
    h, w, b, labels = _inputs(torch.float32)
    ref = unfused(h, w, labels, b, **kwargs)
    extra = {"logit_scale": kwargs["scale"]} if "scale" in kwargs else {k: v for k, v in kwargs.items()}
    got = linear_cross_entropy(h, w, labels, b, chunk=chunk, **extra)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    upstream = torch.rand(())  # a non-unit incoming gradient (e.g. a loss scale) must be applied
    for g, r in zip(_grads(got * upstream, (h, w, b)), _grads(ref * upstream, (h, w, b))):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_matches_unfused_bf16():
    h, w, b, labels = _inputs(torch.bfloat16, bias=False)
    ref = unfused(h, w, labels)
    got = linear_cross_entropy(h, w, labels, chunk=20)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    for g, r in zip(_grads(got, (h, w)), _grads(ref, (h, w))):
        assert g.dtype == r.dtype == torch.bfloat16
        assert (g.float() - r.float()).norm() <= 2e-2 * r.float().norm()


def test_all_ignored_is_nan_like_torch():
    h, w, b, labels = _inputs(torch.float32)
    labels[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, labels)) and torch.isnan(unfused(h, w, labels))


def _peft_llama(seed_model=None, target="all-linear"):
    config = LlamaConfig(**TINY_LLAMA)
    model = seed_model or AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target))


def test_install_on_peft_llama_matches_and_undoes():
    model = _peft_llama()
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 19))
    labels = ids.clone()
    labels[1, :4] = -100
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    n_params, n_buffers = len(list(model.parameters())), len(list(model.buffers()))

    ref = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(30))
    ref_grads = torch.autograd.grad(ref.loss, [p for p in model.parameters() if p.requires_grad])
    undo, description = install(model)
    assert undo is not None and "LlamaForCausalLM" in description
    assert len(list(model.parameters())) == n_params and len(list(model.buffers())) == n_buffers
    assert model.state_dict().keys() == state_before.keys()
    out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(30))
    assert out.logits is None  # documented: no logits when training with labels
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation keeps the model's own forward, logits included
        assert model(input_ids=ids, labels=labels).logits.shape == (2, 19, TINY_LLAMA["vocab_size"])
    assert install(model) == (None, "already installed")
    undo()
    assert "forward" not in model.get_base_model().__dict__
    assert model(input_ids=ids, labels=labels).logits is not None


def test_refuses_lora_on_lm_head_and_unknown_heads():
    model = _peft_llama(target=["q_proj", "lm_head"])
    undo, reason = install(model)
    assert undo is None and reason == "lm_head has a LoRA adapter"
    assert "forward" not in model.get_base_model().__dict__
    undo, reason = install(torch.nn.Linear(3, 3))
    assert undo is None and reason.startswith("unknown head")


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss", "olmoe"])
def test_install_on_moe_heads_matches_and_refuses_the_router_loss(kind):
    """MoE causal LMs (LoRA on attention and the 3-D experts): the fused loss and LoRA gradients equal the model's
    own, fp32 (tolerances as for Llama); with the router's auxiliary loss on, the fused loss is refused."""
    from moe_models import VOCAB, peft_moe_model

    model = peft_moe_model(kind, target_modules=["q_proj", "v_proj"]).train()
    ids = torch.randint(0, VOCAB, (2, 13))
    trainable = [p for p in model.parameters() if p.requires_grad]
    ref = model(input_ids=ids, labels=ids)
    ref_grads = torch.autograd.grad(ref.loss, trainable)
    undo, description = install(model)
    assert undo is not None, description
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(out.loss, trainable), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    undo()
    model.get_base_model().config.output_router_logits = True
    undo, reason = install(model)
    assert undo is None and "output_router_logits" in reason


def test_gemma2_softcapping_honoured():
    from transformers import Gemma2Config

    config = Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=128, final_logit_softcapping=5.0)  # fmt: skip
    model = get_peft_model(AutoModelForCausalLM.from_config(config, attn_implementation="eager"),
                           LoraConfig(r=4, target_modules="all-linear"))  # fmt: skip
    ids = torch.randint(0, 128, (2, 11))
    ref = model(input_ids=ids, labels=ids).loss
    undo, _ = install(model)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, ref, rtol=1e-5, atol=1e-6)
    undo()


def test_training_parity_tiny_llama():
    """Five AdamW steps from the same weights: per-step losses of the fused loss equal the unfused ones (fp32)."""
    config = LlamaConfig(**TINY_LLAMA)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    batches = [torch.randint(0, TINY_LLAMA["vocab_size"], (2, 23))] * 5  # one batch: the loss must fall
    losses = {}
    for fused in (False, True):
        base.load_state_dict(state)
        torch.manual_seed(0)
        model = _peft_llama(base)
        undo = install(model)[0] if fused else None
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses[fused] = []
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[fused].append(loss.item())
        if undo:
            undo()
        base = model.unload()
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-6)
    assert losses[False][-1] < losses[False][0]  # it trained


def test_patch_option_installs_and_unpatch_restores():
    """fastlora.patch(..., fused_cross_entropy=True) puts it in (and says so in the report); unpatch takes it out."""
    import inspect

    import fastlora

    if "fused_cross_entropy" not in inspect.signature(fastlora.patch).parameters:
        pytest.skip("fastlora.patch has no fused_cross_entropy option in this tree")
    model = _peft_llama()
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 13))
    ref = model(input_ids=ids, labels=ids).loss
    report = fastlora.patch(model, backend="torch", fused_cross_entropy=True)
    assert "fused linear cross-entropy" in str(report)
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    fastlora.unpatch(model)
    assert "forward" not in model.get_base_model().__dict__


def test_full_fine_tuning_with_tied_head_matches():
    """A plain transformers model (no PEFT): lm_head is trainable and tied to the embeddings; every gradient matches."""
    config = LlamaConfig(**{**TINY_LLAMA, "tie_word_embeddings": True})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 15))
    ref = model(input_ids=ids, labels=ids, return_dict=False)[0]
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    undo, _ = install(model)
    loss = model(input_ids=ids, labels=ids, return_dict=False)[0]  # return_dict=False: a tuple, loss first
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(loss, list(model.parameters())), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    undo()


@pytest.mark.timeout(300)
def test_hf_trainer_with_gradient_accumulation_matches_unfused(tmp_path):
    """Through HF Trainer (its column filter and num_items_in_batch both read the forward's signature) with gradient
    accumulation: the fused loss logs the unfused losses (fp32 tolerance of tests/test_trainers.py). A bare
    (*args, **kwargs) signature made Trainer drop input_ids; a lost num_items_in_batch would scale losses by 2."""
    import fastlora
    from tests.conftest import tiny_llama_peft
    from tests.test_trainers import FP32_LOSS_TOL, max_abs_diff, token_dataset, train_with_trainer

    runs = {}
    for fused in (False, True):
        model = tiny_llama_peft("dense", dtype=torch.float32)
        report = fastlora.patch(model, backend="torch", fused_cross_entropy=fused)
        assert fused == ("fused linear cross-entropy" in str(report))
        labels_masked = token_dataset(rows=4).map(lambda row: {"labels": [-100] * 5 + row["labels"][5:]})
        runs[fused] = train_with_trainer(model, tmp_path / str(fused), dataset=labels_masked, max_steps=2,
                                         per_device_train_batch_size=1, gradient_accumulation_steps=2)  # fmt: skip
    assert max_abs_diff(runs[True].losses, runs[False].losses) < FP32_LOSS_TOL
