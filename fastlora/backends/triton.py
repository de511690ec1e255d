"""The ``triton`` backend: the ops of :mod:`fastlora.ops` on the Triton kernels of :mod:`fastlora.kernels`.

Serves CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (tests). The kernels' launchers already have
the signatures of :mod:`fastlora.backends.reference`, so this module re-exports them. :func:`candidates` lists
what :mod:`fastlora.tuning` times per shape: the Triton paths of :data:`fastlora.kernels.dispatch.CANDIDATES`
and the plain torch/cuBLAS composite.
"""

from __future__ import annotations

import functools
import importlib

import torch

from fastlora.kernels import (  # noqa: F401 - the launchers have the ops' signatures: re-exported as they are
    lora_down,
    lora_down_grad,
    lora_linear,
    lora_linear_grad_input,
    lora_up_grad,
    nf4_dequantize,
    nf4_resolve_absmax,
)
from fastlora.kernels.common import interpreting

#: ``lora_linear`` with its per-column scale: one launcher serves both ops.
lora_linear_scaled = lora_linear

#: tl.dot on bf16 and the async copies the configs pipeline with need Ampere or newer.
MIN_CAPABILITY = (8, 0)


def _dequantize_into_buffer(packed, absmax, blocksize: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    from fastlora.kernels import common, dispatch

    out = dispatch.dequant_buffer(n, k, dtype, packed.device)
    return nf4_dequantize(common.packed_bytes(packed), absmax, blocksize, n, k, dtype, out=out)


def _candidate(spec: tuple):
    """A :data:`fastlora.kernels.dispatch.CANDIDATES` entry ``(module.function, kwargs[, applies])`` as a Candidate."""
    from fastlora.kernels import dispatch
    from fastlora.tuning import Candidate

    where, kwargs = spec[:2]
    module, function = where.rsplit(".", 1)
    fn = getattr(importlib.import_module(f"fastlora.kernels.{module}"), function)
    launcher = functools.partial(fn, **kwargs) if kwargs else fn
    return Candidate(launcher, dispatch.APPLIES[spec[2]]) if len(spec) > 2 else Candidate(launcher)


def candidates(device_type: str = "cuda") -> dict:
    """Per tuned op, the Triton paths (default first), then "torch": the composite on cuBLAS (W dequantized into
    the split path's reused buffer), which does not apply with dropout. Under the interpreter nothing is timed.

    Usage: ``triton.candidates()["lora_linear"]["split"].fn(x, packed, absmax, 64, None, s, b)``
    """
    from fastlora.backends.composite import Composite, without_dropout
    from fastlora.kernels import dispatch
    from fastlora.tuning import Candidate

    composite = Composite(dequantize=_dequantize_into_buffer)
    found = {op: {name: _candidate(spec) for name, spec in paths.items()} for op, paths in dispatch.CANDIDATES.items()}
    for op, paths in found.items():
        paths["torch"] = Candidate(getattr(composite, op), without_dropout)
    return found


def unavailable_reason() -> str | None:
    """Why these kernels cannot run here (a CUDA GPU older than Ampere), or None."""
    if interpreting() or not torch.cuda.is_available():
        return None
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return f"needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, found {capability[0]}.{capability[1]}"
    return None


# The grouped (mixture-of-experts) ops of fastlora.moe.ops.
from fastlora.moe.triton import grouped_lora_backward, grouped_lora_forward  # noqa: E402, F401
