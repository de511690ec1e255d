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
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn

from fastlora import backends
from fastlora.training import long_context
from fastlora.wiring import verify as verification
from fastlora.wiring.fused_forward import FusedForward
from fastlora.wiring.plan import layer_device, lora_classes, structural_reason
from fastlora.wiring.report import PatchReport

logger = logging.getLogger("fastlora")


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
    leaves in bf16) in bitsandbytes' NF4 format, freeing the dense stacks (:mod:`fastlora.moe.nf4_quantize`);
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
    from fastlora.moe.nf4_quantize import quantize_experts

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
    from fastlora.moe.nf4_quantize import dequantize_experts

    names = dequantize_experts(model)
    if names:
        logger.info("fastlora: unpatch: %d NF4 expert weights dequantized to dense parameters", len(names))


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a LoRA layer) currently runs fastlora's forward."""
    return isinstance(module.__dict__.get("forward"), FusedForward)
