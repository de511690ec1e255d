"""AdamW in backward (fastlora.training.optimizer_in_backward) against torch.optim.AdamW(foreach=False) on tiny PEFT models.

Tolerance: none (bitwise equal parameters and state), in fp32 and in bf16 adapters alike. Each in-backward update is
AdamW's own single-tensor step on the same gradient (a parameter's gradient is complete when its hook runs, and no
later gradient reads the parameter), so the same kernels run on the same values in the same order; no cross-parameter
reduction exists in AdamW to reorder. Every case changes the learning rate by a schedule, to check the update reads
the group's current value.
"""

from __future__ import annotations

import copy

import pytest
import torch

from fastlora.training.optimizer_in_backward import AdamWInBackward

HYPER = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def _model(dtype=torch.float32, checkpointing="off", seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, use_cache=False)  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype)
    if checkpointing != "off":
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing == "reentrant"})
        model.enable_input_require_grads()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, lora, autocast_adapter_dtype=False)  # bf16 adapters stay bf16


def _batches(count, seed=1, batch=2, seq=11):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (batch, seq), generator=g) for _ in range(count)]


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _schedule(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))


def _assert_same(model, reference, optimizer, reference_optimizer):
    for p, q in zip(_trainable(model), _trainable(reference)):
        assert torch.equal(p, q)
    ours, theirs = optimizer.state_dict(), reference_optimizer.state_dict()
    assert ours["param_groups"][0]["lr"] == theirs["param_groups"][0]["lr"]
    for i, state in theirs["state"].items():
        for name, value in state.items():
            assert torch.equal(ours["state"][i][name], value), name


def _pair(model, accumulation_steps=1, **options):
    """(model, a copy of it, our optimizer on the model, torch's AdamW(foreach=False) on the copy)."""
    reference = copy.deepcopy(model)
    reference_optimizer = torch.optim.AdamW(_trainable(reference), foreach=False, **HYPER)
    optimizer = AdamWInBackward(_trainable(model), accumulation_steps=accumulation_steps, **HYPER, **options)
    return model, reference, optimizer, reference_optimizer


def _train(model, optimizer, batches, accumulation):
    """The usual loop: each micro-batch's loss over ``accumulation``, one optimizer step per ``accumulation``."""
    scheduler = _schedule(optimizer)
    for i, ids in enumerate(batches):
        (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        if (i + 1) % accumulation == 0:
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", ["off", "non-reentrant", "reentrant"])
def test_equals_torch_adamw_without_holding_gradients(dtype, checkpointing):
    model, reference, optimizer, reference_optimizer = _pair(_model(dtype, checkpointing))
    params = _trainable(model)
    held = []  # how many parameters hold a gradient, seen from each gradient hook (after the optimizer's)
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in params)))
    batches = _batches(4)
    _train(reference, reference_optimizer, batches, 1)
    _train(model, optimizer, batches, 1)
    _assert_same(model, reference, optimizer, reference_optimizer)
    assert len(held) == 4 * len(params) and max(held) == 0  # each gradient freed by its own hook


def test_fastlora_patched_model_equals_torch_adamw():
    """On fastlora's fused LoRA layers (torch backend): their backward hands each adapter its gradient once."""
    import fastlora

    model, reference, optimizer, reference_optimizer = _pair(_model())
    fastlora.patch(model, backend="torch")
    fastlora.patch(reference, backend="torch")
    batches = _batches(3, seed=2)
    _train(reference, reference_optimizer, batches, 1)
    _train(model, optimizer, batches, 1)
    _assert_same(model, reference, optimizer, reference_optimizer)


def test_gradient_accumulation_updates_on_the_last_micro_batch():
    model, reference, optimizer, reference_optimizer = _pair(_model(), accumulation_steps=3)
    batches = _batches(6, seed=3)
    _train(reference, reference_optimizer, batches, 3)
    scheduler = _schedule(optimizer)
    for i, ids in enumerate(batches):
        before = [p.detach().clone() for p in _trainable(model)]
        (model(input_ids=ids, labels=ids).loss / 3).backward()
        last = (i + 1) % 3 == 0
        assert all((p.grad is None) == last for p in _trainable(model))  # accumulating in .grad until the third
        assert all(torch.equal(p, b) != last for p, b in zip(_trainable(model), before))
        if last:
            optimizer.step()
            scheduler.step()
    _assert_same(model, reference, optimizer, reference_optimizer)


def test_step_applies_a_short_last_accumulation():
    """An epoch ending after 2 of 3 micro-batches: step() applies the 2 accumulated, as AdamW.step would."""
    model, reference, optimizer, reference_optimizer = _pair(_model(), accumulation_steps=3)
    for m, opt in ((reference, reference_optimizer), (model, optimizer)):
        for ids in _batches(2, seed=4):
            (m(input_ids=ids, labels=ids).loss / 3).backward()
        opt.step()
        opt.zero_grad()
    _assert_same(model, reference, optimizer, reference_optimizer)
    assert all(p.grad is None for p in _trainable(model))


def test_step_refuses_more_updates_than_the_loop_steps():
    model = _model()
    optimizer = AdamWInBackward(_trainable(model), **HYPER)  # accumulation_steps=1, but the loop accumulates 2
    for ids in _batches(2, seed=5):
        model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="updated 2 times.*accumulation_steps=1"):
        optimizer.step()
    with pytest.raises(ValueError, match="no closure"):
        optimizer.step(lambda: 0.0)
    with pytest.raises(ValueError, match="at least 1"):
        AdamWInBackward(_trainable(model), accumulation_steps=0)


def test_state_dict_loads_into_torch_adamw_and_back():
    """Checkpoints are AdamW's: ours continues from torch's state and the reverse, with the same result."""
    model, reference, optimizer, reference_optimizer = _pair(_model(seed=6))
    first, second = _batches(2, seed=7), _batches(2, seed=8)
    _train(reference, reference_optimizer, first, 1)
    _train(model, optimizer, first, 1)
    swapped_ours = AdamWInBackward(_trainable(model), **HYPER)
    swapped_ours.load_state_dict(reference_optimizer.state_dict())
    optimizer.remove_hooks()  # the first one stops updating; the loaded one goes on
    swapped_torch = torch.optim.AdamW(_trainable(reference), foreach=False, **HYPER)
    swapped_torch.load_state_dict(optimizer.state_dict())
    for m, opt in ((reference, swapped_torch), (model, swapped_ours)):
        for ids in second:
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    _assert_same(model, reference, swapped_ours, swapped_torch)


def _trainer(model, optimizer, tmp_path, **overrides):
    from transformers import Trainer, TrainingArguments

    data = [{"input_ids": ids[0], "labels": ids[0]} for ids in _batches(6, seed=9, batch=1)]
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
                    learning_rate=HYPER["lr"], weight_decay=HYPER["weight_decay"], max_grad_norm=0.0, use_cpu=True,
                    report_to=[], save_strategy="no", logging_steps=1, seed=0, data_seed=0, disable_tqdm=True)  # fmt: skip
    settings.update(overrides)
    callbacks = [optimizer.trainer_callback()] if isinstance(optimizer, AdamWInBackward) else []
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=data, optimizers=(optimizer, None),
                   callbacks=callbacks)  # fmt: skip


def test_hf_trainer_with_accumulation_equals_torch_adamw(tmp_path):
    """transformers' Trainer (its linear schedule, 2 micro-batches per step): our optimizer passed as Trainer's, with
    its callback, trains to the same parameters as torch's AdamW(foreach=False) passed the same way."""
    model = _model(seed=10)
    reference = copy.deepcopy(model)
    hyper = {k: v for k, v in HYPER.items() if k in ("betas", "eps")}
    reference_optimizer = torch.optim.AdamW(_trainable(reference), foreach=False, lr=HYPER["lr"],
                                            weight_decay=HYPER["weight_decay"], **hyper)  # fmt: skip
    optimizer = AdamWInBackward(_trainable(model), lr=HYPER["lr"], weight_decay=HYPER["weight_decay"],
                                accumulation_steps=2, **hyper)  # fmt: skip
    _trainer(reference, reference_optimizer, tmp_path / "torch").train()
    _trainer(model, optimizer, tmp_path / "ours").train()
    for p, q in zip(_trainable(model), _trainable(reference)):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in _trainable(model))


@pytest.mark.parametrize("overrides,message", [
    (dict(max_grad_norm=1.0), "max_grad_norm=1.0: clipping"),
    (dict(gradient_accumulation_steps=4), "gradient_accumulation_steps=4 but the optimizer's accumulation_steps=2"),
])  # fmt: skip
def test_hf_trainer_callback_refuses_clipping_and_other_accumulation(tmp_path, overrides, message):
    model = _model(seed=11)
    optimizer = AdamWInBackward(_trainable(model), accumulation_steps=2)
    before = [p.detach().clone() for p in _trainable(model)]
    with pytest.raises(ValueError, match=message):
        _trainer(model, optimizer, tmp_path, **overrides).train()
    assert all(torch.equal(p, b) for p, b in zip(_trainable(model), before))  # refused before any update


# -- moments in host memory (state_device="cpu") ---------------------------------------------------------------------
# Here the parameters' device is the CPU too: every update still copies the moments to new "device" tensors and back
# (the same code as on a GPU, without its side stream), so a skipped or wrong copy changes the results.


def _moments(optimizer):
    return [(p, key, state[key]) for p, state in optimizer.state.items() for key in state if key != "step"]


def _watch_device_copies(optimizer):
    """Weak references to every device copy of a moment that the optimizer makes."""
    import weakref

    made, device_copy = [], optimizer._device_copy

    def watched(host, device, stream):
        copy_ = device_copy(host, device, stream)
        made.append(weakref.ref(copy_))
        return copy_

    optimizer._device_copy = watched
    return made


@pytest.mark.parametrize("dtype,accumulation,amsgrad", [(torch.float32, 1, False), (torch.bfloat16, 2, False),
                                                        (torch.float32, 2, True)])  # fmt: skip
def test_host_state_equals_torch_adamw_and_holds_no_device_moments(dtype, accumulation, amsgrad):
    model, reference, optimizer, reference_optimizer = _pair(_model(dtype), accumulation, state_device="cpu")
    for opt in (optimizer, reference_optimizer):
        opt.param_groups[0]["amsgrad"] = amsgrad
    made = _watch_device_copies(optimizer)
    batches = _batches(3 * accumulation, seed=12)
    _train(reference, reference_optimizer, batches[:accumulation], accumulation)
    _train(model, optimizer, batches[:accumulation], accumulation)
    buffers = {(id(p), key): t.data_ptr() for p, key, t in _moments(optimizer)}
    assert len(buffers) == len(_trainable(model)) * (3 if amsgrad else 2)
    _train(reference, reference_optimizer, batches[accumulation:], accumulation)
    _train(model, optimizer, batches[accumulation:], accumulation)
    _assert_same(model, reference, optimizer, reference_optimizer)
    # Between steps the state holds the same host buffers (refilled in place), in the parameter's dtype, and every
    # device copy of a moment (2 more steps' worth) has been freed.
    assert {(id(p), key): t.data_ptr() for p, key, t in _moments(optimizer)} == buffers
    assert all(t.device == torch.device("cpu") and t.dtype == p.dtype for p, key, t in _moments(optimizer))
    assert len(made) == 2 * len(buffers) and all(ref() is None for ref in made)


def test_host_state_copy_back_is_what_the_next_update_reads():
    """If an update's moments were not copied back, the next update would read stale host moments: results differ."""
    model, reference, optimizer, reference_optimizer = _pair(_model(seed=13), state_device="cpu")
    batches = _batches(2, seed=14)
    _train(reference, reference_optimizer, batches, 1)
    _train(model, optimizer, batches[:1], 1)
    stale = {(id(p), key): t.clone() for p, key, t in _moments(optimizer)}
    optimizer._moments_to_host = lambda param, hosts: optimizer.state[param].update(
        {key: hosts.get(key, stale[(id(param), key)]) for key in hosts})  # copy back skipped, buffers put back
    _train(model, optimizer, batches[1:], 1)
    assert not all(torch.equal(p, q) for p, q in zip(_trainable(model), _trainable(reference)))


def test_host_state_dict_round_trip_with_torch_adamw():
    model, reference, optimizer, reference_optimizer = _pair(_model(seed=15), state_device="cpu")
    first, second = _batches(2, seed=16), _batches(2, seed=17)
    _train(reference, reference_optimizer, first, 1)
    _train(model, optimizer, first, 1)
    swapped_ours = AdamWInBackward(_trainable(model), **HYPER, state_device="cpu")
    swapped_ours.load_state_dict(reference_optimizer.state_dict())
    assert all(t.device == torch.device("cpu") for _, _, t in _moments(swapped_ours))
    optimizer.remove_hooks()
    swapped_torch = torch.optim.AdamW(_trainable(reference), foreach=False, **HYPER)
    swapped_torch.load_state_dict(optimizer.state_dict())
    for m, opt in ((reference, swapped_torch), (model, swapped_ours)):
        _train(m, opt, second, 1)
    _assert_same(model, reference, swapped_ours, swapped_torch)


def test_host_state_refuses_other_devices():
    with pytest.raises(ValueError, match="only 'cpu'"):
        AdamWInBackward(_trainable(_model()), state_device="meta")


@pytest.mark.gpu
def test_host_state_on_cuda_equals_torch_adamw_with_pinned_moments():
    """CUDA: the copies on the side stream (pinned host buffers, events) give AdamW's results to the bit.
    Run: python -m pytest -q tests/test_optimizer_in_backward.py -m gpu"""
    model, reference, optimizer, reference_optimizer = _pair(_model().cuda(), state_device="cpu")
    batches = [ids.cuda() for ids in _batches(4, seed=18)]
    _train(reference, reference_optimizer, batches, 1)
    _train(model, optimizer, batches, 1)
    _assert_same(model, reference, optimizer, reference_optimizer)
    assert all(t.device.type == "cpu" and t.is_pinned() for _, _, t in _moments(optimizer))
