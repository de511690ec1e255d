"""The grouped LoRA ops on the CPU in C++ (``csrc/grouped_lora.cpp``), built with ninja on first use and cached.

A separate extension from the dense ops' (:mod:`fastlora.backends.cpp`), with the same sources directory, compiler
flags and build-directory scheme (a ``grouped`` subdirectory). A failed build never raises at import:
:func:`unavailable_reason` says why, and ``fastlora.patch(backend="auto")`` then uses the torch reference.

Usage::

    y, s = grouped_lora_forward(x, offsets, w, a, b, [16], [2.0])
"""

from __future__ import annotations

import threading

from torch import Tensor

from fastlora.backends import cpp as dense_cpp

EXTENSION_NAME = "fastlora_grouped_cpp"
SOURCE_FILE = "grouped_lora.cpp"

_lock = threading.Lock()
_module = None
_failure: str | None = None


def _extension():
    """The built extension module; raises RuntimeError with the reason when it cannot be built or loaded."""
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                source = dense_cpp.source_dir() / SOURCE_FILE
                _module = dense_cpp.load_extension(EXTENSION_NAME, [source], dense_cpp.default_build_dir() / "grouped")
            except Exception as err:  # noqa: BLE001 - any build/load failure means "use the reference", with why
                _failure = f"grouped C++ extension failed to build or load: {type(err).__name__}: {err}"[-2000:]
    if _module is None:
        raise RuntimeError(_failure)
    return _module


def unavailable_reason() -> str | None:
    """None when the grouped C++ ops are built and loaded (building them now if needed), else why not."""
    try:
        _extension()
    except RuntimeError as err:
        return str(err)
    return None


def grouped_lora_forward(x: Tensor, offsets: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, ranks, scales):
    return _extension().grouped_lora_forward(x, offsets, weight, lora_a, lora_b, list(ranks), list(scales))


def grouped_lora_backward(grad_out, x, lora_s, offsets, weight, lora_a, lora_b, ranks, scales, needs_input_grad: bool):
    return _extension().grouped_lora_backward(
        grad_out, x, lora_s, offsets, weight, lora_a, lora_b, list(ranks), list(scales), needs_input_grad
    )
