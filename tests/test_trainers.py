"""fastlora behind real trainers (HF ``Trainer``, TRL ``SFTTrainer``; not mocked) on a tiny Llama built from a
config: a patched model logs the same per-step losses and gradient norms as the unpatched PEFT model, also with
gradient accumulation, gradient checkpointing, and after save_pretrained -> reload -> continue training.

Tolerances, by compute dtype (losses are ~4.85 = ln 128 at the start):

- fp32: the fused path only changes summation order (fp32 accumulation either way), ~1e-7 relative per op;
  a few AdamW steps amplify that to ~1e-6 on the loss, so 1e-4 absolute leaves margin and still catches any real
  difference (a wrong scale, a dropped adapter or a lost gradient moves the loss by > 1e-2 within two steps).
- bf16: every layer output is rounded once to bf16 (2^-9 relative) in a different place than PEFT rounds it; through
  2 decoder layers that is ~1e-3 on the loss, and 2e-2 leaves room for the steps of AdamW amplifying it (the same
  bound as tests/test_model_parity.py).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

import fastlora
from fastlora import backends
from tests.conftest import tiny_llama_base, tiny_llama_peft

REPO = Path(__file__).resolve().parent.parent
CPU_BACKENDS = [name for name in backends.NAMES if backends.unavailable_reason(name, "cpu") is None]
BEST_CPU_BACKEND = backends.resolve("auto", "cpu")
LORA_LAYERS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
STEPS = 6
SEQ = 24
VOCAB = 128

FP32_LOSS_TOL = 1e-4
BF16_LOSS_TOL = 2e-2
KINDS = {"qlora-bf16": ("qlora", torch.bfloat16, BF16_LOSS_TOL), "dense-fp32": ("dense", torch.float32, FP32_LOSS_TOL)}


def token_dataset(rows: int = 8, seq: int = SEQ) -> Dataset:
    """Random token ids (fixed seed, independent of the per-test torch seed) with labels = input_ids. Every row
    has the same length, so a token-mean over one big batch equals the mean over its micro-batches."""
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (rows, seq), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class LogRecorder(TrainerCallback):
    """Per optimizer step: the loss and (when clipping is on) the gradient norm that Trainer logs."""

    def __init__(self):
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            if "grad_norm" in logs:
                self.grad_norms.append(float(logs["grad_norm"]))


def training_args(output_dir, **overrides) -> TrainingArguments:
    """CPU, fp32 unless overridden, constant LR, one log per step, and no side effects (no saving, no reporting)."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=STEPS,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def train_with_trainer(model, output_dir, dataset=None, **overrides) -> LogRecorder:
    recorder = LogRecorder()
    trainer = Trainer(
        model=model,
        args=training_args(output_dir, **overrides),
        train_dataset=dataset if dataset is not None else token_dataset(),
        callbacks=[recorder],
    )
    trainer.train()
    assert len(recorder.losses) == trainer.args.max_steps
    return recorder


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_abs_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def assert_weights_close(weights, reference, rel_tol):
    for name, w in weights.items():
        delta = ((w - reference[name]).norm() / reference[name].norm()).item()
        assert delta < rel_tol, f"{name}: relative difference {delta:.2e}"


def patched_model(kind, dtype, backend, **kwargs):
    model = tiny_llama_peft(kind, dtype=dtype, **kwargs)
    report = fastlora.patch(model, backend=backend)
    assert len(report.patched) == LORA_LAYERS and not report.skipped
    return model, report


@functools.cache
def unpatched_trainer_run(kind, dtype):
    """The PEFT reference for the Trainer parity test, computed once and shared by every backend."""
    model = tiny_llama_peft(kind, dtype=dtype)
    with tempfile.TemporaryDirectory() as output_dir:
        recorder = train_with_trainer(model, output_dir)
    return recorder.losses, recorder.grad_norms, adapter_weights(model)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind_name", list(KINDS))
def test_trainer_losses_match_unpatched(kind_name, backend, tmp_path):
    kind, dtype, tol = KINDS[kind_name]
    ref_losses, ref_norms, ref_weights = unpatched_trainer_run(kind, dtype)
    model, report = patched_model(kind, dtype, backend)
    run = train_with_trainer(model, tmp_path)
    loss_diff, norm_diff = max_abs_diff(run.losses, ref_losses), max_abs_diff(run.grad_norms, ref_norms)
    print(f"{kind_name} {backend}: PEFT losses {ref_losses}\nfastlora {run.losses}\n"
          f"max |loss diff| {loss_diff:.2e}, max |grad-norm diff| {norm_diff:.2e}")
    assert report.fused_calls == LORA_LAYERS * STEPS and not report.fallback_calls
    assert loss_diff < tol
    # Gradient norms are O(1) here: the same relative tolerance as the losses (~5).
    assert norm_diff < tol * max(ref_norms) / 5
    assert run.losses[-1] < run.losses[0]  # it actually trains
    assert_weights_close(adapter_weights(model), ref_weights, rel_tol=2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.timeout(300)
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """2 micro-batches of 2 with accumulation == 1 batch of 4 (equal-length rows, token-mean loss). SGD without
    clipping, because AdamW and clipping both normalise away a wrong gradient scale (the bug class to catch).
    The dataset is those 4 rows, so every step sees the same data and the loss must fall step after step.
    Dense fp32 only: the scaling is the trainer's and the loss's, and fp32's tight tolerance leaves a wrong scale
    nowhere to hide (the fused layer's part, linearity in the output gradient, is the same for NF4)."""
    kind, dtype, tol = KINDS["dense-fp32"]
    sgd = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0, max_steps=4, dataset=token_dataset(rows=4))
    accumulated, report = patched_model(kind, dtype, BEST_CPU_BACKEND)
    acc_run = train_with_trainer(accumulated, tmp_path / "acc", per_device_train_batch_size=2, gradient_accumulation_steps=2, **sgd)
    big_batch, _ = patched_model(kind, dtype, BEST_CPU_BACKEND)
    big_run = train_with_trainer(big_batch, tmp_path / "big", per_device_train_batch_size=4, **sgd)
    unpatched = tiny_llama_peft(kind, dtype=dtype)
    ref_run = train_with_trainer(unpatched, tmp_path / "ref", per_device_train_batch_size=2, gradient_accumulation_steps=2, **sgd)
    print(f"dense fp32: accumulated {acc_run.losses}\nbig batch {big_run.losses}\nunpatched accumulated {ref_run.losses}")
    assert report.fused_calls == LORA_LAYERS * 4 * 2 and not report.fallback_calls
    assert max_abs_diff(acc_run.losses, big_run.losses) < tol
    assert max_abs_diff(acc_run.losses, ref_run.losses) < tol
    assert acc_run.losses[-1] < acc_run.losses[0] - 0.05  # lr 0.5 SGD moves the loss far beyond the tolerance
    weights = adapter_weights(accumulated)
    assert_weights_close(weights, adapter_weights(big_batch), rel_tol=1e-4)
    assert_weights_close(weights, adapter_weights(unpatched), rel_tol=1e-4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_gradient_checkpointing_recomputes_the_same_dropout(use_reentrant, tmp_path):
    """With LoRA dropout, checkpointing recomputes each decoder layer in backward; fastlora's dropout masks come
    from seeds drawn from torch's RNG, which checkpoint restores, so the recomputed forward must use the same
    masks: checkpointed and plain training of the same patched model agree to fp32 rounding."""
    dense_fp32 = dict(kind="dense", dtype=torch.float32, backend=BEST_CPU_BACKEND, dropout=0.1)
    checkpointed, report = patched_model(**dense_fp32)
    ckpt_run = train_with_trainer(
        checkpointed, tmp_path / "ckpt", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )
    plain, _ = patched_model(**dense_fp32)
    plain_run = train_with_trainer(plain, tmp_path / "plain")
    diff = max_abs_diff(ckpt_run.losses, plain_run.losses)
    print(f"use_reentrant={use_reentrant}: checkpointed {ckpt_run.losses}\nplain {plain_run.losses}\nmax diff {diff:.2e}")
    # Every LoRA layer sits in a checkpointed decoder layer: each step runs its forward twice, both fused.
    assert report.fused_calls == 2 * LORA_LAYERS * STEPS and not report.fallback_calls
    assert diff < FP32_LOSS_TOL
    assert max_abs_diff(ckpt_run.grad_norms, plain_run.grad_norms) < FP32_LOSS_TOL
    assert_weights_close(adapter_weights(checkpointed), adapter_weights(plain), rel_tol=1e-4)


def train_save_reload_continue(patch: bool, tmp_path: Path):
    """3 Trainer steps, save_pretrained, reload the adapter onto a fresh base, 3 more steps. Returns the losses of
    both phases and the saved adapter state dict."""
    from peft import PeftModel
    from safetensors.torch import load_file

    half = STEPS // 2
    model = tiny_llama_peft("qlora", dtype=torch.bfloat16)
    if patch:
        fastlora.patch(model, backend=BEST_CPU_BACKEND)
    first = train_with_trainer(model, tmp_path / "first", max_steps=half)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")

    reloaded = PeftModel.from_pretrained(tiny_llama_base("qlora", dtype=torch.bfloat16), tmp_path / "adapter", is_trainable=True)
    if patch:
        report = fastlora.patch(reloaded, backend=BEST_CPU_BACKEND)
        assert len(report.patched) == LORA_LAYERS
    # A different seed than phase one, so phase two sees the rows in a new order.
    second = train_with_trainer(reloaded, tmp_path / "second", max_steps=half, seed=1)
    return first.losses + second.losses, saved


@pytest.mark.timeout(300)
def test_save_reload_continue_matches_unpatched(tmp_path):
    losses, saved = train_save_reload_continue(True, tmp_path / "patched")
    ref_losses, ref_saved = train_save_reload_continue(False, tmp_path / "reference")
    diff = max_abs_diff(losses, ref_losses)
    print(f"QLoRA bf16 save/reload: PEFT {ref_losses}\nfastlora {losses}\nmax |diff| {diff:.2e}")
    assert diff < BF16_LOSS_TOL
    # The adapter file holds exactly PEFT's keys (fastlora registers nothing on the layers) with close values.
    assert saved.keys() == ref_saved.keys()
    assert_weights_close({k: v.float() for k, v in saved.items()}, {k: v.float() for k, v in ref_saved.items()}, 2e-2)


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("t0".."t127"), built locally: SFTTrainer needs a
    processing class and nothing may be downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t1", eos_token="t2")


def train_with_sft_trainer(model, output_dir, **overrides) -> list[float]:
    from trl import SFTConfig, SFTTrainer

    settings = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=STEPS, learning_rate=2e-3,
        lr_scheduler_type="constant", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    recorder = LogRecorder()
    # Pre-tokenized rows ("input_ids" only): SFTTrainer skips tokenization and its collator builds the labels.
    dataset = token_dataset().remove_columns("labels")
    trainer = SFTTrainer(
        model=model, args=SFTConfig(**settings), train_dataset=dataset, processing_class=tiny_tokenizer(), callbacks=[recorder]
    )
    trainer.train()
    assert len(recorder.losses) == STEPS
    return recorder.losses


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "kind_name, sft_overrides, forwards_per_step",
    [
        # SFTConfig's own defaults: bf16 autocast and gradient checkpointing (each forward runs twice).
        ("qlora-bf16", {}, 2),
        ("dense-fp32", {"bf16": False, "gradient_checkpointing": False}, 1),
    ],
    ids=["qlora-sft-defaults", "dense-fp32"],
)
def test_sft_trainer_losses_match_unpatched(kind_name, sft_overrides, forwards_per_step, tmp_path):
    kind, dtype, tol = KINDS[kind_name]
    model, report = patched_model(kind, dtype, BEST_CPU_BACKEND)
    losses = train_with_sft_trainer(model, tmp_path / "patched", **sft_overrides)
    ref_losses = train_with_sft_trainer(tiny_llama_peft(kind, dtype=dtype), tmp_path / "ref", **sft_overrides)
    diff = max_abs_diff(losses, ref_losses)
    print(f"SFTTrainer {kind_name}: PEFT {ref_losses}\nfastlora {losses}\nmax |diff| {diff:.2e}")
    assert report.fused_calls == forwards_per_step * LORA_LAYERS * STEPS and not report.fallback_calls
    assert diff < tol
    assert losses[-1] < losses[0]


@pytest.mark.timeout(180)
def test_finetune_trainer_example_runs(tmp_path):
    """examples/finetune_trainer.py end to end, as a user would run it."""
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "finetune_trainer.py"), "--output-dir", str(tmp_path), "--steps", "8"],
        capture_output=True, text=True, timeout=150, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "LoRA layers fused" in result.stdout
    summary = [line for line in result.stdout.splitlines() if line.startswith("loss ")]
    assert summary, result.stdout
    first, last = (float(v) for v in summary[-1].split()[1].split("->"))
    assert last < first  # the example actually fine-tunes
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
