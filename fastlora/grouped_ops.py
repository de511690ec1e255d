"""The grouped (mixture-of-experts) LoRA ops: one ``torch.library`` schema each, implemented per backend.

Same conventions as :mod:`fastlora.ops`: a trailing ``backend`` name routes each call to the backend's grouped
module (``fastlora.backends.grouped_<reference|cpp|triton>``, no per-shape choice); eager calls skip the
dispatcher, ``torch.compile`` sees one opaque node per op (fake implementations below give it shapes and dtypes).

Shapes (S token-expert rows sorted by expert, E experts, K in-features, N out-features, R total LoRA rank):

- ``grouped_lora_forward(x[S, K], offsets i32/i64[E], weight[E, N, K], lora_a[E, R, K], lora_b[E, N, R], ranks,
  scales) -> (y x.dtype[S, N], lora_s f32[S, R])``: per expert e, rows ``offsets[e-1]:offsets[e]``,
  ``S = x·A_eᵀ`` (adapter slices scaled) and ``y = x·W_eᵀ + S·B_eᵀ``. Any strides for weight, A and B (gpt-oss's
  [E, K, N] storage is passed transposed; PEFT's B is a permuted view).
- ``grouped_lora_backward(grad_out[S, N], x, lora_s, offsets, weight, lora_a, lora_b, ranks, scales,
  needs_input_grad) -> (dx grad_out.dtype[S, K] or [0, K], dA f32[E, R, K], dB f32[E, N, R])``.

R may be 0 (a projection without LoRA: the plain grouped GEMM). W gets no gradient; no [E, N, K] delta is built.

Usage::

    y, s = moe_ops.grouped_lora_forward(x, offsets, w, a, b, [16], [2.0], "cpp")
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from fastlora import backends

logger = logging.getLogger("fastlora")

_NAMES = ("grouped_lora_forward", "grouped_lora_backward")


def _routed(name: str, device_type: str):
    def kernel(*args):
        return getattr(backends.module(args[-1], device_type, grouped=True), name)(*args[:-1])

    return kernel


def _define(fn):
    op = torch.library.custom_op(f"fastlora::{fn.__name__}", mutates_args=())(fn)
    for device_type in ("cpu", "cuda"):
        op.register_kernel(device_type)(_routed(fn.__name__, device_type))
    return op


@_define
def grouped_lora_forward(
    x: Tensor,
    offsets: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: list[int],
    scales: list[float],
    backend: str,
) -> tuple[Tensor, Tensor]:
    raise AssertionError("dispatched per device")


@_define
def grouped_lora_backward(
    grad_out: Tensor,
    x: Tensor,
    lora_s: Tensor,
    offsets: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    ranks: list[int],
    scales: list[float],
    needs_input_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    raise AssertionError("dispatched per device")


@grouped_lora_forward.register_fake
def _(x, offsets, weight, lora_a, lora_b, ranks, scales, backend):
    rows = x.shape[0]
    return x.new_empty((rows, weight.shape[1])), x.new_empty((rows, lora_a.shape[1]), dtype=torch.float32)


@grouped_lora_backward.register_fake
def _(grad_out, x, lora_s, offsets, weight, lora_a, lora_b, ranks, scales, needs_input_grad, backend):
    rows = x.shape[0] if needs_input_grad else 0
    return (
        grad_out.new_empty((rows, x.shape[1])),
        x.new_empty(lora_a.shape, dtype=torch.float32),
        x.new_empty(lora_b.shape, dtype=torch.float32),
    )


def resolve(requested: str, device: torch.device) -> str:
    """The backend for the grouped ops: as :func:`fastlora.backends.resolve` for the dense ops, except that a grouped
    C++ extension that fails to build sends "auto" to the torch reference (logged) and an explicit "cpp" to
    BackendUnavailable.

    Usage: ``backend = grouped_ops.resolve("auto", x.device)``
    """
    chosen = backends.resolve(requested, device)
    if chosen == "cpp":
        from fastlora.backends import grouped_cpp

        reason = grouped_cpp.unavailable_reason()
        if reason is not None:
            if requested != "auto":
                raise backends.BackendUnavailable(reason)
            logger.warning("fastlora: expert LoRA runs on the torch reference: %s", reason)
            return "torch"
    return chosen


def implementation(backend: str, device_type: str):
    """The grouped ops of ``backend`` on ``device_type`` without the trailing backend argument: the backend's own
    functions in eager mode, the registered ops while ``torch.compile`` traces.

    Usage: ``moe_ops.implementation("torch", "cpu").grouped_lora_forward(x, offsets, w, a, b, [16], [2.0])``
    """
    if torch.compiler.is_compiling():
        return _Bound(backend)
    return backends.module(backend, device_type, grouped=True)


class _Bound:
    """The registered ops with ``backend`` bound (what traced code calls)."""

    def __init__(self, backend: str):
        self.backend = backend

    def grouped_lora_forward(self, *args):
        return grouped_lora_forward(*args, self.backend)

    def grouped_lora_backward(self, *args):
        return grouped_lora_backward(*args, self.backend)
