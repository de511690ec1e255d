"""One rank of the distributed tests (tests/test_distributed.py), launched by ``torchrun`` or ``accelerate launch``.

Each rank trains a patched tiny Llama on its half of every global batch and saves, for the test to compare
with one process on the whole batch: the global loss per step, the adapter gradients of the first step and the
final adapter weights (all gathered to full tensors).

Modes:

- ``ddp``: DistributedDataParallel (gloo); ``--patch-after-wrap`` patches the DDP-wrapped model.
- ``fsdp2``: ``fully_shard`` on every decoder layer and the root; ``--patch-after-wrap`` patches the sharded model.
- ``accelerate``: ``Accelerator(cpu=True).prepare`` (DDP under ``accelerate launch --multi_gpu``, which on a
  CPU-only machine starts CPU processes through torch.distributed.run), patched after ``prepare``.
- ``rank-fails``: rank 1 asks for a backend that cannot run here and raises while rank 0 waits in a collective;
  the launcher must take the whole job down.

Usage::

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py --mode ddp --kind dense-fp32 --out DIR
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

# Run as a script: make the repository root importable for tests.conftest.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastlora  # noqa: E402
from fastlora.functions import nf4_weight as nf4# noqa: E402
from tests.conftest import TINY_LLAMA, randomize_lora, tiny_llama_peft  # noqa: E402

STEPS = 3
GLOBAL_BATCH = 4
SEQ = 16
LEARNING_RATE = 0.5  # SGD without momentum: a wrong gradient scale (e.g. summed instead of averaged) shows up
# Collectives give up after this long, so a rank waiting for a dead peer errors out rather than hangs.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4321)
    return [torch.randint(0, TINY_LLAMA["vocab_size"], (GLOBAL_BATCH, SEQ), generator=generator) for _ in range(STEPS)]


def build_model(kind: str):
    """dense-fp32: the conftest dense Llama in fp32. qlora-bf16: NF4 with ``bnb_4bit_quant_storage=bfloat16`` and
    bf16 adapters, so that every parameter has one dtype, which FSDP2 needs to shard the packed weights with
    the rest (the usual QLoRA + FSDP recipe)."""
    if kind == "dense-fp32":
        return tiny_llama_peft("dense", dtype=torch.float32)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA)).save_pretrained(tmp)
        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
        )
        base = AutoModelForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=torch.bfloat16)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    model = get_peft_model(base, config, autocast_adapter_dtype=False)  # keep the adapters in bf16
    randomize_lora(model, std=0.05)
    return model


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU fp32 copy; DTensors (FSDP2 shards) are gathered first."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().float().clone()


def adapter_state(model, use_grad: bool) -> dict[str, torch.Tensor]:
    """Adapter weights (or gradients) keyed by their name in the unwrapped PEFT model."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("module.")
            out[key] = full(p.grad if use_grad else p)
    return out


def train(model, batches_for_this_rank, step_fn, world_size: int):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    losses, first_grads = [], None
    for ids in batches_for_this_rank:
        loss = model(input_ids=ids, labels=ids).loss
        step_fn(loss)
        if first_grads is None:
            first_grads = adapter_state(model, use_grad=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # Every rank's rows have the same length: the global token-mean loss is the mean of the ranks' losses.
        global_loss = loss.detach().float().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world_size)
    return losses, first_grads


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("ddp", "fsdp2", "accelerate", "rank-fails"), required=True)
    parser.add_argument("--kind", choices=("dense-fp32", "qlora-bf16"), default="dense-fp32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--patch-after-wrap", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    # Build before joining the group: transformers' save_pretrained (used to quantize) writes the config only on
    # the main process of an initialised group, and every rank builds the same weights from the same seed.
    model = build_model(args.kind)

    if args.mode == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
        model = accelerator.prepare(model)
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError(f"accelerate prepared a {type(model).__name__}, expected a DDP wrapper")
        report = fastlora.patch(model, backend=args.backend)  # finds the LoRA layers inside the DDP wrapper
        step_fn = accelerator.backward
    else:
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
        step_fn = torch.Tensor.backward
        if args.mode == "rank-fails" and dist.get_rank() == 1:
            fastlora.patch(model, backend="triton")  # raises: triton cannot run CPU tensors here
        report = None if args.patch_after_wrap else fastlora.patch(model, backend=args.backend)
        if args.mode in ("ddp", "rank-fails"):
            model = torch.nn.parallel.DistributedDataParallel(model)  # broadcasts rank 0's state: a collective
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        if args.patch_after_wrap:
            report = fastlora.patch(model, backend=args.backend)

    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = GLOBAL_BATCH // world_size
    local_batches = [ids[rank * rows : (rank + 1) * rows] for ids in global_batches()]
    losses, first_grads = train(model, local_batches, step_fn, world_size)
    result = {
        "losses": losses,
        "first_grads": first_grads,
        "final_weights": adapter_state(model, use_grad=False),
        "patched": len(report.patched),
        "skipped": dict(report.skipped),
        "fused_calls": report.fused_calls,
        "fallback_calls": dict(report.fallback_calls),
        # host reads of the nested NF4 absmax offset over the whole run (fastlora.functions.nf4_weight._OFFSETS): once per quant
        # state, not per call
        "offset_reads": nf4._OFFSETS.misses,
        "weight_misses": nf4._CACHE.misses,  # the per-Params4bit cache, which FSDP2's re-wrap defeats
        "nf4_layers": sum(type(m).__name__ == "Linear4bit" for m in model.modules()),
    }
    torch.save(result, args.out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter finalization: gloo worker threads still holding tensors (FSDP2's async collectives) can abort
    # the process there ("terminate called without an active exception") after everything above succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
