"""Backends: who implements the ops of :mod:`fastlora.ops` on which device, and whether they can run here.

- ``torch``: plain PyTorch, any device. The reference (test oracle) and the last-resort path.
- ``triton``: Triton kernels on CUDA; on CPU tensors only under ``TRITON_INTERPRET=1`` (for tests).
- ``cpp``: C++ CPU operators, built with ninja on first use and cached.

``auto`` means: the best available backend for the device, in the order of :data:`PREFERENCE`. The
environment variable ``FASTLORA_BACKEND`` overrides ``auto``.

Usage::

    name = backends.resolve("auto", torch.device("cuda"))     # -> "triton"
    impl = backends.implementation(name, "cuda")               # the op functions, tuned per shape
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

NAMES = ("torch", "triton", "cpp")
#: Best first, per device type.
PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
ENV_VAR = "FASTLORA_BACKEND"

_MODULES = {"torch": "fastlora.backends.reference", "triton": "fastlora.backends.triton", "cpp": "fastlora.backends.cpp"}
_loaded: dict[str, ModuleType] = {}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on the requested device here (the message says why)."""


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot serve ``device_type`` here, or None when it can."""
    if name not in NAMES:
        return f"unknown backend {name!r} (choose from {', '.join(('auto',) + NAMES)})"
    if name == "torch":
        return None
    if name == "triton":
        if device_type == "cpu" and not _triton_interpreting():
            return "triton runs CPU tensors only under TRITON_INTERPRET=1 (the test interpreter)"
        if device_type not in ("cuda", "cpu"):
            return f"triton does not serve device {device_type!r}"
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
    if name == "cpp" and device_type != "cpu":
        return f"cpp serves CPU tensors only, not {device_type!r}"
    try:
        module = _load(name)
    except ImportError as err:
        return f"{name} backend cannot be imported: {err}"
    return module.unavailable_reason() if hasattr(module, "unavailable_reason") else None


def _load(name: str) -> ModuleType:
    module = _loaded.get(name)
    if module is None:
        module = _loaded[name] = importlib.import_module(_MODULES[name])
    return module


def resolve(requested: str, device: torch.device | str) -> str:
    """The concrete backend for ``requested`` ("auto" or a name) on ``device``; raises BackendUnavailable."""
    device_type = torch.device(device).type
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
    if requested == "auto":
        for name in PREFERENCE.get(device_type, ("torch",)):
            if unavailable_reason(name, device_type) is None:
                return name
        return "torch"
    reason = unavailable_reason(requested, device_type)
    if reason is not None:
        raise BackendUnavailable(f"backend {requested!r} cannot run on {device_type}: {reason}")
    return requested


_served: dict[tuple[str, str], object] = {}


def implementation(name: str, device_type: str):
    """The ops of backend ``name`` on ``device_type`` (raises if it cannot serve it): the torch reference (and the
    Triton interpreter) as they are; a kernel backend as a :class:`fastlora.tuning.TunedOps`, which routes each op
    per shape to the candidate measured fastest here (the backend module's ``candidates()``). Called on every op in eager mode, so the answer
    is remembered; Triton on CPU depends on ``TRITON_INTERPRET`` and is checked each time."""
    served = _served.get((name, device_type))
    if served is not None and not (name == "triton" and device_type == "cpu"):
        return served
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device_type}: {reason}")
    if served is None:
        module = _load(name)
        # Triton on CPU is the test interpreter, whose timings mean nothing: its launchers choose their own path
        # (fastlora.kernels.dispatch.choice, FASTLORA_PATH read on every call).
        if hasattr(module, "candidates") and not (name == "triton" and device_type == "cpu"):
            from fastlora.tuning import TunedOps

            served = TunedOps(name, device_type, module, module.candidates(device_type))
        else:
            served = module
        _served[(name, device_type)] = served
    return served
