"""Training and memory benchmarks: a Llama-style causal LM (random weights) with LoRA r=16 on every linear
layer, trained by PEFT and by fastlora from the same initial adapter weights on the same synthetic tokens.

Every contender trains the *same* model object from the same initial adapter values, on the same tokens, with
its own optimizer, so the per-step losses must agree. Their steps are interleaved (step i of every contender
before step i+1 of any): each contender's adapter values are loaded into the model before its step and kept
after it, and fastlora is patched in for its steps only. A slow spell of a shared machine then hits every
contender alike instead of whichever ran during it. Tokens are random motifs repeated along the sequence, which
a model can learn to continue, so the losses fall within a few steps.

Usage::

    records = run_train_suite(settings, torch.device("cpu"), progress)
    records = run_memory_suite(settings, torch.device("cuda"), progress)
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from fastlora.bench.layers import fastlora_name
from fastlora.bench.models import build_causal_lm, preset
from fastlora.bench.results import MemoryRecord, TrainRecord
from fastlora.bench.settings import BenchSettings, dtype_name
from fastlora.bench.timing import UNLIMITED, PeakMemory, RunBudget, synchronize

PEFT = "peft"
#: Largest accepted max |loss_fastlora - loss_peft| over the steps, per compute dtype. fp32 runs agree to
#: rounding; bf16 runs round activations differently in fused and unfused code and drift a little.
LOSS_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}
MOTIF_LENGTH = 16
MOTIF_POOL = 4


def synthetic_batches(vocab_size: int, batch: int, seq_len: int, count: int, seed: int, device: torch.device) -> list[Tensor]:
    """``count`` batches of token ids [batch, seq_len]: each row one of ``MOTIF_POOL`` random 16-token motifs,
    repeated. Few motifs, so a model memorises them and the loss falls within a few steps."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    motifs = torch.randint(0, vocab_size, (MOTIF_POOL, MOTIF_LENGTH), generator=generator)
    repeats = -(-seq_len // MOTIF_LENGTH)
    batches = []
    for _ in range(count):
        rows = motifs[torch.randint(0, MOTIF_POOL, (batch,), generator=generator)]
        batches.append(rows.repeat(1, repeats)[:, :seq_len].to(device))
    return batches


@dataclass
class LoRAModel:
    """A PEFT model and the initial values of its adapter weights, to reset between contenders."""

    model: nn.Module
    initial: dict[str, Tensor]
    key: tuple

    def reset(self) -> None:
        self.load(self.initial)

    def load(self, values: dict[str, Tensor]) -> None:
        """Copy ``values`` (parameter name -> tensor) into the model's adapters; clear every gradient."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in values:
                    param.copy_(values[name])
                param.grad = None

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


class ModelCache:
    """Holds the last built LoRA model, so suites that train the same (model, method) share one build (an 8B
    model takes a while to initialise); a different request frees it first. Whoever made it clears it."""

    def __init__(self):
        self._current: LoRAModel | None = None

    def get(self, model: str, method: str, settings: BenchSettings, device: torch.device) -> LoRAModel:
        key = (model, method, settings.dtype, settings.train_rank, settings.seed)
        if self._current is not None and self._current.key == key:
            return self._current
        self.clear()
        self._current = build_lora_model(model, method, settings, device, key)
        return self._current

    def clear(self) -> None:
        self._current = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


#: Suffix of a training method whose adapters are DoRA ("lora+dora", "qlora+dora").
DORA = "+dora"


def build_lora_model(model: str, method: str, settings: BenchSettings, device: torch.device, key: tuple = ()) -> LoRAModel:
    """The causal LM with LoRA (r = ``settings.train_rank``, alpha = 2r, no dropout) on all linear layers; DoRA
    (``use_dora=True``) for a method ending in "+dora"."""
    from peft import LoraConfig, get_peft_model

    base_method = method.removesuffix(DORA)
    lm = build_causal_lm(model, method=base_method, dtype=settings.dtype, device=device, seed=settings.seed)
    rank = settings.train_rank
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, use_dora=method.endswith(DORA),
                        target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(lm, config)
    peft_model.train()
    initial = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return LoRAModel(peft_model, initial, key)


@contextlib.contextmanager
def contender_applied(lora: LoRAModel, backend: str | None, checkpointing: bool) -> Iterator[object | None]:
    """Reset the adapters, then :func:`contender_patched`; reset them again after."""
    lora.reset()
    try:
        with contender_patched(lora, backend, checkpointing) as report:
            yield report
    finally:
        lora.reset()


@contextlib.contextmanager
def contender_patched(lora: LoRAModel, backend: str | None, checkpointing: bool) -> Iterator[object | None]:
    """Set gradient checkpointing and patch fastlora in with ``backend`` (None: PEFT as is); undo both after.
    Yields fastlora's PatchReport (None for PEFT)."""
    import fastlora

    base = lora.model.get_base_model()
    if checkpointing:
        _set_checkpointing(base, True)
    report = None
    if backend is not None:
        name, *options = backend.split("+")
        report = fastlora.patch(lora.model, backend=name, fused_cross_entropy="loss" in options,
                                offload_checkpoints="offload" in options, tiled_mlp="tiled" in options)  # fmt: skip
    try:
        yield report
    finally:
        if report is not None:
            fastlora.unpatch(lora.model)
        if checkpointing:
            _set_checkpointing(base, False)


def _set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Gradient checkpointing of every decoder layer, non-reentrant (frozen embeddings need no input grads).
    transformers renamed it "activation checkpointing" in 5.2x; older versions only have the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: Tensor) -> float:
    """One causal-LM step (labels = inputs, shifted inside the model); returns the loss."""
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


#: Suffix of a contender (and of its backend argument) that also runs the fused linear cross-entropy.
FUSED_LOSS = "+loss"
#: Suffixes of the long-context contenders (on top of the fused loss): offloaded checkpoints, tiled MLP, both.
LONG_CONTEXT = ("+offload", "+tiled", "+offload+tiled")


def train_contenders(settings: BenchSettings) -> dict[str, str | None]:
    """Contender name -> fastlora backend (None: PEFT itself; "<backend>+loss": with the fused cross-entropy;
    "<backend>+loss+offload", "+loss+tiled", "+loss+offload+tiled": with the long-context options of ``patch``)."""
    contenders = {PEFT: None} | {fastlora_name(backend): backend for backend in settings.train_backends}
    if settings.train_fused_loss or settings.train_long_context:
        contenders |= {fastlora_name(b) + FUSED_LOSS: b + FUSED_LOSS for b in settings.train_backends}
    if settings.train_long_context:
        contenders |= {fastlora_name(b) + FUSED_LOSS + o: b + FUSED_LOSS + o for b in settings.train_backends for o in LONG_CONTEXT}
    return contenders


def _fallback_detail(report) -> str | None:
    """Why a fastlora run is not all fastlora: layers left on PEFT at patch time or calls that fell back."""
    if report is None:
        return None
    problems = []
    if report.fallback_calls:
        problems.append(f"calls run by PEFT: {dict(report.fallback_calls)}")
    if report.skipped:
        problems.append(f"{len(report.skipped)} layers left on PEFT: {sorted(set(report.skipped.values()))}")
    return "; ".join(problems) or None


def run_train_suite(
    settings: BenchSettings, device: torch.device, progress=None, cache: ModelCache | None = None,
    budget: RunBudget = UNLIMITED, checkpoint=None,
) -> list[TrainRecord]:
    """Every (model, method, checkpointing, contender) training run of ``settings``, the contenders of one
    (model, method, checkpointing) interleaved; no group starts once ``budget`` is spent. Calls
    ``checkpoint(records)`` after each group."""
    cache = cache or ModelCache()
    records: list[TrainRecord] = []
    for model in settings.train_models:
        for method in settings.methods:
            if budget.spent():
                return records
            lora = cache.get(model, method, settings, device)
            batches = synthetic_batches(
                preset(model).vocab_size, settings.batch, settings.seq_len, settings.warmup + settings.steps, settings.seed, device
            )
            for checkpointing in settings.checkpointing:
                if budget.spent():
                    return records
                if progress is not None:
                    progress.set_postfix_str(f"{model} {method} ckpt={'on' if checkpointing else 'off'}")
                runs = [
                    _ContenderRun(lora, contender, backend, model, method, checkpointing, settings, device)
                    for contender, backend in train_contenders(settings).items()
                ]
                for index, input_ids in enumerate(batches):
                    for run in runs:
                        run.step(input_ids, timed=index >= settings.warmup)
                group = [run.finish() for run in runs]
                _common_memory_baseline(group)
                _compare_losses(group, settings.dtype)
                records += group
                if progress is not None:
                    progress.update(len(group))
                if checkpoint is not None:
                    checkpoint(records)
    return records


class _ContenderRun:
    """One contender's training run, one step at a time: between its steps it keeps its own adapter values and
    optimizer while other contenders use the model. Records its losses, median timed step and peak memory over
    its first step (which also allocates the optimizer state; LoRA's is small, so later steps peak alike)."""

    def __init__(self, lora: LoRAModel, contender: str, backend: str | None, model: str, method: str,
                 checkpointing: bool, settings: BenchSettings, device: torch.device):  # fmt: skip
        self.lora, self.backend, self.checkpointing, self.settings, self.device = lora, backend, checkpointing, settings, device
        self.record = TrainRecord(
            model=model, method=method, checkpointing=checkpointing, contender=contender, status="ok",
            seq_len=settings.seq_len, batch=settings.batch, steps=settings.steps, warmup=settings.warmup,
            dtype=dtype_name(settings.dtype), memory_kind=_memory_kind(device),
        )  # fmt: skip
        self.values = {name: value.clone() for name, value in lora.initial.items()}
        self.optimizer: torch.optim.Optimizer | None = None
        self.step_times: list[float] = []
        self.fallback: str | None = None

    def step(self, input_ids: Tensor, timed: bool) -> None:
        """One optimizer step on ``input_ids`` (timed or warm-up); a failure ends this contender's run only."""
        if self.record.status != "ok":
            return
        try:
            with self._own_adapters(), contender_patched(self.lora, self.backend, self.checkpointing) as report:
                if self.optimizer is None:
                    self.optimizer = torch.optim.AdamW(self.lora.trainable(), lr=self.settings.lr)
                # Memory is measured over the first step only: measuring starts by handing freed memory back to the
                # system (malloc_trim, empty_cache), which would make every later step fault it in again.
                first = self.record.start_memory_bytes is None
                with PeakMemory(self.device) if first else contextlib.nullcontext() as memory:
                    synchronize(self.device)
                    started = time.perf_counter()
                    self.record.losses.append(train_step(self.lora.model, self.optimizer, input_ids))  # .item() syncs
                    elapsed = time.perf_counter() - started
                self.fallback = self.fallback or _fallback_detail(report)
        except torch.OutOfMemoryError as err:
            self._fail("oom", str(err).splitlines()[0])
            return
        except Exception as err:  # noqa: BLE001 - one failing contender must not lose the others' results
            self._fail("error", f"{type(err).__name__}: {err}".splitlines()[0])
            return
        if timed:
            self.step_times.append(elapsed)
        if first:
            self.record.start_memory_bytes, self.record.peak_memory_bytes = memory.start_bytes, memory.peak_bytes

    @contextlib.contextmanager
    def _own_adapters(self) -> Iterator[None]:
        """This contender's adapter values in the model for the block, and the updated values kept after it."""
        self.lora.load(self.values)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self.lora.model.named_parameters():
                    if name in self.values:
                        self.values[name].copy_(param)
                        param.grad = None

    def _fail(self, status: str, detail: str) -> None:
        self.record.status, self.record.detail = status, detail
        self.optimizer = None  # its state can be large on a GPU that just ran out of memory

    def finish(self) -> TrainRecord:
        record = self.record
        self.optimizer = None
        if record.status != "ok":
            return record
        # The median step, not the mean: a burst of load from elsewhere on a shared machine hits one step, not all.
        record.median_step_s = statistics.median(self.step_times)
        record.tokens_per_s = self.settings.batch * self.settings.seq_len / record.median_step_s
        if self.fallback:
            record.status, record.detail = "fallback", self.fallback
        return record


def _common_memory_baseline(group: list[TrainRecord]) -> None:
    """Put every contender's peak on the same baseline: the memory in use when the first contender's first step
    began. A later contender's first step starts with the earlier ones' optimizer states already allocated, which
    its own absolute peak should not include; what its step added (peak - start) is kept as measured."""
    starts = [r.start_memory_bytes for r in group if r.start_memory_bytes is not None and r.peak_memory_bytes is not None]
    if not starts:
        return
    baseline = starts[0]
    for r in group:
        if r.start_memory_bytes is not None and r.peak_memory_bytes is not None:
            r.peak_memory_bytes = baseline + (r.peak_memory_bytes - r.start_memory_bytes)
            r.start_memory_bytes = baseline


def _compare_losses(group: list[TrainRecord], dtype: torch.dtype) -> None:
    """Fill each fastlora record's max |loss - PEFT loss|; a difference over the tolerance is a mismatch."""
    peft = next((r for r in group if r.contender == PEFT and r.losses), None)
    if peft is None:
        return
    tolerance = LOSS_TOLERANCE[dtype]
    for record in group:
        if record.contender == PEFT or len(record.losses) != len(peft.losses):
            continue
        diff = max(abs(a - b) for a, b in zip(record.losses, peft.losses))
        record.loss_max_abs_diff_vs_peft, record.loss_tolerance = diff, tolerance
        if record.status == "ok" and not diff <= tolerance:
            record.status, record.detail = "mismatch", f"losses differ from PEFT's by up to {diff:.3g} > {tolerance:g}"


def _memory_kind(device: torch.device) -> str:
    return "cuda max allocated" if device.type == "cuda" else "process RSS"


def run_memory_suite(
    settings: BenchSettings, device: torch.device, progress=None, cache: ModelCache | None = None,
    budget: RunBudget = UNLIMITED,
) -> list[MemoryRecord]:
    """Peak memory of one training step per sequence length and contender; no sweep starts once ``budget`` is
    spent."""
    cache = cache or ModelCache()
    records: list[MemoryRecord] = []
    for model in settings.memory_models:
        if budget.spent():
            break
        lora = cache.get(model, settings.memory_method, settings, device)
        for contender, backend in train_contenders(settings).items():
            if budget.spent():
                break
            records += _memory_sweep(lora, model, contender, backend, settings, device, progress)
    return records


def _memory_sweep(lora: LoRAModel, model: str, contender: str, backend: str | None, settings: BenchSettings, device, progress) -> list[MemoryRecord]:
    """One contender over the sequence lengths, shortest first, with one optimizer: a first unmeasured step
    compiles kernels and allocates the optimizer state, so every measured step is a steady-state step. After
    running out of memory, the longer sequences are recorded as "oom" without running."""
    vocab = preset(model).vocab_size
    records = [
        MemoryRecord(
            model=model, method=settings.memory_method, checkpointing=settings.memory_checkpointing,
            contender=contender, status="ok", seq_len=seq_len, batch=1, dtype=dtype_name(settings.dtype),
            memory_kind=_memory_kind(device),
        )
        for seq_len in settings.memory_seq_lens
    ]
    pending = list(records)
    try:
        with contender_applied(lora, backend, settings.memory_checkpointing) as report:
            optimizer = torch.optim.AdamW(lora.trainable(), lr=settings.lr)
            warm = synthetic_batches(vocab, 1, settings.memory_seq_lens[0], 1, settings.seed, device)[0]
            train_step(lora.model, optimizer, warm)
            while pending:
                record = pending[0]
                if progress is not None:
                    progress.set_postfix_str(f"{model} {settings.memory_method} {contender} seq={record.seq_len}")
                (input_ids,) = synthetic_batches(vocab, 1, record.seq_len, 1, settings.seed, device)
                with PeakMemory(device) as memory:
                    synchronize(device)
                    started = time.perf_counter()
                    train_step(lora.model, optimizer, input_ids)
                    record.step_s = time.perf_counter() - started
                record.peak_memory_bytes, record.start_memory_bytes = memory.peak_bytes, memory.start_bytes
                pending.pop(0)
                if progress is not None:
                    progress.update(1)
            fallback = _fallback_detail(report)
        if fallback:
            for record in records:
                record.status, record.detail = "fallback", fallback
    except torch.OutOfMemoryError as err:
        _mark_unfinished(pending, "oom", str(err).splitlines()[0], progress)
    except Exception as err:  # noqa: BLE001 - recorded; the other contenders still run
        _mark_unfinished(pending, "error", f"{type(err).__name__}: {err}".splitlines()[0], progress)
    return records


def _mark_unfinished(pending: list[MemoryRecord], status: str, detail: str, progress) -> None:
    """The step that failed gets ``detail``; the longer sequences after it were not run."""
    for index, record in enumerate(pending):
        record.status = status
        record.detail = detail if index == 0 else f"not run: {status} at seq_len {pending[0].seq_len} already"
        if progress is not None:
            progress.update(1)


def count_runs(settings: BenchSettings) -> tuple[int, int]:
    """How many training runs and memory steps the suites do (for the progress bars)."""
    contenders = len(train_contenders(settings))
    train = len(settings.train_models) * len(settings.methods) * len(settings.checkpointing) * contenders
    memory = len(settings.memory_models) * contenders * len(settings.memory_seq_lens)
    return train, memory
