"""Plain-PyTorch implementations of every op: the oracle the kernels are tested against, and the fallback.

Computes in fp32 (inputs upcast), which is what the fused kernels accumulate in; outputs are rounded once.
Signatures follow :mod:`fastlora.ops` (without the trailing backend name). The base weight's kind is told by the
arguments: ``absmax`` None is a dense W [N, K] (any float dtype, possibly a strided view such as a GPT-2 ``Conv1D``
weight transposed); an int8 W [N, K] with ``absmax`` is bitsandbytes 8-bit with ``absmax`` its per-row SCB;
otherwise NF4 codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlora.formats.dropout import apply_dropout
from fastlora.formats.nf4 import nf4_table


def nf4_resolve_absmax(absmax_q: Tensor, code2: Tensor, absmax2: Tensor, blocksize2: int, offset: float) -> Tensor:
    # Same operation order as bitsandbytes: code lookup times block scale, then + offset, all in fp32. The block
    # scale is broadcast over a [blocks, blocksize2] view (no int64 index per element).
    values = torch.index_select(code2.float(), 0, absmax_q.reshape(-1).int())
    scales, whole = absmax2.float(), values.numel() // blocksize2 * blocksize2
    values[:whole].view(-1, blocksize2).mul_(scales[: whole // blocksize2, None])
    values[whole:].mul_(scales[whole // blocksize2 :][:1])  # a last, partial block
    return values.add_(offset).view(absmax_q.shape)


#: Flat elements dequantized at a time: bounds the int64 codes and block indices (8 bytes per element each) the
#: reference path builds, whatever the size of W.
CHUNK_ELEMENTS = 1 << 22


def nf4_dequantize_flat(packed: Tensor, absmax: Tensor, blocksize: int, start: int, end: int) -> Tensor:
    """fp32 values of the flat elements ``start <= i < end`` of an NF4 weight (row-major W, two codes per byte).

    Usage: ``rows = nf4_dequantize_flat(packed, absmax, 64, n0 * k, n1 * k).view(-1, k)``
    """
    first = start - start % 2
    byte = packed[first // 2 : (end + 1) // 2]
    codes = torch.stack((byte >> 4, byte & 0xF), dim=1).reshape(-1)[start - first : end - first].long()
    block = torch.arange(start, end, device=packed.device) // blocksize
    return nf4_table(packed.device)[codes] * absmax.float()[block]


def nf4_dequantize(packed: Tensor, absmax: Tensor, blocksize: int, n: int, k: int, dtype: torch.dtype) -> Tensor:
    out = torch.empty(n * k, dtype=dtype, device=packed.device)
    for start in range(0, n * k, CHUNK_ELEMENTS):
        end = min(start + CHUNK_ELEMENTS, n * k)
        out[start:end] = nf4_dequantize_flat(packed, absmax, blocksize, start, end)  # one rounding to dtype
    return out.view(n, k)


#: bitsandbytes' fp32 reciprocal of 127 (``int8_vectorwise_dequant``): multiplying by it is not dividing by 127.
INT8_SCALE = 7.874015718698502e-3


def int8_dequantize(weight: Tensor, scb: Tensor, dtype: torch.dtype) -> Tensor:
    """W[N, K] in ``dtype`` from bitsandbytes 8-bit codes int8 [N, K] and their per-row fp32 scales SCB [N].

    Bit-identical to ``bitsandbytes.functional.int8_vectorwise_dequant`` (``int8 * SCB * (1/127)`` in fp32,
    left to right), then one cast. Usage: ``w = int8_dequantize(layer.weight, layer.state.SCB, torch.bfloat16)``
    """
    return (weight.float() * scb.float()[:, None] * INT8_SCALE).to(dtype)


def _dense_weight(weight: Tensor, absmax: Tensor | None, blocksize: int, n: int, k: int) -> Tensor:
    if absmax is None:
        return weight.float()
    if weight.dtype == torch.int8:
        return int8_dequantize(weight, absmax, torch.float32)
    return nf4_dequantize(weight.view(torch.uint8).reshape(-1), absmax, blocksize, n, k, torch.float32)


def _adapter_slices(ranks: list[int]):
    start = 0
    for index, r in enumerate(ranks):
        yield index, slice(start, start + r)
        start += r


def lora_down(
    x: Tensor, lora_a: Tensor, ranks: list[int], seeds: Tensor, dropout_p: list[float], scales: list[float]
) -> Tensor:
    x32, a32 = x.float(), lora_a.float()
    parts = [(apply_dropout(x32, seeds[i], dropout_p[i]) @ a32[cols].T) * scales[i] for i, cols in _adapter_slices(ranks)]
    return torch.cat(parts, dim=1) if parts else x32.new_zeros((x.shape[0], 0))


def lora_linear(
    x: Tensor,
    weight: Tensor,
    absmax: Tensor | None,
    blocksize: int,
    bias: Tensor | None,
    lora_s: Tensor,
    lora_b: Tensor,
    col_scale: Tensor | None = None,
) -> Tensor:
    n, k = lora_b.shape[0], x.shape[1]
    x32, w32 = x.float(), _dense_weight(weight, absmax, blocksize, n, k)
    if col_scale is None:
        y = x32 @ w32.T if bias is None else torch.addmm(bias.float(), x32, w32.T)
        return y.addmm_(lora_s.float(), lora_b.float().T).to(x.dtype)
    y = torch.addmm(x32 @ w32.T, lora_s.float(), lora_b.float().T) * col_scale.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


#: ``lora_linear`` with its per-column scale: one implementation serves both ops.
lora_linear_scaled = lora_linear


def lora_up_grad(
    grad_out: Tensor, lora_b: Tensor, lora_s: Tensor, ranks: list[int], scales: list[float]
) -> tuple[Tensor, Tensor]:
    dy = grad_out.float()
    grad_s = dy @ lora_b.float()
    for i, cols in _adapter_slices(ranks):
        grad_s[:, cols] *= scales[i]
    return grad_s, dy.T @ lora_s.float()


def lora_down_grad(grad_s: Tensor, x: Tensor, ranks: list[int], seeds: Tensor, dropout_p: list[float]) -> Tensor:
    x32 = x.float()
    parts = [grad_s[:, cols].float().T @ apply_dropout(x32, seeds[i], dropout_p[i]) for i, cols in _adapter_slices(ranks)]
    return torch.cat(parts, dim=0) if parts else x32.new_zeros((0, x.shape[1]))


def lora_linear_grad_input(
    grad_out: Tensor,
    weight: Tensor,
    absmax: Tensor | None,
    blocksize: int,
    grad_s: Tensor,
    lora_a: Tensor,
    ranks: list[int],
    seeds: Tensor,
    dropout_p: list[float],
) -> Tensor:
    n, k = grad_out.shape[1], lora_a.shape[1]
    dx = grad_out.float() @ _dense_weight(weight, absmax, blocksize, n, k)
    for i, cols in _adapter_slices(ranks):
        lora_dx = grad_s[:, cols].float() @ lora_a[cols].float()
        dx = dx + apply_dropout(lora_dx, seeds[i], dropout_p[i])
    return dx.to(grad_out.dtype)
