"""Fine-tune a tiny QLoRA Llama with Hugging Face ``Trainer`` and fastlora, end to end on a CPU in seconds.

The model is built from a config with random weights and the data are random token ids, so nothing is
downloaded; swap in ``AutoModelForCausalLM.from_pretrained("your/model", quantization_config=...)`` and a real
dataset for actual training. The only fastlora line is ``fastlora.patch(model)`` after ``get_peft_model``.

Usage::

    python examples/finetune_trainer.py --output-dir /tmp/fastlora-example [--kind dense] [--steps 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, Trainer, TrainingArguments

import fastlora

TINY_LLAMA = LlamaConfig(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=128, max_position_embeddings=128,
)


def build_model(kind: str):
    """A tiny Llama with random weights: NF4-quantized through bitsandbytes ("qlora", bf16 compute) or bf16 ("dense")."""
    torch.manual_seed(0)
    if kind == "dense":
        return AutoModelForCausalLM.from_config(TINY_LLAMA).to(torch.bfloat16)
    # Quantization happens in from_pretrained, so save the random model first and load it back in 4 bit.
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(TINY_LLAMA).save_pretrained(tmp)
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        return AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=torch.bfloat16)


def synthetic_dataset(rows: int = 16, seq: int = 32) -> Dataset:
    """Random token ids; a few rows repeated for several epochs give the model something to fit."""
    ids = torch.randint(0, TINY_LLAMA.vocab_size, (rows, seq), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--kind", choices=("qlora", "dense"), default="qlora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="auto", help="fastlora backend: auto, torch, cpp or triton")
    args = parser.parse_args()

    model = get_peft_model(build_model(args.kind), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    report = fastlora.patch(model, backend=args.backend)  # the one fastlora line
    print(report)

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(args.output_dir), max_steps=args.steps, per_device_train_batch_size=4, learning_rate=1e-2,
            logging_steps=1, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
            bf16=True, dataloader_num_workers=0, disable_tqdm=True,
        ),
        train_dataset=synthetic_dataset(),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"loss {losses[0]:.4f}->{losses[-1]:.4f} over {len(losses)} steps")
    print(report)  # now also counts fused calls and any call that ran PEFT's forward instead

    model.save_pretrained(args.output_dir / "adapter")  # a plain PEFT adapter: loads without fastlora
    print(f"adapter saved to {args.output_dir / 'adapter'}")


if __name__ == "__main__":
    main()
