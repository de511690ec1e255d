"""Put the fused LoRA linear inside PEFT models: ``patch`` swaps the forward of each supported LoRA layer
instance, ``unpatch`` restores it.

Nothing is registered on the layers (no parameter, buffer or submodule; nothing renamed), so adapter files
and ``state_dict`` keys are unchanged. The swapped forward re-checks the layer on every call (adapters
disabled or merged, ``adapter_names``, LoRA variants, ...) and runs PEFT's own forward for what it cannot
fuse, counting the reason in the :class:`PatchReport`.

Usage::

    model = get_peft_model(model, LoraConfig(...))
    report = fastlora.patch(model)          # or backend="torch" | "triton" | "cpp"
    print(report)
"""

from __future__ import annotations

import logging
import os
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from fastlora import backends
from fastlora.training import long_context
from fastlora.wiring import verify as verification
from fastlora.functions.lora import lora_linear
from fastlora.wiring.plan import call_plan, layer_device, lora_classes, structural_reason
from fastlora.wiring.plan_memo import PlanMemo

is_compiling = torch.compiler.is_compiling  # bound once: this runs on every layer call

logger = logging.getLogger("fastlora")

#: Exceptions torch raises through a layer call as control flow, not errors: non-reentrant activation checkpointing
#: stops a recomputation early by raising from a saved-tensor hook. The guard lets them through.
_CONTROL_FLOW = tuple(
    getattr(torch.utils.checkpoint, name) for name in ("_StopRecomputationError", "CheckpointError")
    if hasattr(torch.utils.checkpoint, name)
)  # fmt: skip


@dataclass
class PatchReport:
    """What :func:`patch` did: fused layers with their backend, layers left on PEFT with the reason, and
    (updated live) how many calls of fused layers fell back to PEFT's forward, by reason.

    Usage::

        report = fastlora.patch(model); print(report); report.skipped   # {"name": "reason"}
    """

    requested_backend: str
    patched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    already_patched: dict[str, str] = field(default_factory=dict)
    fallback_calls: Counter = field(default_factory=Counter)
    fused_calls: int = 0
    #: Why there was nothing to fuse in a PEFT model of another method (prompt tuning, IA³, ...), else None.
    nothing_to_fuse: Optional[str] = None
    #: Layers patched later, when ``add_adapter``/``load_adapter`` created them (also listed in ``patched``).
    patched_after: list[str] = field(default_factory=list)
    #: Verify mode: whether it is on, how many call signatures each layer verified, and the layers that failed
    #: (with what differed); a failed layer runs PEFT's forward from then on.
    verify: bool = False
    verified: Counter = field(default_factory=Counter)
    verify_failures: dict[str, str] = field(default_factory=dict)
    #: Layers whose fastlora code raised unexpectedly (``internal error: <type>: <message>``): the call ran PEFT's
    #: forward, and so does every later call of the layer. A bug in fastlora: please report it.
    internal_errors: dict[str, str] = field(default_factory=dict)
    #: The fused linear cross-entropy (``fused_cross_entropy=True``): what was installed, or "PEFT's loss (not
    #: fused: <why>)"; None when not asked for.
    fused_loss: Optional[str] = None
    #: Offloaded checkpoints (``offload_checkpoints=True``, :mod:`fastlora.training.offload`): what was installed, or "not
    #: offloaded: <why>"; None when not asked for. ``offload_calls`` counts checkpointed calls since, per outcome.
    offload: Optional[str] = None
    offload_calls: Counter = field(default_factory=Counter)
    #: Tiled MLP (``tiled_mlp=``, :mod:`fastlora.training.tiled_mlp`): what was installed (None when not asked for), and the
    #: MLPs left untiled with the reason.
    tiled_mlp: Optional[str] = None
    untiled_mlps: dict[str, str] = field(default_factory=dict)
    #: Chunked RMSNorms (``chunked_norms=True``, :mod:`fastlora.training.rms_norm`): what was installed (None when not asked
    #: for), and the norms left as they are with the reason.
    chunked_norms: Optional[str] = None
    unchunked_norms: dict[str, str] = field(default_factory=dict)
    #: ``quantize_experts=``: per expert weight put in NF4 (``"<experts module>.<name>"``), its bytes dense and in NF4.
    quantized_experts: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def paths(self) -> list:
        """The run-time path choices made so far in this process, per op and shape, each with where it came from
        (measured here, cache, shipped table, forced): :func:`fastlora.tuning.decisions`."""
        from fastlora import tuning

        return tuning.decisions()

    @property
    def launch_fallbacks(self) -> list:
        """Op keys whose kernel failed at its first launch and that run a fallback path since, each with the reason
        (:func:`fastlora.tuning.launch_fallbacks`): a kernel that cannot launch never crashes a step."""
        from fastlora import tuning

        return tuning.launch_fallbacks()

    @property
    def changed(self) -> bool:
        """Whether this call patched anything (False for a repeated ``patch``)."""
        return bool(self.patched)

    def __str__(self) -> str:
        parts = []
        if self.patched:
            per_backend = Counter(self.patched.values())
            parts.append(f"{len(self.patched)} LoRA layers fused ({_counts(per_backend)})")
        if self.already_patched:
            parts.append(f"{len(self.already_patched)} already patched, left as they were (nothing changed)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} left on PEFT ({_counts(Counter(self.skipped.values()))})")
        if self.nothing_to_fuse:
            parts.append(self.nothing_to_fuse)
        if self.patched_after:
            parts.append(f"{len(self.patched_after)} of them patched when added after patch()")
        if self.verify:
            parts.append(f"verify: {sum(self.verified.values())} call signatures agreed with PEFT, {len(self.verify_failures)} layers failed")
        if self.fused_loss:
            parts.append(f"loss: {self.fused_loss}")
        if self.quantized_experts:
            before, after = (sum(sizes) for sizes in zip(*self.quantized_experts.values()))
            parts.append(f"{len(self.quantized_experts)} expert weights in NF4 ({before / 2**30:.3g} GiB -> {after / 2**30:.3g} GiB)")
        if self.internal_errors:
            parts.append(f"{len(self.internal_errors)} layers hit an internal error (run by PEFT since)")
        parts.extend(long_context.report_parts(self))
        if self.fallback_calls:
            parts.append(f"calls run by PEFT since: {_counts(self.fallback_calls)}")
        if self.launch_fallbacks:
            parts.append(f"kernels that failed to launch, on a fallback path: {'; '.join(map(str, self.launch_fallbacks))}")
        return "fastlora: " + ("; ".join(parts) if parts else "no LoRA layers")


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key}: {n}" for key, n in counter.most_common())


class FusedForward:
    """The forward installed on one LoRA layer instance. Holds what ``unpatch`` needs to restore it."""

    def __init__(
        self, layer: nn.Module, name: str, requested: str, backend: str, report: PatchReport,
        previous: Optional[Callable], verify: bool,
    ):  # fmt: skip
        self.layer = layer
        self.name = name
        # What patch() was asked for ("auto": FASTLORA_BACKEND as set now, else the best per device) and what it
        # reported; each call resolves the backend for its input's device (a model patched on the CPU or on meta
        # and moved to CUDA afterwards runs fused there), remembered per device type.
        self.requested = (os.environ.get(backends.ENV_VAR) or "auto") if requested == "auto" else requested
        self.backend = backend
        self._backends: dict[str, str] = {}
        self._unavailable: dict[str, str] = {}
        # Resolved now for the device the layer is on: a compiled trace must not fill the dict (its guards would
        # see it change, and recompile). Not Triton on CPU tensors: that depends on TRITON_INTERPRET at call time.
        device_type = layer_device(layer).type
        if device_type != "meta" and not (device_type == "cpu" and self.requested == "triton"):
            self._backend_for(device_type)
        self.report = report
        # An instance-level forward that was there before (e.g. an accelerate hook); None means the class's.
        self.previous = previous
        self._warned: set[str] = set()
        # Verify mode: call signatures already checked against PEFT.
        self._verified: Optional[set[tuple]] = set() if verify else None
        # Why every call of this layer runs PEFT's forward for good (a verify failure, an internal error), or None.
        self._disabled: Optional[str] = None
        # The last plan and the layer state it was read from (fastlora.wiring.plan_memo): reused while that state holds.
        self._memo: Optional[PlanMemo] = None

    def original(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # torch.compile guards on Python ints it reads, so counting inside a compiled region would recompile the
        # graph on every call; calls there go uncounted (the plan below is still decided on every trace), and
        # unguarded (an exception there is the compiler's to report).
        if is_compiling():
            return self._forward(x, args, kwargs, False)
        # The guard: nothing fastlora does per call may break a forward PEFT runs (a try costs nothing unless it
        # raises on Python 3.11+).
        try:
            return self._forward(x, args, kwargs, True)
        except _CONTROL_FLOW:
            raise
        except Exception as err:  # noqa: BLE001 - anything from fastlora's code; PEFT's own errors re-raise below
            return self._after_internal_error(err, x, args, kwargs)

    def _forward(self, x: torch.Tensor, args: tuple, kwargs: dict, counting: bool) -> torch.Tensor:
        device_type = "cpu" if x.is_cpu else x.device.type
        backend = self._backends.get(device_type) or self._backend_for(device_type)
        if backend is None:
            if counting:
                self._fall_back(self._unavailable[device_type])
            return self.original(x, *args, **kwargs)
        autocast = torch.is_autocast_enabled(device_type)
        memo = self._memo
        if memo is not None and counting and not autocast and not args and not kwargs and memo.holds(x):
            plan = memo.plan(x)
        else:
            plan = self._disabled or call_plan(self.layer, device_type, x, args, kwargs)
            # Verify mode checks each new call signature, so it always plans; a compiled trace keeps no memo; under
            # autocast the plan casts W per call.
            reusable = counting and not autocast and not args and not kwargs and self._verified is None and not isinstance(plan, str)
            self._memo = PlanMemo.capture(self.layer, device_type, x, plan) if reusable else None
        if isinstance(plan, str):
            if counting:
                self._fall_back(plan)
            return self.original(x, *args, **kwargs)
        if self._verified is not None and counting and not self._passes_verification(x, args, kwargs, device_type, backend):
            self._fall_back(self._disabled)
            return self.original(x, *args, **kwargs)
        if not counting:
            return self._fused(plan, autocast, device_type, backend)
        # Counted before the call: a recomputation that activation checkpointing stops early (by raising) was fused.
        self.report.fused_calls += 1
        try:
            return self._fused(plan, autocast, device_type, backend)
        except _CONTROL_FLOW:
            raise
        except Exception:
            self.report.fused_calls -= 1  # the guard counts it as an internal error (or PEFT raises the caller's)
            raise

    def _backend_for(self, device_type: str) -> Optional[str]:
        """The backend for calls on ``device_type``, resolved once per device type; None (the reason kept in
        ``_unavailable``) when the requested backend cannot serve it."""
        try:
            if device_type == "meta":
                raise backends.BackendUnavailable("input on the meta device (nothing to compute)")
            backend = self._backends[device_type] = backends.resolve(self.requested, device_type)
            return backend
        except backends.BackendUnavailable as err:
            self._unavailable[device_type] = str(err)
            return None

    def _after_internal_error(self, err: Exception, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """PEFT's forward for a call on which fastlora's code raised. When PEFT raises too, the error was the
        caller's (a wrong shape or dtype): PEFT's exception propagates, as without fastlora. Otherwise the layer runs
        PEFT from now on, and the report, the log (with the traceback, once) and a RuntimeWarning say so."""
        y = self.original(x, *args, **kwargs)
        message = str(err).strip().splitlines()
        reason = f"internal error: {type(err).__name__}: {message[0][:200] if message else ''}".rstrip(": ")
        self._disabled, self._memo = reason, None
        self.report.internal_errors[self.name] = reason
        self.report.fallback_calls[reason] += 1
        self._warned.add(reason)
        text = f"fastlora: {self.name} {reason}; this layer runs PEFT's forward from now on (a fastlora bug: please report it)"
        logger.error(text, exc_info=err, extra={"fastlora_internal_error": reason})
        warnings.warn(text, RuntimeWarning, stacklevel=3)
        return y

    def _fall_back(self, reason: str) -> None:
        self.report.fallback_calls[reason] += 1
        if reason not in self._warned:
            self._warned.add(reason)
            logger.warning("fastlora: %s runs PEFT's forward: %s", self.name, reason)

    def _fused(self, plan, autocast: bool, device_type: str, backend: str) -> torch.Tensor:
        x_compute, base, adapters, out_dtype = plan
        if autocast:
            # The plan already applied autocast's dtype; the ops' internal matmuls must not be recast.
            with torch.autocast(device_type, enabled=False):
                y = lora_linear(x_compute, base, adapters, backend)
        else:
            y = lora_linear(x_compute, base, adapters, backend)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _passes_verification(self, x: torch.Tensor, args, kwargs, device_type: str, backend: str) -> bool:
        """Verify mode: on a new call signature, compare with PEFT; a mismatch disables the fused path for good."""
        key = verification.signature(self.layer, x, kwargs.get("adapter_names"))
        if key in self._verified:
            return True

        def fused(inputs):
            plan = call_plan(self.layer, device_type, inputs, args, kwargs)
            if isinstance(plan, str):  # this call would run PEFT's forward anyway: nothing to compare
                return self.original(inputs, *args, **kwargs)
            return self._fused(plan, torch.is_autocast_enabled(device_type), device_type, backend)

        mismatch = verification.compare_with_peft(self.layer, x, fused, lambda inputs: self.original(inputs, *args, **kwargs))
        if mismatch is None:
            self._verified.add(key)
            self.report.verified[self.name] += 1
            return True
        self._disabled = f"verify: {mismatch}"
        self.report.verify_failures[self.name] = str(mismatch)
        message = f"fastlora verify: {self.name} {mismatch}; this layer runs PEFT's forward from now on"
        logger.error(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return False


def _lora_layers(model: nn.Module):
    LoraLayer, _, _ = lora_classes()
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def _peft_methods(model: nn.Module) -> list[str]:
    """The PEFT methods (``peft_type`` of each adapter config) of the PEFT models inside ``model``; [] if none."""
    from peft import PeftMixedModel, PeftModel

    methods: list[str] = []
    for module in model.modules():
        if isinstance(module, (PeftModel, PeftMixedModel)):
            for config in module.peft_config.values():
                method = getattr(config.peft_type, "value", str(config.peft_type))
                if method not in methods:
                    methods.append(method)
    return methods


def patch(
    model: nn.Module,
    *,
    backend: str = "auto",
    verify: Optional[bool] = None,
    fused_cross_entropy: bool = False,
    offload_checkpoints: bool = False,
    tiled_mlp: bool | int = False,
    chunked_norms: bool = False,
    quantize_experts: Optional[str] = None,
) -> PatchReport:
    """Fuse every supported PEFT LoRA layer of ``model`` in place; returns what was done.

    ``backend``: "auto" (best per device; the ``FASTLORA_BACKEND`` environment variable overrides it),
    "torch" (reference), "triton" (CUDA, or CPU under ``TRITON_INTERPRET=1``) or "cpp" (CPU). An unknown or
    unavailable backend raises before anything changes; so does a module that is not a PEFT model at all. A PEFT
    model of another method (prompt tuning, IA³, ...) is left unchanged, and the report says why.

    ``verify`` (default: the ``FASTLORA_VERIFY`` environment variable): check each layer's first call per input
    signature against PEFT's forward and backward; a layer that differs falls back to PEFT for good
    (:mod:`fastlora.wiring.verify`). ``fused_cross_entropy``: compute a causal LM's loss from the hidden states and
    ``lm_head`` in chunks, never materializing the logits (:mod:`fastlora.training.cross_entropy`).

    Long context: ``offload_checkpoints=True`` keeps the inputs of checkpointed decoder layers in host memory
    until backward (:mod:`fastlora.training.offload`; gradient checkpointing must be on, now or later); ``tiled_mlp=True``
    (or tokens per shard) runs each gated MLP in sequence shards, saving only its input (:mod:`fastlora.training.tiled_mlp`);
    ``chunked_norms=True`` computes Llama-form RMSNorms in row chunks, saving x and one fp32 per row
    (:mod:`fastlora.training.rms_norm`).

    ``quantize_experts="nf4"``: store the 3-D expert weights of mixture-of-experts models (which bitsandbytes
    leaves in bf16) in bitsandbytes' NF4 format, freeing the dense stacks (:mod:`fastlora.moe.nf4_experts`);
    ``report.quantized_experts`` lists them with their bytes before and after.

    LoRA layers that ``add_adapter``/``load_adapter`` create after ``patch`` are patched as they are created (they
    are listed in ``report.patched_after``), with the same backend and settings.

    Usage::

        report = fastlora.patch(model)
        report = fastlora.patch(model, verify=True)   # try fastlora on a new architecture without risk
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastlora.patch expects a torch.nn.Module, got {type(model).__name__}")
    if backend != "auto" and backend not in backends.NAMES:
        raise ValueError(backends.unavailable_reason(backend, "cpu"))
    report = PatchReport(requested_backend=backend, verify=verification.requested(verify))
    layers = _lora_layers(model)
    if not layers:
        methods = _peft_methods(model)
        if not methods:
            raise ValueError(
                f"{type(model).__name__} holds no PEFT LoRA layers: call peft.get_peft_model(model, LoraConfig(...)) first"
            )
        report.nothing_to_fuse = f"nothing to fuse: PEFT method {', '.join(methods)} has no LoRA layers (fastlora fuses LoRA only); model unchanged"
        logger.warning(str(report))
        return report

    applied = _patch_layers(model, layers, backend, report)
    watched: list[nn.Module] = []
    long_context_undo: list[Callable[[], None]] = []
    try:
        watched.extend(_watch_new_adapters(model, backend, report))
        long_context_undo.extend(long_context.install(model, report, offload_checkpoints, tiled_mlp, chunked_norms))
        if fused_cross_entropy:
            from fastlora.training.cross_entropy import install

            undo, description = install(model)
            if undo is not None:
                _LOSS_UNDO[model] = undo
                report.fused_loss = description
            else:
                report.fused_loss = f"PEFT's loss (not fused: {description})"
                logger.warning("fastlora: the loss stays the model's own: %s", description)
        if quantize_experts is not None:
            _quantize_experts(model, quantize_experts, backend, report)
    except BaseException:
        for layer in applied:
            _restore(layer)
        for tuner in watched:
            _unwatch(tuner)
        for undo in long_context_undo:
            undo()
        raise
    if long_context_undo:
        _LONG_CONTEXT_UNDO.setdefault(model, []).extend(long_context_undo)

    if report.skipped:
        logger.warning(str(report))
    else:
        logger.info(str(report))
    return report


def _quantize_experts(model: nn.Module, quant_type: str, backend: str, report: PatchReport) -> None:
    """``patch(quantize_experts=...)``: the expert weights to NF4 (raises before changing anything on bad input)."""
    from fastlora.moe.nf4_experts import quantize_experts

    summary = quantize_experts(model, quant_type, backend=backend)
    report.quantized_experts.update(summary.projections)
    if not summary.projections:
        logger.warning("fastlora: quantize_experts=%r: no dense expert weights to quantize", quant_type)


def _patch_layers(model: nn.Module, layers, backend: str, report: PatchReport) -> list[nn.Module]:
    """Install the fused forward on every patchable layer of ``layers``; all or nothing. Returns the patched ones."""
    layers, expert_chains = _split_expert_layers(layers, backend, report)
    plan = []
    for name, layer in layers:
        current = layer.__dict__.get("forward")
        if isinstance(current, FusedForward):
            report.already_patched[name] = current.backend
            continue
        reason = structural_reason(layer)
        if reason is not None:
            report.skipped[name] = reason
            continue
        plan.append((name, layer, _backend_at_patch_time(backend, layer_device(layer)), current))
    # Availability of "auto" picks can fail late (e.g. the C++ build); resolve() already checked them all.

    applied = []
    try:
        for name, layer, chosen, previous in plan:
            layer.forward = FusedForward(layer, name, backend, chosen, report, previous, report.verify)
            applied.append(layer)
            report.patched[name] = chosen
        applied.extend(_install_expert_chains(expert_chains, report))
    except BaseException:
        for layer in applied:
            _restore(layer)
        raise
    return applied


def _backend_at_patch_time(requested: str, device: torch.device) -> str:
    """The backend named in the report for a layer now on ``device`` (calls resolve theirs per input device; on
    meta, the requested name). Raises BackendUnavailable for an explicit backend that can serve no device here."""
    if device.type == "meta":
        return requested
    try:
        return backends.resolve(requested, device)
    except backends.BackendUnavailable:
        if requested != "auto" and any(backends.unavailable_reason(requested, t) is None for t in ("cuda", "cpu")):
            return requested  # e.g. triton on a CPU model of a CUDA machine: the model may move there
        raise


def _split_expert_layers(layers, backend: str, report: PatchReport):
    """PEFT's ParamWrappers (LoRA on 3-D expert weights) are fused per experts module by :mod:`fastlora.moe`:
    returns the other layers and the expert chains to install (reasons for unfusable ones go in ``report``)."""
    from fastlora.wiring import experts as wiring

    return wiring.split_param_wrappers(layers, backend, report)


def _install_expert_chains(expert_chains, report: PatchReport):
    from fastlora.wiring import experts as wiring

    for chain in expert_chains:
        yield wiring.install(chain, report)


# Per patched model: how to take its fused loss out again (unpatch). Weak keys: a freed model frees its entry.
_LOSS_UNDO: "weakref.WeakKeyDictionary[nn.Module, Callable[[], None]]" = weakref.WeakKeyDictionary()


# Per patched model: how to take out its offloaded checkpoints and tiled MLPs (unpatch).
_LONG_CONTEXT_UNDO: "weakref.WeakKeyDictionary[nn.Module, list[Callable[[], None]]]" = weakref.WeakKeyDictionary()


class _AdapterWatch:
    """Installed as a PEFT tuner's ``inject_adapter`` (instance attribute): runs PEFT's, then patches the LoRA layers
    it created, so adapters added after ``patch`` are never silently left unfused."""

    def __init__(self, tuner: nn.Module, model: nn.Module, backend: str, report: PatchReport):
        self.tuner = tuner
        self.previous = tuner.__dict__.get("inject_adapter")  # an instance-level one already there, else None
        # A strong reference (a cycle the collector frees): a deep copy or pickle of the model then carries a watch
        # of its own copy, where a weak reference would still point at the original.
        self.model = model
        self.backend = backend
        self.report = report

    def __call__(self, *args: Any, **kwargs: Any):
        if self.previous is not None:
            result = self.previous(*args, **kwargs)
        else:
            result = type(self.tuner).inject_adapter(self.tuner, *args, **kwargs)
        before = set(self.report.patched)
        new_layers = [(n, m) for n, m in _lora_layers(self.model) if not isinstance(m.__dict__.get("forward"), FusedForward)]
        _patch_layers(self.model, new_layers, self.backend, self.report)
        added = [name for name in self.report.patched if name not in before]
        self.report.patched_after.extend(added)
        skipped = [name for name, _ in new_layers if name in self.report.skipped]
        logger.info("fastlora: adapter added after patch(): %d new LoRA layers fused, %d left on PEFT%s", len(added),
                    len(skipped), "".join(f"; {n}: {self.report.skipped[n]}" for n in skipped))  # fmt: skip
        return result


def _watch_new_adapters(model: nn.Module, backend: str, report: PatchReport) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTuner

    watched = []
    for module in model.modules():
        if isinstance(module, BaseTuner) and not isinstance(module.__dict__.get("inject_adapter"), _AdapterWatch):
            module.inject_adapter = _AdapterWatch(module, model, backend, report)
            watched.append(module)
    return watched


def _unwatch(tuner: nn.Module) -> None:
    watch = tuner.__dict__.get("inject_adapter")
    if isinstance(watch, _AdapterWatch):
        if watch.previous is not None:
            tuner.inject_adapter = watch.previous
        else:
            del tuner.inject_adapter


def _restore(layer: nn.Module) -> None:
    fused = layer.__dict__.get("forward")
    if fused.previous is not None:
        layer.forward = fused.previous
    else:
        del layer.forward


def unpatch(model: nn.Module) -> int:
    """Restore the original forward of every layer :func:`patch` changed (and the loss, and PEFT's adapter
    injection; NF4 expert weights become dense parameters again, holding their dequantized values); returns how
    many layers.

    Usage::

        fastlora.unpatch(model)
    """
    restored = 0
    for module in model.modules():
        _unwatch(module)
        if isinstance(module.__dict__.get("forward"), FusedForward):
            _restore(module)
            restored += 1
    undo = _LOSS_UNDO.pop(model, None)
    if undo is not None:
        undo()
    for undo in _LONG_CONTEXT_UNDO.pop(model, []):
        undo()
    _dequantize_experts(model)
    return restored


def _dequantize_experts(model: nn.Module) -> None:
    """NF4 expert weights (``quantize_experts=``) back to dense ones: PEFT's forward reads the dense weights."""
    from fastlora.moe.nf4_experts import dequantize_experts

    names = dequantize_experts(model)
    if names:
        logger.info("fastlora: unpatch: %d NF4 expert weights dequantized to dense parameters", len(names))


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a LoRA layer) currently runs fastlora's forward."""
    return isinstance(module.__dict__.get("forward"), FusedForward)
