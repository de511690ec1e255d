"""Backends: who implements the ops of :mod:`fastlora.ops` on which device, and whether they can run here.

- ``torch``: plain PyTorch, any device. The reference (test oracle) and the last-resort path.
- ``triton``: Triton kernels on CUDA; on CPU tensors only under ``TRITON_INTERPRET=1`` (for tests).
- ``cpp``: C++ CPU operators, built with ninja on first use and cached.

``auto`` means: the best available backend for the device, in the order of :data:`PREFERENCE`. The
environment variable ``FASTLORA_BACKEND`` overrides ``auto``.

Usage::

    name = backends.resolve("auto", torch.device("cuda"))     # -> "triton"
    ops = backends.module(name, "cuda")                        # its op functions (fastlora.tuning routes them per shape)

The backends sit below the run-time choice (:mod:`fastlora.tuning`): a backend module lists its candidates per op
(``candidates(device_type)``: :class:`Candidate` values) and never imports the tuning that times them.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Callable, NamedTuple

import torch

NAMES = ("torch", "triton", "cpp")
#: Best first, per device type.
PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("cpp", "torch")}
ENV_VAR = "FASTLORA_BACKEND"

_MODULES = {"torch": "fastlora.backends.reference", "triton": "fastlora.backends.triton", "cpp": "fastlora.backends.cpp"}
#: The grouped (mixture-of-experts) ops of each backend (fastlora.grouped_ops): their own modules.
_GROUPED_MODULES = {
    "torch": "fastlora.backends.grouped_reference",
    "triton": "fastlora.backends.grouped_triton",
    "cpp": "fastlora.backends.grouped_cpp",
}
_loaded: dict[str, ModuleType] = {}
#: Modules found to serve a device (the check reads the environment and may build an extension: once).
_checked: dict[tuple[str, str, bool], ModuleType] = {}


class Candidate(NamedTuple):
    """One implementation of an op: ``fn`` has the op's signature; ``applies(key)`` says whether it can run the
    shape key (a :class:`fastlora.tuning.ShapeKey`)."""

    fn: Callable
    applies: Callable[[Any], bool] = lambda key: True


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on the requested device here (the message says why)."""


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def varies_per_call(name: str, device_type: str) -> bool:
    """Whether backend ``name``'s availability on ``device_type`` can change between calls, so it must not be
    remembered: Triton on CPU tensors runs only under ``TRITON_INTERPRET=1`` (the tests' interpreter), read per call.
    Usage: ``if not backends.varies_per_call(name, device.type): cache[name] = ...``"""
    return name == "triton" and device_type == "cpu"


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


def module(name: str, device_type: str, grouped: bool = False) -> ModuleType:
    """The module of backend ``name``'s ops on ``device_type`` (``grouped``: its grouped MoE ops), as it is (no
    per-shape choice: that is :func:`fastlora.tuning.implementation`); raises BackendUnavailable.

    Usage: ``backends.module("torch", "cpu").lora_linear(x, w, None, 0, None, s, b)``
    """
    key = (name, device_type, grouped)
    found = _checked.get(key)
    if found is not None:
        return found
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run on {device_type}: {reason}")
    found = importlib.import_module(_GROUPED_MODULES[name]) if grouped else _load(name)
    if not varies_per_call(name, device_type):
        _checked[key] = found
    return found
