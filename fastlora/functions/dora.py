"""DoRA (PEFT ``use_dora=True``) on the fused ops, for one active DoRA adapter over any base kind.

PEFT's DoRA output, with g = m / ‖W + s·B·A‖ per output row (the norm detached from the graph, m trainable)::

    y = g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b                                   (no dropout, or eval)
    y = x·Wᵀ + b + (g − 1) ⊙ (x_d·Wᵀ) + g ⊙ s·x_d·Aᵀ·Bᵀ,  x_d = drop(x)  (dropout while training)

The scale g is applied in the fused op's epilogue (``lora_linear_scaled``; with a bias in fp32, after the
unscaled op, so that the bias is added as PEFT adds it: ``_scaled_linear``). The row norms never materialize
B·A [N, K] nor a dequantized W per call: ‖W_n + s·B_n·A‖² = ‖W_n‖² + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ, where
‖W_n‖² is computed once per frozen weight and cached (keyed on its identity and version, like the NF4 absmax),
and A·Wᵀ is one pass over W (the fused op with x = A, M = r, no LoRA term), for every base kind.

Usage::

    adapter = Adapter(a, b, 2.0, 0.0, dora=DoRA(magnitude, None, ""))
    y = dora_linear(x2d, base, adapter, seeds, "cpp")
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastlora import ops
from fastlora.formats.dropout import apply_dropout
from fastlora.functions.nf4_weight import resolve_absmax
from fastlora.tensor_cache import TensorCache, lasting


class DoRA(NamedTuple):
    """The DoRA part of an adapter: the magnitude vector m [N], and PEFT's inference cache of the weight norm
    (its ``DoraLinearLayer._dora_cache``, given only while PEFT would cache: eval mode, ENABLE_DORA_CACHING)."""

    magnitude: Tensor
    norm_cache: Optional[dict]
    cache_key: str


def weight_norm(base, adapter, backend: str) -> Tensor:
    """fp32 [N]: ‖W_n + s·B_n·A‖ per output row, without B·A [N, K] or a dequantized W per call.

    Usage: ``norm = weight_norm(base, adapter, "torch")``
    """
    cache = adapter.dora.norm_cache
    if cache is not None:
        cached = cache.get(adapter.dora.cache_key)
        if cached is not None:
            return cached.float()
    if cache is None:
        return _weight_norm(base, adapter, backend)
    # Kept in PEFT's cache for later calls, which may run with autograd on: never an inference tensor.
    norm = cache[adapter.dora.cache_key] = lasting(lambda: _weight_norm(base, adapter, backend))
    return norm


def _weight_norm(base, adapter, backend: str) -> Tensor:
    with torch.no_grad():
        a, b, s = adapter.lora_a.float(), adapter.lora_b.float(), adapter.scale
        n, r = b.shape
        # Dense bases take x in W's dtype; quantized ones dequantize into x's dtype, so A stays fp32 there.
        dtype = base.weight.dtype if base.absmax is None else torch.float32
        impl = ops.implementation(backend, a.device.type)
        absmax = resolve_absmax(base.absmax, base.nested, backend)
        a_wt = impl.lora_linear(a.to(dtype), base.weight, absmax, base.blocksize, None, a.new_zeros(r, 0),
                                b.new_zeros(n, 0)).float()  # fmt: skip
        cross = (b * a_wt.T).sum(1)
        quadratic = ((b @ (a @ a.T)) * b).sum(1)
        return (squared_row_norms(base, a.shape[1]) + 2.0 * s * cross + s * s * quadratic).clamp_min(0.0).sqrt()


def squared_row_norms(base, in_features: int) -> Tensor:
    """fp32 [N]: ‖W_n‖² of the frozen base weight [N, in_features], computed once per weight and cached.

    Usage: ``w2 = squared_row_norms(BaseWeight(w, None, w.shape[0]), w.shape[1])``
    """
    weight = base.weight
    if torch.compiler.is_compiling():
        return _squared_row_norms(base, in_features)
    # A view made per call (GPT-2's Conv1D weight transposed) is keyed on the tensor it views.
    owner = weight if weight._base is None else weight._base
    absmax = None if base.absmax is None else base.absmax.data_ptr()
    key = (weight._version, weight.data_ptr(), weight.stride(), absmax)
    return _CACHE.get(owner, key, lambda: _squared_row_norms(base, in_features))


# ‖W_n‖² per base weight tensor (or the tensor it views), keyed weakly on it (a freed weight frees its entry); the
# version counter and data pointers detect a weight rewritten in place or requantized (a merge). A copy made per
# call (autocast's cast of an fp32 W) misses: ‖W‖² is then one extra read of that copy per call.
_CACHE: TensorCache[Tensor] = TensorCache()


def _squared_row_norms(base, in_features: int) -> Tensor:
    from fastlora.backends.reference import CHUNK_ELEMENTS, int8_dequantize, nf4_dequantize_flat

    with torch.no_grad():
        if base.absmax is None:
            return torch.linalg.vector_norm(base.weight, dim=1, dtype=torch.float32).square()
        # Once per weight: the reference dequantization of the quantized base in fp32, a few million elements of
        # rows at a time (never a whole fp32 W: 0.9 GB for one 8192 x 28672 layer).
        n, k = base.out_features, in_features
        absmax = resolve_absmax(base.absmax, base.nested, "torch")  # fp32, one per block: 1/16 of the codes' bytes
        norms = torch.empty(n, dtype=torch.float32, device=base.weight.device)
        step = max(1, CHUNK_ELEMENTS // max(k, 1))
        for n0 in range(0, n, step):
            n1 = min(n0 + step, n)
            if base.weight.dtype == torch.int8:
                rows = int8_dequantize(base.weight[n0:n1], absmax[n0:n1], torch.float32)
            else:
                packed = base.weight.view(torch.uint8).reshape(-1)
                rows = nf4_dequantize_flat(packed, absmax, base.blocksize, n0 * k, n1 * k).view(n1 - n0, k)
            norms[n0:n1] = rows.square().sum(1)
        return norms


class _Config(NamedTuple):
    blocksize: int
    rank: int
    scale: float
    dropout_p: float
    backend: str


class DoRALinearFunction(torch.autograd.Function):
    """PEFT's DoRA linear (module docstring) on 2-D x in the compute dtype. Saves x, the thin S, the seeds, g and
    the scaled output g ⊙ (x_d·Wᵀ + S·Bᵀ) + b (for m's gradient; without dropout it is y itself); never B·A, a
    dequantized W or a dropout mask. m's gradient divides that output by m: an entry of m exactly 0 gets 0."""

    @staticmethod
    def forward(ctx, x, weight, absmax, bias, seeds, config, lora_a, lora_b, magnitude, norm):
        a32, b32 = lora_a.float(), lora_b.float()
        scale = magnitude.float() / norm
        y, lora_s, scaled = _forward(x, weight, absmax, bias, seeds, config, a32, b32, scale)
        ctx.save_for_backward(x, weight, absmax, bias, seeds, a32, b32, lora_s, scale, norm, scaled)
        ctx.config = config
        ctx.dtypes = (None if bias is None else bias.dtype, lora_a.dtype, lora_b.dtype, magnitude.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, absmax, bias, seeds, a32, b32, lora_s, scale, norm, scaled = ctx.saved_tensors
        blocksize, rank, lora_scale, p, backend = ctx.config
        bias_dtype, a_dtype, b_dtype, m_dtype = ctx.dtypes
        impl = ops.implementation(backend, x.device.type)
        dy = grad_out.contiguous()
        dy32 = dy.float()
        # Through g: the LoRA term and (without dropout) the whole base term see dy ⊙ g.
        dy_scaled = (dy32 * scale).to(dy.dtype)
        grad_s, grad_b = impl.lora_up_grad(dy_scaled, b32, lora_s, (rank,), (lora_scale,))
        grad_a = impl.lora_down_grad(grad_s, x, (rank,), seeds, (p,))
        grad_x = None
        if ctx.needs_input_grad[0]:
            if p == 0.0:
                grad_x = impl.lora_linear_grad_input(
                    dy_scaled, weight, absmax, blocksize, grad_s, a32, (rank,), seeds, (p,)
                )
            else:
                # dx = dy·W + keep/(1-p) ⊙ ((dy ⊙ (g-1))·W + dS·A): the (g-1) base term came from the dropped x.
                plain = impl.lora_linear_grad_input(
                    dy, weight, absmax, blocksize, grad_s[:, :0], a32[:0], (), seeds[:0], ()
                )
                dy_minus = (dy32 * (scale - 1.0)).to(dy.dtype)
                dropped = impl.lora_linear_grad_input(
                    dy_minus, weight, absmax, blocksize, grad_s, a32, (rank,), seeds, (0.0,)
                )
                grad_x = plain + apply_dropout(dropped, seeds[0], p)
        # m's gradient: Σ_rows dy ⊙ (x_d·Wᵀ + S·Bᵀ) / ‖·‖, that sum recovered from the saved scaled output.
        unscaled = scaled.float() if bias is None else scaled.float() - bias.float()
        magnitude = scale * norm
        # An entry of m exactly 0 hides its row's output (scale 0): its gradient cannot be recovered and is set to 0
        # (PEFT's is Σ dy ⊙ (x_d·Wᵀ + S·Bᵀ) / ‖·‖ there); never a 0/0 NaN. verify=True reports such a layer.
        grad_m = torch.where(magnitude != 0, (dy32 * unscaled).sum(0) / magnitude.where(magnitude != 0, 1.0), 0.0)
        grad_bias = None
        if bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = dy32.sum(0).to(bias_dtype)
        grads = (grad_a.to(a_dtype), grad_b.to(b_dtype), grad_m.to(m_dtype))
        return (grad_x, None, None, grad_bias, None, None, *grads, None)


def _scaled_linear(impl, x, weight, absmax, blocksize, bias, lora_s, b32, scale):
    """g ⊙ (x·Wᵀ + S·Bᵀ) + b. With a bias and fp32 x it is computed as g ⊙ (x·Wᵀ + b + S·Bᵀ) + (1 − g) ⊙ b: the
    bias then enters the base product where PEFT's ``nn.Linear`` adds it (addmm), so at DoRA's initialisation
    (g = 1, B = 0) the output is PEFT's bit for bit, as PEFT's own tests demand; the epilogue is one pass over y
    either way. In half precision the op keeps its single rounding (PEFT's products differ from it there anyway)."""
    if bias is None or x.dtype != torch.float32:
        return impl.lora_linear_scaled(x, weight, absmax, blocksize, bias, lora_s, b32, scale)
    y = impl.lora_linear(x, weight, absmax, blocksize, bias, lora_s, b32)
    return torch.addcmul((1.0 - scale) * bias.float(), y, scale, out=y)  # in place: no second [M, N]


def _forward(x, weight, absmax, bias, seeds, config: _Config, a32: Tensor, b32: Tensor, scale: Tensor):
    """(y, S, the g-scaled part g ⊙ (x_d·Wᵀ + S·Bᵀ) + b)."""
    impl = ops.implementation(config.backend, x.device.type)
    blocksize, rank, lora_scale, p = config.blocksize, config.rank, config.scale, config.dropout_p
    lora_s = impl.lora_down(x, a32, (rank,), seeds, (p,), (lora_scale,))
    if p == 0.0:
        y = _scaled_linear(impl, x, weight, absmax, blocksize, bias, lora_s, b32, scale)
        return y, lora_s, y
    dropped = apply_dropout(x, seeds[0], p)  # the mask lora_down drew: one definition for every backend
    scaled = _scaled_linear(impl, dropped, weight, absmax, blocksize, bias, lora_s, b32, scale)
    rest = impl.lora_linear(x - dropped, weight, absmax, blocksize, None, lora_s[:, :0], b32[:, :0])
    return scaled + rest, lora_s, scaled


def dora_linear(x: Tensor, base, adapter, seeds: Tensor, backend: str) -> Tensor:
    """DoRA's output for 2-D contiguous x (compute dtype) over ``base`` (a :class:`fastlora.functions.lora.BaseWeight`)
    with one DoRA ``adapter`` (a :class:`fastlora.functions.lora.Adapter` whose ``dora`` is set).

    Usage: ``y = dora_linear(x2d, base, adapter, seeds, "torch")``
    """
    norm = weight_norm(base, adapter, backend)
    config = _Config(base.blocksize, adapter.lora_a.shape[0], adapter.scale, adapter.dropout_p, backend)
    magnitude, bias = adapter.dora.magnitude, base.bias
    # NF4 with double quantization: resolved for this call, and kept until backward (DoRA's graph saves it).
    absmax = resolve_absmax(base.absmax, base.nested, backend)
    trainable = (x, adapter.lora_a, adapter.lora_b, magnitude, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in trainable):
        return DoRALinearFunction.apply(
            x, base.weight, absmax, bias, seeds, config, adapter.lora_a, adapter.lora_b, magnitude, norm
        )
    a32, b32 = adapter.lora_a.float(), adapter.lora_b.float()
    return _forward(x, base.weight, absmax, bias, seeds, config, a32, b32, magnitude.float() / norm)[0]
