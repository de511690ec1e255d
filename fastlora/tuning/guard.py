"""The guarded first launch: a kernel that cannot compile or launch for a key falls back, never crashes a step.

A Triton kernel compiles the first time it meets a key (constexprs, dtypes, alignment), and that is where it
fails: a config needing more shared memory than the GPU has (``OutOfResources``), a dtype the kernel does not
handle, a Triton or LLVM error that Python can catch. A C++ kernel can refuse a dtype the same way. So the first
call of every key of a kernel backend's op (:class:`fastlora.tuning.TunedOps`: whatever chose the path, measured,
cache, shipped table, ``FASTLORA_PATH`` or the only candidate; and the backend's untuned ops) runs under
:func:`first_launch`. When it raises, the same call runs on the fallback: the backend's ATen composite (candidate
"torch") where it applies, else the plain-PyTorch reference op (:mod:`fastlora.backends.reference`, dropout
included, the same masks). The key keeps the fallback, the reason is logged once (logger ``fastlora``), warned as
:class:`LaunchFallbackWarning`, listed by :func:`launch_fallbacks`, and shows in :func:`fastlora.tuning.decisions`
(so in the report ``patch`` returns: ``report.paths``).

Not guarded (:data:`NOT_LAUNCH_ERRORS`): a CUDA out-of-memory error (callers such as a batch-size finder act on
it), the exception by which activation checkpointing stops a recomputation, and an error the fallback raises too (bad input: it propagates as the kernel raised it). Later calls of a key
that launched once are not wrapped (no cost on the hot path).

Tests make :class:`LaunchFallbackWarning` an error (pyproject's ``filterwarnings``), so a kernel that fails in the
suite is never hidden by its fallback; tests of the guard itself catch it with ``pytest.warns``.

Usage::

    out, used, fn = guard.first_launch("triton", "lora_down", key.text, "triton", launcher, args, fallbacks)
    for fallback in guard.launch_fallbacks(): print(fallback)
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable, NamedTuple

import torch
import torch.utils.checkpoint

logger = logging.getLogger("fastlora")

#: The fallback of last resort: the op of the plain-PyTorch reference backend.
REFERENCE = "reference"
#: The name of the ATen composite among a kernel backend's candidates.
COMPOSITE = "torch"
#: Most argument keys an untuned op remembers before starting over (many distinct shapes).
_SEEN_LIMIT = 4096


def _not_launch_errors() -> tuple[type[BaseException], ...]:
    # CUDA out of memory; and the exception non-reentrant activation checkpointing raises from its saved-tensor hook
    # to stop a recomputation early (control flow that must reach torch.utils.checkpoint).
    stop = getattr(torch.utils.checkpoint, "_StopRecomputationError", None)
    return (torch.OutOfMemoryError,) + ((stop,) if isinstance(stop, type) else ())


#: Exceptions that pass through every guard: they are not launch errors.
NOT_LAUNCH_ERRORS = _not_launch_errors()


class LaunchFallbackWarning(RuntimeWarning):
    """A kernel failed at its first launch for a key; that key runs on a fallback path from now on."""


class LaunchFallback(NamedTuple):
    """One key that left its kernel: which op and key, the path that failed, the path that took over, and why."""

    backend: str
    op: str
    key: str
    failed: str
    fallback: str
    reason: str

    def __str__(self) -> str:
        return f"{self.backend} {self.op} {self.key}: {self.failed!r} failed at its first launch ({self.reason}); runs {self.fallback!r}"


_fallbacks: dict[tuple[str, str, str], LaunchFallback] = {}
_memos: list = []  # every memo of guarded keys (dicts, sets): emptied by reset()


def forgotten_on_reset(memo):
    """Register ``memo`` (a dict or set of keys that launched or fell back) to be emptied by :func:`reset`; returns it."""
    _memos.append(memo)
    return memo


def reset() -> None:
    """Forget the fallbacks and the keys seen (with :func:`fastlora.tuning.reset`)."""
    _fallbacks.clear()
    for memo in _memos:
        memo.clear()


def launch_fallbacks() -> list[LaunchFallback]:
    """Every key this process moved to a fallback after a failed first launch, in order.

    Usage: ``for f in tuning.launch_fallbacks(): print(f)``
    """
    return list(_fallbacks.values())


def source(backend: str, op: str, key: str) -> str:
    """Where a fallen-back key's path came from, as :class:`fastlora.tuning.Decision` shows it."""
    fallback = _fallbacks.get((backend, op, key))
    return f"fallback: {fallback.failed!r} failed at its first launch ({fallback.reason})" if fallback else "fallback"


def reference_op(op: str) -> Callable:
    """The reference backend's implementation of ``op`` (any device, fp32 inside, dropout included)."""
    from fastlora.backends import reference

    return getattr(reference, op)


def fallbacks(op: str, applicable: dict[str, Callable], failed: str) -> list[tuple[str, Callable]]:
    """What takes over from ``failed``, in order: the composite where it applies, then the reference op."""
    found = [(COMPOSITE, applicable[COMPOSITE])] if COMPOSITE in applicable and failed != COMPOSITE else []
    return found + [(REFERENCE, reference_op(op))]


def path_function(op: str, path: str, applicable: dict[str, Callable]) -> Callable:
    """The function of ``path`` for ``op``: a candidate, or the reference op after a fallback."""
    return applicable[path] if path in applicable else reference_op(op)


def reason_of(err: BaseException) -> str:
    """One line saying what went wrong: the exception's type and the first line of its message (Triton's run long)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def first_launch(
    backend: str, op: str, key: str, path: str, fn: Callable, args: tuple, fallbacks_: list[tuple[str, Callable]]
) -> tuple[object, str, Callable]:
    """Run ``fn(*args)``, the first call of ``key``; if it raises a launch error, the first of ``fallbacks_`` that
    runs answers instead and the fallback is recorded. Returns (output, path used, its function).

    Usage: ``out, used, fn = first_launch("cpp", "lora_down", key.text, "cpp", cpp.lora_down, args, fallbacks(...))``
    """
    try:
        return fn(*args), path, fn
    except NOT_LAUNCH_ERRORS:
        raise
    except Exception as err:  # noqa: BLE001 - any launch error: the fallback answers, or the error propagates
        for name, fallback in fallbacks_:
            try:
                out = fallback(*args)
            except NOT_LAUNCH_ERRORS:
                raise
            except Exception:  # noqa: BLE001 - the fallback cannot answer either: try the next, else raise err
                continue
            record(LaunchFallback(backend, op, key, path, name, reason_of(err)))
            return out, name, fallback
        raise err


def record(fallback: LaunchFallback) -> None:
    """Remember ``fallback``, and say so once per key: a log line and a :class:`LaunchFallbackWarning`."""
    ident = (fallback.backend, fallback.op, fallback.key)
    if ident in _fallbacks:
        return
    _fallbacks[ident] = fallback
    logger.warning("fastlora: %s", fallback)
    warnings.warn(f"fastlora: {fallback}", LaunchFallbackWarning, stacklevel=4)


def guarded(backend: str, op: str, fn: Callable) -> Callable:
    """``fn`` (an op without tuned candidates, e.g. ``nf4_dequantize``) with the first call of each argument key
    (shapes, dtypes, the other arguments) guarded; a key that failed runs the reference op from then on.

    Usage: ``dequantize = guarded("triton", "nf4_dequantize", triton_backend.nf4_dequantize)``
    """
    seen: dict[tuple, Callable] = forgotten_on_reset({})

    def call(*args):
        key = _argument_key(args)
        chosen = seen.get(key)
        if chosen is not None:
            return chosen(*args)
        out, _, chosen = first_launch(backend, op, str(key), backend, fn, args, [(REFERENCE, reference_op(op))])
        if len(seen) >= _SEEN_LIMIT:
            seen.clear()
        seen[key] = chosen
        return out

    call.__name__, call.__doc__ = op, fn.__doc__
    return call


def _argument_key(args: tuple) -> tuple:
    return tuple(
        (tuple(a.shape), a.dtype, a.device.type) if isinstance(a, torch.Tensor) else tuple(a) if isinstance(a, list) else a
        for a in args
    )
