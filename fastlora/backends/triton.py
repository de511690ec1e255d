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
import triton

from fastlora.kernels import resources

# Refused before the kernels load: an unsupported Triton gets the torch backend, with this reason in the report.
if resources.triton_version_problem(triton.__version__) is not None:
    raise ImportError(resources.triton_version_problem(triton.__version__))

from fastlora.kernels import (  # noqa: E402, F401 - the launchers have the ops' signatures: re-exported as they are
    lora_down,
    lora_down_grad,
    lora_linear,
    lora_linear_grad_input,
    lora_up_grad,
    nf4_dequantize,
    nf4_resolve_absmax,
)
from fastlora.kernels.common import interpreting  # noqa: E402

#: ``lora_linear`` with its per-column scale: one launcher serves both ops.
lora_linear_scaled = lora_linear


def _dequantize_into_buffer(packed, absmax, blocksize: int, n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    from fastlora.kernels import common, dispatch

    out = dispatch.dequant_buffer(n, k, dtype, packed.device)
    return nf4_dequantize(common.packed_bytes(packed), absmax, blocksize, n, k, dtype, out=out)


def _candidate(spec: tuple):
    """A :data:`fastlora.kernels.dispatch.CANDIDATES` entry ``(module.function, kwargs[, applies])`` as a Candidate."""
    from fastlora.backends import Candidate
    from fastlora.kernels import dispatch

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
    from fastlora.backends import Candidate
    from fastlora.backends.composite import Composite, without_dropout
    from fastlora.kernels import dispatch

    composite = Composite(dequantize=_dequantize_into_buffer)
    found = {op: {name: _candidate(spec) for name, spec in paths.items()} for op, paths in dispatch.CANDIDATES.items()}
    for op, paths in found.items():
        paths["torch"] = Candidate(getattr(composite, op), without_dropout)
    return found


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why these kernels cannot run on ``device`` (default: on any visible CUDA device), or None. Each launch also
    checks the device of its own tensors (:func:`fastlora.kernels.resources.check_capability`), so a machine that
    mixes GPU generations falls back only on the old ones.

    Usage: ``unavailable_reason(torch.device("cuda", 1))``
    """
    if interpreting() or not torch.cuda.is_available():
        return None
    devices = [device] if device is not None else [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    reasons = []
    for each in devices:
        try:
            resources.check_capability(each)
            return None
        except resources.DoesNotFit as err:
            reasons.append(str(err))
    return "; ".join(reasons)
