"""The ``triton`` backend: the ops of :mod:`fastlora.ops` on the Triton kernels of :mod:`fastlora.kernels`.

Serves CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1`` (tests). The kernels' launchers already have
the signatures of :mod:`fastlora.backends.reference`, so this module re-exports them; the linear ops pick the
fused kernel or the split path per shape (:func:`fastlora.kernels.dispatch.choice`).
"""

from __future__ import annotations

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

#: tl.dot on bf16 and the async copies the configs pipeline with need Ampere or newer.
MIN_CAPABILITY = (8, 0)


def unavailable_reason() -> str | None:
    """Why these kernels cannot run here (a CUDA GPU older than Ampere), or None."""
    if interpreting() or not torch.cuda.is_available():
        return None
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return f"needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, found {capability[0]}.{capability[1]}"
    return None
