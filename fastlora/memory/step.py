"""Account one real training step (forward, backward, AdamW step) of a LoRA/QLoRA model built on meta tensors.

The model is built from its config on the ``meta`` device (nothing allocated), quantized to NF4 with double
quantization through bitsandbytes' own ops (their fake implementations give the packed shapes), wrapped by PEFT
(r on all linear layers), and run by transformers as in training. Contenders:

- ``peft``: PEFT's own LoRA layers (bitsandbytes dequantizes W into a fresh buffer per call);
- ``fastlora``: fastlora's fused forward on every LoRA layer, its ops run through their fake implementations
  (x saved once in the compute dtype and the thin S; q/k/v share one saved x), plus the split path's per-call
  dequantization buffer where the dispatch table sends a call to it;
- ``fastlora+loss``: the same with the fused linear cross-entropy (:mod:`fastlora.training.cross_entropy`);
- ``fastlora+all``: every option fastlora has on: the fused loss, checkpointed layer inputs offloaded to host
  memory (:mod:`fastlora.training.offload`, when checkpointing is on), the tiled MLP (:mod:`fastlora.training.tiled_mlp`, shards of
  hidden_size tokens) and chunked RMSNorms (:mod:`fastlora.training.rms_norm`). The real modules run on the meta tensors; their host buffers are counted apart (``host_peak``).

Usage::

    result = account(StepSpec("llama-3-8b", method="qlora", seq=8192, checkpointing="non-reentrant"), "fastlora")
    result.peak, result.breakdown
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

from fastlora.memory.execution import MetaTruth, attention_implementation, meta_autocast
from fastlora.memory.experts import MetaOps, count_nf4_experts, fused_experts_on_meta
from fastlora.memory.layers import FEW_LAYERS, decoder_layers, extrapolated, extrapolated_note, marking_layers, uniform_reason, with_layers
from fastlora.memory.loops import sampled_loops
from fastlora.memory.presets import TARGETS, moe_config
from fastlora.memory.tracker import CATEGORIES, LiveBytes

CONTENDERS = ("peft", "fastlora", "fastlora+loss", "fastlora+all")
CHECKPOINTING = ("off", "reentrant", "non-reentrant", "offload")
METHODS = ("lora", "qlora")


@dataclass(frozen=True)
class StepSpec:
    """One training step to account: model (a preset name or a config.json path) and how it is trained.

    ``checkpointing``: "off", "reentrant", "non-reentrant" (torch.utils.checkpoint via transformers), or "offload"
    (non-reentrant with the checkpoints in pinned host memory: transformers'
    ``activation_checkpointing_enable(offload=True)``).
    """

    model: str
    method: str = "qlora"
    rank: int = 16
    seq: int = 2048
    batch: int = 1
    checkpointing: str = "non-reentrant"
    dtype: str = "bfloat16"
    dropout: float = 0.0
    layers: Optional[int] = None  # decoder layers to build (None: the model's); see fastlora.memory.layers
    targets: str = "all-linear"  # LoRA targets: "all-linear", or for MoE models "attention" / "attention+experts"
    experts: str = "dense"  # MoE expert weights: "dense" (the model's dtype) or "nf4" (fastlora.patch(quantize_experts="nf4"))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: choose one of {METHODS}")
        if self.checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing {self.checkpointing!r}: choose one of {CHECKPOINTING}")
        if self.targets not in TARGETS:
            raise ValueError(f"targets {self.targets!r}: choose one of {tuple(TARGETS)}")
        if self.experts not in ("dense", "nf4"):
            raise ValueError(f"experts {self.experts!r}: choose 'dense' or 'nf4'")

    def with_seq(self, seq: int) -> "StepSpec":
        return dataclasses.replace(self, seq=seq)


@dataclass
class Accounting:
    """Peak device bytes of one step and what made them up (bytes per category of :mod:`tracker`)."""

    spec: StepSpec
    contender: str
    peak: int
    breakdown: dict[str, int]
    phase: str
    notes: list[str]
    host_peak: int = 0  # host memory the offloaded checkpoints hold at most (pinned on a GPU)
    segment_peaks: dict = dataclasses.field(default_factory=dict, repr=False)  # (phase, layer position) -> (bytes, breakdown)

    def phase_peaks(self) -> dict[str, int]:
        """The peak of each phase of the step (forward, backward, optimizer step)."""
        peaks: dict[str, int] = {}
        for (phase, _), (nbytes, _) in self.segment_peaks.items():
            peaks[phase] = max(peaks.get(phase, 0), nbytes)
        return peaks

    def as_dict(self) -> dict:
        return {"spec": dataclasses.asdict(self.spec), "contender": self.contender, "peak": self.peak,
                "breakdown": self.breakdown, "phase": self.phase, "host_peak": self.host_peak, "notes": self.notes,
                "phase_peaks": self.phase_peaks()}  # fmt: skip


def model_config(model: str):
    """The transformers config of a preset name (see ``fastlora.bench.models``) or of a config.json path/folder."""
    from transformers import AutoConfig, LlamaConfig

    moe = moe_config(model)
    if moe is not None:
        return moe
    path = Path(model)
    if path.suffix == ".json" or path.is_dir():
        config_dir = path.parent if path.suffix == ".json" else path
        if path.suffix == ".json" and path.name != "config.json":
            fields = json.loads(path.read_text())
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
        return AutoConfig.from_pretrained(config_dir, local_files_only=True)
    from fastlora.bench.models import preset

    p = preset(model)
    return LlamaConfig(
        hidden_size=p.hidden_size, intermediate_size=p.intermediate_size, num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads, num_key_value_heads=p.num_key_value_heads,
        vocab_size=p.vocab_size, attention_bias=p.attention_bias, tie_word_embeddings=p.tie_word_embeddings,
        rope_theta=p.rope_theta, max_position_embeddings=131072, use_cache=False,
    )  # fmt: skip


def build_peft_model(spec: StepSpec, device: torch.device | str = "meta", attention: str = "sdpa") -> nn.Module:
    """The PEFT model of ``spec`` on ``device`` ("meta" for the accounting; "cpu" for the tests' real check), with
    ``attention`` a transformers attention implementation (see :func:`execution.attention_implementation`)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fastlora.bench.models import quantize_linears

    dtype = getattr(torch, spec.dtype)
    config = model_config(spec.model)
    config.use_cache = False
    if spec.layers is not None:
        with_layers(config, spec.layers)
    with torch.device(device):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention)
    if spec.method == "qlora":
        import bitsandbytes.functional as bnb_functional

        # bitsandbytes caches its quantization maps on the device of the first call: keep meta ones out of it.
        cached_maps = dict(bnb_functional.name2qmap)
        quantize_linears(lm, compute_dtype=dtype)
        for module in lm.modules():
            weight = getattr(module, "weight", None)
            if type(weight).__name__ == "Params4bit" and not weight.bnb_quantized:
                weight._quantize(device)  # Params4bit.to() skips quantizing on meta; bitsandbytes' fake ops do it
                if weight.quant_state.nested and weight.quant_state.offset.device.type == "meta":
                    # A 4-byte scalar that readers take with float(); meta cannot answer that.
                    weight.quant_state.offset = torch.zeros((), dtype=torch.float32)
        if torch.device(device).type == "meta":
            bnb_functional.name2qmap.clear()
            bnb_functional.name2qmap.update(cached_maps)
    if spec.checkpointing != "off":
        lm.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": spec.checkpointing == "reentrant"},
            offload=spec.checkpointing == "offload",
        )
    modules, parameters = TARGETS[spec.targets]
    lora = LoraConfig(r=spec.rank, lora_alpha=2 * spec.rank, lora_dropout=spec.dropout, target_modules=modules,
                      target_parameters=parameters, task_type="CAUSAL_LM")  # fmt: skip
    return get_peft_model(lm, lora)


class _MetaFusedForward:
    """fastlora's fused branch of ``FusedForward`` for a LoRA layer on meta, where ``patch`` does not go
    (nothing can run there, and autocast cannot be asked about meta): the same ``call_plan`` inputs for NF4 bases,
    the plain dense plan (no autocast) for dense ones, and the same ``lora_linear``."""

    def __init__(self, layer: nn.Module, backend: str):
        self.layer = layer
        self.backend = backend

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        from fastlora.functions.lora import Adapter, BaseWeight, lora_linear
        from fastlora.wiring.plan import call_plan

        layer, base = self.layer, self.layer.base_layer
        if type(base) is nn.Linear:
            adapters = [
                Adapter(layer.lora_A[a].weight, layer.lora_B[a].weight, float(layer.scaling[a]),
                        getattr(layer.lora_dropout[a], "p", 0.0) if layer.training else 0.0)
                for a in layer.active_adapters
            ]  # fmt: skip
            return lora_linear(x, BaseWeight(base.weight, base.bias, base.out_features), adapters, self.backend)
        plan = call_plan(layer, "meta", x, args, kwargs)
        if isinstance(plan, str):
            raise RuntimeError(f"fastlora would run PEFT's forward here: {plan}")
        x_compute, weight, adapters, out_dtype = plan
        return lora_linear(x_compute, weight, adapters, self.backend).to(out_dtype)


@contextlib.contextmanager
def _fastlora_on_meta(model: nn.Module, backend: str, notes: list[str], nf4_experts: bool) -> Iterator[None]:
    """fastlora's fused forward on every LoRA layer of a meta model, and its expert path on MoE experts
    (:mod:`fastlora.memory.experts`). With ``backend="triton"`` (the GPU's) its ops are answered by their fake
    implementations through the registered ops; "torch" runs the reference ops on meta (the tests compare that with
    the same backend on real CPU tensors)."""
    from fastlora import backends, ops
    from fastlora.moe.structure import param_wrapper_class
    from fastlora.tuning import choice
    from fastlora.wiring.plan import structural_reason

    # The ops served for ("triton", "meta"): dense (through the run-time choice) and grouped (the backend's module).
    served_key, grouped_key = ("triton", "meta"), ("triton", "meta", True)
    choice._served[served_key] = backends._checked[grouped_key] = MetaOps(ops._REGISTERED["triton"], "triton")
    installed = []
    wrapper_class = param_wrapper_class()
    try:
        for name, layer in model.named_modules():
            if not hasattr(layer, "lora_A") or not hasattr(layer, "base_layer") or isinstance(layer, wrapper_class):
                continue
            reason = structural_reason(layer)
            if reason not in (None, "weights on the meta device"):
                notes.append(f"{name}: left on PEFT ({reason})")
                continue
            layer.forward = _MetaFusedForward(layer, backend)
            installed.append(layer)
        with fused_experts_on_meta(model, backend, notes, nf4_experts):
            yield
    finally:
        for layer in installed:
            del layer.forward
        choice._served.pop(served_key, None)
        backends._checked.pop(grouped_key, None)


def _summed(*scratches):
    """One scratch function (see ``LiveBytes``) adding those given (None: none)."""
    present = [s for s in scratches if s is not None]
    return lambda func, args: sum(s(func, args) for s in present)


def _split_scratch(func, args) -> int:
    """Bytes of the Triton split path's per-call dequantization buffer (one [N, K] W in the compute dtype) for a fused
    NF4 op call that the launchers' default path sends there (a tuned dispatch table may choose otherwise)."""
    from fastlora.kernels import dispatch

    name = getattr(func, "_name", "")
    if name not in ("fastlora::lora_linear", "fastlora::lora_linear_scaled", "fastlora::lora_linear_grad_input"):
        return 0
    if args[2] is None or args[3] == 0:  # dense, or 8-bit (blocksize 0)
        return 0
    first = args[0]
    m, dtype = first.shape[0], first.dtype
    if name == "fastlora::lora_linear_grad_input":
        op, n, k = "grad_input", first.shape[1], args[5].shape[1]  # grad_out [M, N], lora_a [R, K]
    else:
        op, n, k = "forward", args[6].shape[0], first.shape[1]  # x [M, K], lora_b [N, R]
    if dispatch.choice(op, "nf4", m, n, k, dtype).path != "split":
        return 0
    return n * k * first.element_size()


# The meta models of the last specs accounted (keyed without seq and batch): the planner accounts one model at many
# sequence lengths, and building an 8B model with PEFT takes longer than its step. A step leaves the model as it was.
_META_MODELS: dict[tuple, nn.Module] = {}
_META_MODELS_KEPT = 4


def _meta_model(spec: StepSpec, attention: str) -> nn.Module:
    key = (dataclasses.replace(spec, seq=1, batch=1), attention)
    model = _META_MODELS.pop(key, None) or build_peft_model(spec, "meta", attention)
    _META_MODELS[key] = model  # most recent last
    while len(_META_MODELS) > _META_MODELS_KEPT:
        _META_MODELS.pop(next(iter(_META_MODELS)))
    return model


def account(spec: StepSpec, contender: str, *, device: str = "meta", attention: str = "cuda-flash",
            backend: str = "triton", extrapolate: bool = True) -> Accounting:  # fmt: skip
    """Peak bytes of one training step of ``spec`` for ``contender`` (see the module doc).

    On meta, a model of uniform decoder layers is accounted with 3 and 4 layers and extrapolated to all of them
    (exact: :mod:`fastlora.memory.layers`); ``extrapolate=False`` accounts every layer.
    For the tests' check against real allocations: ``device="cpu"`` runs the same step for real on CPU tensors
    (small models only; fastlora with ``backend``, "torch" or "cpp"), and ``attention="cpu-flash"`` with
    ``backend="torch"`` makes the meta run execute what that CPU run executes.
    """
    if device == "meta" and extrapolate and spec.layers is None:
        config = model_config(spec.model)
        if uniform_reason(config) is None:
            return _extrapolated(spec, contender, config.num_hidden_layers, attention=attention, backend=backend)
    if contender not in CONTENDERS:
        raise ValueError(f"contender {contender!r}: choose one of {CONTENDERS}")
    if spec.experts == "nf4" and (contender == "peft" or device != "meta"):
        raise ValueError("NF4 experts: accounted for fastlora on meta only (PEFT + bitsandbytes keep 3-D expert weights "
                         "dense: bitsandbytes quantizes nn.Linear only)")  # fmt: skip
    if device == "meta" and contender != "peft" and spec.method == "lora" and spec.dtype == "float32":
        raise ValueError("fastlora times two autograd graphs for fp32 dense LoRA layers on the device and keeps the faster "
                         "(fastlora.functions.graph): a meta run cannot choose; account bfloat16/float16 or QLoRA")  # fmt: skip
    if device == "meta":
        model = _meta_model(spec, attention_implementation(attention))
    else:
        model = build_peft_model(spec, device)
    notes: list[str] = []
    vocab = model.get_base_model().config.vocab_size
    split = contender.startswith("fastlora") and backend == "triton"
    tracker = LiveBytes(vocab_size=vocab, scratch=_split_scratch if split else None)
    if spec.experts == "nf4":
        tracker.scratch = _summed(tracker.scratch, count_nf4_experts(model, tracker))
        notes.append("expert weights counted in NF4 (fastlora.patch(model, quantize_experts='nf4')); absmax resolved per call")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    stack = contextlib.ExitStack()
    with stack:
        if contender.startswith("fastlora"):
            if device == "meta":
                stack.enter_context(_fastlora_on_meta(model, backend, notes, spec.experts == "nf4"))
            else:
                import fastlora

                fastlora.patch(model, backend=backend)
                stack.callback(fastlora.unpatch, model)
        if contender in ("fastlora+loss", "fastlora+all"):
            from fastlora.training.cross_entropy import install

            _installed(stack, notes, *install(model))
        if contender == "fastlora+all":
            _install_long_context(model, stack, notes, tracker)
        if device == "meta":
            stack.enter_context(sampled_loops())
            stack.enter_context(meta_autocast())
        ids = torch.randint(0, vocab, (spec.batch, spec.seq), device=device)
        model.train()
        layers = decoder_layers(model, model.get_base_model().config.num_hidden_layers)
        with tracker.tracking(model), marking_layers(layers, tracker):
            with MetaTruth() if device == "meta" else contextlib.nullcontext():
                tracker.phase = "forward"
                loss = model(input_ids=ids, labels=ids).loss
                tracker.phase = "backward"
                loss.backward()
                del loss
                tracker.phase = "optimizer step"
                with tracker.category("adapters"):
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    breakdown = {c: tracker.peak_breakdown[c] for c in CATEGORIES}
    return Accounting(spec, contender, tracker.peak, breakdown, tracker.peak_phase, notes, tracker.host_peak,
                      tracker.segment_peaks)  # fmt: skip


def _extrapolated(spec: StepSpec, contender: str, layers: int, **options) -> Accounting:
    """:func:`account` of ``spec`` with FEW_LAYERS decoder layers, extrapolated to ``layers``."""
    few, more = (account(dataclasses.replace(spec, layers=n), contender, **options) for n in FEW_LAYERS)
    segments, host = extrapolated((few.segment_peaks, few.host_peak), (more.segment_peaks, more.host_peak), layers)
    (phase, _), (peak, breakdown) = max(segments.items(), key=lambda item: item[1][0])
    notes = [f"accounted with {FEW_LAYERS[0]} and {FEW_LAYERS[1]} decoder layers, extrapolated to {layers} (every layer "
             "runs the same ops: fastlora.memory.layers)"]  # fmt: skip
    model_notes = [[n for n in a.notes if ".layers." not in n] for a in (few, more)]
    notes += [extrapolated_note(a, b, layers) for a, b in zip(*model_notes)]
    layer_notes = sorted({n.split(".layers.", 1)[1].split(".", 1)[1] for n in more.notes if ".layers." in n})
    notes += [f"every decoder layer's {n}" for n in layer_notes]
    return Accounting(spec, contender, peak, breakdown, phase, notes, host, segments)


def _installed(stack: contextlib.ExitStack, notes: list[str], undo, description: str) -> None:
    notes.append(description)
    if undo is not None:
        stack.callback(undo)


def _install_long_context(model: nn.Module, stack: contextlib.ExitStack, notes: list[str], tracker: LiveBytes) -> None:
    """fastlora's offloaded checkpoints, tiled MLP and chunked norms on ``model``, as ``patch`` installs them
    (:mod:`fastlora.training.long_context`); the offload's host buffers are counted as host memory."""
    from collections import Counter

    from fastlora.training import offload, rms_norm, tiled_mlp

    _installed(stack, notes, *offload.install(model, Counter()))
    new_host_buffer = offload.HostCopies._new_host_buffer

    def counted_host_buffer(copies, x):
        with tracker.host_allocations():
            return new_host_buffer(copies, x)

    offload.HostCopies._new_host_buffer = counted_host_buffer
    stack.callback(setattr, offload.HostCopies, "_new_host_buffer", new_host_buffer)
    undo, description, untiled = tiled_mlp.install(model, None)
    _installed(stack, notes, undo, description)
    notes.extend(f"{name}: MLP not tiled ({why})" for name, why in untiled.items())
    undo, description, unchunked = rms_norm.install(model)
    _installed(stack, notes, undo, description)
    notes.extend(f"{name}: norm not chunked ({why})" for name, why in unchunked.items())
