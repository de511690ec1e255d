"""The forward ``fastlora.patch`` installs on one LoRA layer instance: the fused call, or PEFT's with the reason.

Usage (``fastlora.patch`` installs it; nothing to call directly)::

    layer.forward = FusedForward(layer, name, "auto", backend, report, layer.__dict__.get("forward"), verify=False)
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Callable, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from fastlora import backends
from fastlora.functions.lora import lora_linear
from fastlora.tuning import guard
from fastlora.wiring import verify as verification
from fastlora.wiring.plan import call_plan, layer_device
from fastlora.wiring.plan_memo import UNBOUND, PlanMemo
from fastlora.wiring.report import PatchReport

is_compiling = torch.compiler.is_compiling  # bound once: this runs on every layer call
logger = logging.getLogger("fastlora")

#: Exceptions torch raises through a layer call as control flow, not errors: non-reentrant activation checkpointing
#: stops a recomputation early by raising from a saved-tensor hook. The guard lets them through.
_CONTROL_FLOW = tuple(
    getattr(torch.utils.checkpoint, name) for name in ("_StopRecomputationError", "CheckpointError")
    if hasattr(torch.utils.checkpoint, name)
)  # fmt: skip


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
        # see it change, and recompile), unless the answer varies per call.
        device_type = layer_device(layer).type
        if device_type != "meta" and not backends.varies_per_call(self.requested, device_type):
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
        bind_key = None
        if memo is not None and counting and not autocast and not args and not kwargs and memo.holds(x):
            key = memo.call_key(x)
            call = UNBOUND if key is None else memo.bound(key)
            if call is UNBOUND:
                bind_key = key  # bound after this call, which decides its graph
            elif call is not None:  # the plan's call bound for an x like this one: no plan, no wrappers
                self.report.fused_calls += 1
                try:
                    return call(x)
                except _CONTROL_FLOW + guard.NOT_LAUNCH_ERRORS:
                    raise
                except Exception:  # noqa: BLE001 - the unbound call below runs it again, and reports or falls back
                    self.report.fused_calls -= 1
                    memo.unbind(key)
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
            y = self._fused(plan, autocast, device_type, backend)
        except _CONTROL_FLOW:
            raise
        except Exception:
            self.report.fused_calls -= 1  # the guard counts it as an internal error (or PEFT raises the caller's)
            raise
        if bind_key is not None:
            memo.bind(bind_key, x, backend)
        return y

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
