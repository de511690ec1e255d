"""Benchmark settings: one dataclass, with defaults per device that keep a full run short.

CPU defaults finish in a few minutes on 2 cores: a 17M-parameter Llama ("tiny") for every suite, fp32 compute
for training (bf16 matmuls are several times slower than fp32 on CPUs without AMX/AVX512-BF16, so QLoRA on CPU
computes in fp32), and the layer suite in fp32 and again in bf16 (``layer_dtypes``: fastlora must beat PEFT in
each; on CPUs with AVX512-BF16 PEFT's bf16 GEMMs are fast). ``--dtype`` sets one compute dtype for every suite. GPU defaults are the full suite of the issue: Llama-3-8B,
Llama-3.2-1B and Qwen2.5-7B layer shapes for M = 1 ... 8192, r = 16 and 64; Llama-3.2-1B and Llama-3-8B
training; a sequence-length sweep on Llama-3-8B QLoRA; bf16 compute. How long that takes on one H100 is not
measured yet; ``time_budget_s`` (``--time-budget``) stops starting new work after a given time.

Usage::

    settings = default_settings("cpu")
    settings = dataclasses.replace(settings, tokens=(1, 16), steps=2)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from fastlora import backends
from fastlora.bench.timing import TimingPolicy

SUITES = ("layers", "train", "memory")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BenchSettings:
    """Everything a run does; saved verbatim into results.json and the report."""

    device: str
    suites: tuple[str, ...]
    dtype: torch.dtype
    seed: int = 0
    # Compute dtypes of the layer suite, each a full set of cases; empty: ``dtype`` alone.
    layer_dtypes: tuple[torch.dtype, ...] = ()
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    # Contenders: fastlora backends (each one a contender), and the Triton paths to measure ("auto" = its
    # run-time choice of fastlora.tuning; "fused"/"split" force one).
    backends: tuple[str, ...] = ()
    triton_paths: tuple[str, ...] = ("auto",)
    include_split: bool = True
    include_dense: bool = True
    # Layer suite.
    layer_models: tuple[str, ...] = ("tiny",)
    tokens: tuple[int, ...] = (1, 16, 128, 512)
    bases: tuple[str, ...] = ("dense", "nf4")
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    projections: tuple[str, ...] = ()  # only shapes of these layers (e.g. "q_proj"); empty = every shape
    ranks: tuple[int, ...] = (16,)
    timing: TimingPolicy = field(default_factory=TimingPolicy)
    # Training suite: LoRA r = train_rank on all linear layers, AdamW, synthetic tokens.
    train_models: tuple[str, ...] = ("tiny",)
    methods: tuple[str, ...] = ("lora", "qlora")
    checkpointing: tuple[bool, ...] = (False, True)
    train_rank: int = 16
    seq_len: int = 256
    batch: int = 2
    warmup: int = 1
    steps: int = 4
    lr: float = 1e-3
    train_backends: tuple[str, ...] = ()
    # Also each train backend with the fused linear cross-entropy (contender "fastlora[<backend>]+loss"); the
    # command line turns it on by default (--fused-loss).
    train_fused_loss: bool = False
    # Also the long-context contenders (fused loss plus offloaded checkpoints, tiled MLP, both): --long-context on.
    train_long_context: bool = False
    # Memory suite: peak memory of one training step over a sequence-length sweep (OOM is recorded, not fatal).
    memory_models: tuple[str, ...] = ("tiny",)
    memory_method: str = "qlora"
    memory_seq_lens: tuple[int, ...] = (128, 256, 512, 1024)
    memory_checkpointing: bool = True
    # Memory suite, alongside: one training step accounted on meta tensors at real sizes (fastlora.memory; no device
    # memory used, the same figures on any machine). Empty accounting_models: not run.
    accounting_models: tuple[str, ...] = ("llama-3-8b",)
    accounting_method: str = "qlora"
    accounting_checkpointing: str = "non-reentrant"
    accounting_seq_lens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    accounting_batches: tuple[int, ...] = (1, 8)
    # Memory suite: the longest-context table (QLoRA r=32, batch 1, 24/48/80/141 GiB, PEFT and every fastlora
    # option, unsloth's published figures beside it) for these presets: --longest-context. Minutes per model.
    accounting_longest_context: tuple[str, ...] = ()
    # Seconds after which no new case or run starts (None: no limit). What is left is listed in the report as not
    # run, so a run under a hard time limit (the GPU machine's 10-minute calls) still ends with a report.
    time_budget_s: float | None = None

    def to_dict(self) -> dict:
        """JSON-ready: dtypes as names."""
        payload = asdict(self)
        payload["dtype"] = dtype_name(self.dtype)
        payload["layer_dtypes"] = [dtype_name(d) for d in self.layer_dtypes]
        return payload

    def layer_suite_dtypes(self) -> tuple[torch.dtype, ...]:
        """The compute dtypes the layer suite runs, in order."""
        return self.layer_dtypes or (self.dtype,)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def available_backends(device_type: str) -> tuple[str, ...]:
    """fastlora backends that can run on ``device_type`` here. The torch reference is left out wherever a kernel
    backend runs: it is the test oracle (fp32 upcasts, a whole dequantized W per call), not a contender, and on a
    2-core CPU its large allocations also slow the contenders timed next to it. ``--backends`` adds it back."""
    names = [name for name in backends.NAMES if backends.unavailable_reason(name, device_type) is None]
    if device_type == "cpu" and "triton" in names:
        names.remove("triton")  # on CPU only the test interpreter runs Triton: nothing to time
    if len(names) > 1:
        names.remove("torch")
    return tuple(names)


def default_settings(device: str) -> BenchSettings:
    """The defaults for ``device`` ("cpu" or "cuda"): see the module docstring."""
    device_type = torch.device(device).type
    available = available_backends(device_type)
    if device_type == "cpu":
        return BenchSettings(
            device=device,
            suites=SUITES,
            dtype=torch.float32,
            layer_dtypes=(torch.float32, torch.bfloat16),
            backends=available,
            train_backends=available,
        )
    return BenchSettings(
        device=device,
        suites=SUITES,
        dtype=torch.bfloat16,
        backends=available,
        layer_models=("llama-3-8b", "llama-3.2-1b", "qwen2.5-7b"),
        tokens=(1, 16, 128, 512, 2048, 4096, 8192),
        ranks=(16, 64),
        timing=TimingPolicy(warmup_ms=5.0, rep_ms=20.0),
        train_models=("llama-3.2-1b", "llama-3-8b"),
        seq_len=2048,
        batch=2,
        warmup=2,
        steps=5,
        lr=1e-4,
        train_backends=available,
        memory_models=("llama-3-8b",),
        memory_seq_lens=(1024, 2048, 4096, 8192, 16384, 32768),
        accounting_models=(),  # the same figures on any machine: accounted on CPU, no GPU time spent on them
    )
