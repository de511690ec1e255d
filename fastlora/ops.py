"""The operator schema: one ``torch.library`` custom op per operation, implemented per device by the backends.

Every op takes a trailing ``backend`` name. The CPU and CUDA kernels of each op look that name up in
:func:`fastlora.tuning.implementation` (the backend's module from :mod:`fastlora.backends`, which knows which backends
serve which device, with each op routed per shape to its measured candidate), so callers never branch on the device. Fake implementations give shapes and dtypes to ``torch.compile``, which sees each op as one opaque node.

Shapes (M tokens, K in-features, N out-features, R = total LoRA rank of the active adapters, stacked):

- ``nf4_resolve_absmax(absmax_q u8[B], code2 f32[256], absmax2 f32[B2], blocksize2, offset) -> f32[B]``
- ``nf4_dequantize(packed u8[ceil(N*K/2)], absmax f32[ceil(N*K/bs)], bs, N, K, dtype) -> dtype[N, K]``
- ``lora_down(x[M, K], lora_a[R, K], ranks, seeds i64[A], dropout_p, scales) -> f32[M, R]``:
  ``S[:, a] = s_a * drop_a(x) @ A_a^T`` for each adapter a (its slice of R) and its LoRA scale s_a
- ``lora_linear(x[M, K], weight, absmax?, bs, bias?[N], lora_s f32[M, R], lora_b[N, R]) -> x.dtype[M, N]``:
  ``y = x @ W^T + bias + S @ B^T``; ``weight`` is dense [N, K] (x's dtype) or, when ``absmax`` is given,
  NF4-packed u8 (N is ``lora_b``'s rows). The LoRA scales are already in S, so B is used as it is.
- ``lora_linear_scaled(x, weight, absmax?, bs, bias?, lora_s, lora_b, col_scale f32[N]) -> x.dtype[M, N]``:
  ``y = col_scale ⊙ (x @ W^T + S @ B^T) + bias``, the scale applied per output column in the epilogue (DoRA's
  ``m / ‖W + s·B·A‖`` per output row of W); the same kernels as ``lora_linear``
- ``lora_up_grad(grad_out[M, N], lora_b[N, R], lora_s f32[M, R], ranks, scales) -> (f32[M, R], f32[N, R])``:
  ``(dS, dB)`` with ``dS[:, a] = s_a * dy @ B_a`` (the gradient of the unscaled ``drop_a(x) @ A_a^T``) and
  ``dB = dy^T @ S``, B's final gradient
- ``lora_down_grad(grad_s f32[M, R], x[M, K], ranks, seeds, dropout_p) -> f32[R, K]``: ``dA_a = dS_a^T @ drop_a(x)``
- ``lora_linear_grad_input(grad_out[M, N], weight, absmax?, bs, grad_s f32[M, R], lora_a[R, K], ranks, seeds,
  dropout_p) -> grad_out.dtype[M, K]``: ``dx = dy @ W + sum_a (dS_a @ A_a) * keep_a / (1 - p_a)``

Dropout masks follow :mod:`fastlora.formats.dropout`; ``seeds`` holds one int64 seed per adapter on x's device.

The module-level functions are what callers use. Under ``torch.compile`` they emit the registered op
(``torch.ops.fastlora.*``); in eager mode they call the backend's implementation directly, skipping ~30 µs of
dispatcher overhead per op, which at decode-sized inputs is more than the kernels take. A caller running several
ops (the autograd function) asks :func:`implementation` once and calls its functions without the backend name.

Usage::

    s = ops.lora_down(x, a, [16], seeds, [0.0], [2.0], "torch")
    impl = ops.implementation("torch", "cpu"); s = impl.lora_down(x, a, [16], seeds, [0.0], [2.0])
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from fastlora import backends, tuning

_LIB = "fastlora"


def _define(name: str):
    """Register ``fn`` as ``fastlora::name`` with a CPU and a CUDA kernel that route to the named backend, and
    return the caller-facing function (the registered op when compiling, a direct call otherwise)."""

    def wrap(fn):
        op = torch.library.custom_op(f"{_LIB}::{name}", mutates_args=())(fn)
        for device_type in ("cpu", "cuda"):
            op.register_kernel(device_type)(_routed(name, device_type))

        def call(*args):
            return getattr(implementation(args[-1], args[0].device.type), name)(*args[:-1])

        call.__name__, call.__doc__, call.op = name, fn.__doc__, op
        _NAMES.append(name)
        return call

    return wrap


_NAMES: list[str] = []  # every op defined below, in order


def implementation(backend: str, device_type: str):
    """The ops for ``backend`` on ``device_type`` as functions without the trailing backend argument: the backend's
    own module in eager mode, the registered ops with the backend bound while ``torch.compile`` traces.

    Usage: ``ops.implementation("cpp", "cpu").lora_down(x, a, [16], seeds, [0.0], [2.0])``
    """
    if torch.compiler.is_compiling():
        return _REGISTERED[backend]
    return tuning.implementation(backend, device_type)


def _bound(op, backend: str, *args):
    return op(*args, backend)


def _routed(name: str, device_type: str):
    # custom_op passes arguments positionally; the backend name is always last.
    def kernel(*args):
        return getattr(tuning.implementation(args[-1], device_type), name)(*args[:-1])

    return kernel


@_define("nf4_resolve_absmax")
def nf4_resolve_absmax(
    absmax_q: Tensor, code2: Tensor, absmax2: Tensor, blocksize2: int, offset: float, backend: str
) -> Tensor:
    raise AssertionError("dispatched per device")


@_define("nf4_dequantize")
def nf4_dequantize(
    packed: Tensor, absmax: Tensor, blocksize: int, n: int, k: int, dtype: torch.dtype, backend: str
) -> Tensor:
    raise AssertionError("dispatched per device")


@_define("lora_down")
def lora_down(
    x: Tensor, lora_a: Tensor, ranks: list[int], seeds: Tensor, dropout_p: list[float], scales: list[float], backend: str
) -> Tensor:
    raise AssertionError("dispatched per device")


@_define("lora_linear")
def lora_linear(
    x: Tensor,
    weight: Tensor,
    absmax: Optional[Tensor],
    blocksize: int,
    bias: Optional[Tensor],
    lora_s: Tensor,
    lora_b: Tensor,
    backend: str,
) -> Tensor:
    raise AssertionError("dispatched per device")


@_define("lora_linear_scaled")
def lora_linear_scaled(
    x: Tensor,
    weight: Tensor,
    absmax: Optional[Tensor],
    blocksize: int,
    bias: Optional[Tensor],
    lora_s: Tensor,
    lora_b: Tensor,
    col_scale: Tensor,
    backend: str,
) -> Tensor:
    raise AssertionError("dispatched per device")


@_define("lora_up_grad")
def lora_up_grad(
    grad_out: Tensor, lora_b: Tensor, lora_s: Tensor, ranks: list[int], scales: list[float], backend: str
) -> tuple[Tensor, Tensor]:
    raise AssertionError("dispatched per device")


@_define("lora_down_grad")
def lora_down_grad(
    grad_s: Tensor, x: Tensor, ranks: list[int], seeds: Tensor, dropout_p: list[float], backend: str
) -> Tensor:
    raise AssertionError("dispatched per device")


@_define("lora_linear_grad_input")
def lora_linear_grad_input(
    grad_out: Tensor,
    weight: Tensor,
    absmax: Optional[Tensor],
    blocksize: int,
    grad_s: Tensor,
    lora_a: Tensor,
    ranks: list[int],
    seeds: Tensor,
    dropout_p: list[float],
    backend: str,
) -> Tensor:
    raise AssertionError("dispatched per device")


# ---- fake (meta) implementations: shapes and dtypes only, for torch.compile / export -------------------------


@nf4_resolve_absmax.op.register_fake
def _(absmax_q, code2, absmax2, blocksize2, offset, backend):
    return absmax_q.new_empty(absmax_q.shape, dtype=torch.float32)


@nf4_dequantize.op.register_fake
def _(packed, absmax, blocksize, n, k, dtype, backend):
    return packed.new_empty((n, k), dtype=dtype)


@lora_down.op.register_fake
def _(x, lora_a, ranks, seeds, dropout_p, scales, backend):
    return x.new_empty((x.shape[0], lora_a.shape[0]), dtype=torch.float32)


@lora_linear.op.register_fake
def _(x, weight, absmax, blocksize, bias, lora_s, lora_b, backend):
    return x.new_empty((x.shape[0], lora_b.shape[0]))


@lora_linear_scaled.op.register_fake
def _(x, weight, absmax, blocksize, bias, lora_s, lora_b, col_scale, backend):
    return x.new_empty((x.shape[0], lora_b.shape[0]))


@lora_up_grad.op.register_fake
def _(grad_out, lora_b, lora_s, ranks, scales, backend):
    m, n, r = grad_out.shape[0], grad_out.shape[1], lora_b.shape[1]
    return grad_out.new_empty((m, r), dtype=torch.float32), grad_out.new_empty((n, r), dtype=torch.float32)


@lora_down_grad.op.register_fake
def _(grad_s, x, ranks, seeds, dropout_p, backend):
    return x.new_empty((grad_s.shape[1], x.shape[1]), dtype=torch.float32)


@lora_linear_grad_input.op.register_fake
def _(grad_out, weight, absmax, blocksize, grad_s, lora_a, ranks, seeds, dropout_p, backend):
    return grad_out.new_empty((grad_out.shape[0], lora_a.shape[1]))


# Per backend, the registered ops with that backend bound: built once here, so traced code only looks them up.
_REGISTERED = {
    backend: SimpleNamespace(**{name: functools.partial(_bound, globals()[name].op, backend) for name in _NAMES})
    for backend in backends.NAMES
}
