"""Fused kernel or split path? Chosen per (op, base, M bucket, N, K, dtype, GPU) from a measured table.

"fused": one Triton kernel (NF4 unpacked in registers, LoRA epilogue in the same tile).
"split": dequantize NF4 into a reused buffer, cuBLAS GEMM, then a Triton epilogue adding bias + LoRA terms.

``dispatch_table.json`` ships next to this file. Shapes it lacks (and GPUs it lacks) fall back to
:data:`DEFAULT_SPLIT_FROM_M`, a guess from the roofline in DESIGN.md that **no GPU has measured yet**; the
answer of :func:`choice` says which source it used. :func:`measure` times both paths on the current GPU with
``triton.testing.do_bench`` and writes them into the table.

Usage::

    choice("forward", "nf4", m=512, n=4096, k=4096, dtype=torch.bfloat16)  # Choice(path='fused', source=...)
    measure([(4096, 4096), (14336, 4096)])   # on a GPU: fills the table for this device
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch

from fastlora.kernels import common

TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
#: Forces a path for every call ("fused" or "split"), for benchmarks and tests.
ENV_VAR = "FASTLORA_TRITON_PATH"
PATHS = ("fused", "split")
OPS = ("forward", "grad_input")
#: Unmeasured guess: the split path for M buckets (M rounded up to a power of two) from this many tokens on, per
#: base. NF4 fused saves the dequant round trip and the epilogue's pass over y (roofline gain >= 1.2x at M=4096);
#: a dense fused Triton GEMM must stay within ~10% of cuBLAS to win at large M, which is unproven.
DEFAULT_SPLIT_FROM_M = {"nf4": 2048, "dense": 512}
MEASURE_M = (1, 16, 64, 256, 1024, 4096, 16384)


class Choice(NamedTuple):
    """The path a call takes and where that decision came from ("measured on <gpu>", "default (unmeasured)")."""

    path: str
    source: str


def table_key(op: str, base: str, dtype: torch.dtype, n: int, k: int) -> str:
    return f"{op}|{base}|{str(dtype).removeprefix('torch.')}|{n}x{k}"


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {"gpus": {}}


@functools.lru_cache(maxsize=8)
def _gpu_name(index: int | None) -> str:
    return "interpreter" if common.interpreting() else torch.cuda.get_device_name(index)


def choice(op: str, base: str, m: int, n: int, k: int, dtype: torch.dtype, device_index: int | None = None) -> Choice:
    """Which path ``op`` ("forward" or "grad_input") takes for an M x N x K problem with a ``base`` ("nf4"/"dense") W.

    Usage: ``dispatch.choice("forward", "nf4", 16, 4096, 4096, torch.bfloat16).path  # "fused"``
    """
    forced = os.environ.get(ENV_VAR)
    if forced:
        if forced not in PATHS:
            raise ValueError(f"{ENV_VAR}={forced!r}: choose one of {PATHS}")
        return Choice(forced, f"forced by {ENV_VAR}")
    return _looked_up(op, base, common.m_bucket(m), n, k, dtype, device_index)


@functools.lru_cache(maxsize=4096)
def _looked_up(op: str, base: str, bucket: int, n: int, k: int, dtype: torch.dtype, device_index: int | None) -> Choice:
    # Memoized: this runs before every launch of the linear kernels, and a training run has few distinct shapes.
    gpu = _gpu_name(device_index)
    measured = _table()["gpus"].get(gpu, {}).get(table_key(op, base, dtype, n, k))
    if measured:
        # The measured bucket nearest in log2(M).
        nearest = min(measured, key=lambda b: abs(math.log2(int(b)) - math.log2(bucket)))
        return Choice(measured[nearest]["path"], f"measured on {gpu} at M={nearest}")
    path = "split" if bucket >= DEFAULT_SPLIT_FROM_M[base] else "fused"
    return Choice(path, "default (unmeasured)")


_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def dequant_buffer(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable [n, k] buffer for the split path's dequantized W (one per device and dtype, grown on demand).

    Reuse is safe because kernels on one stream run in order. Under CUDA-graph capture a fresh tensor is
    returned instead, so the graph's memory pool never aliases the eager buffer.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.empty((n, k), dtype=dtype, device=device)
    key = (torch.device(device), dtype)
    buffer = _buffers.get(key)
    if buffer is None or buffer.numel() < n * k:
        buffer = _buffers[key] = torch.empty(n * k, dtype=dtype, device=device)
    return buffer[: n * k].view(n, k)


def _problem(op: str, base: str, m: int, n: int, k: int, r: int, dtype: torch.dtype, blocksize: int = 64):
    """Random inputs for one timing: a callable running ``op`` with the path given to it."""
    from fastlora.kernels.lora_linear import lora_linear
    from fastlora.kernels.lora_linear_grad_input import lora_linear_grad_input

    dev = torch.device("cuda")
    if base == "nf4":
        weight = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device=dev)
        absmax = torch.rand(n * k // blocksize, device=dev)
    else:
        weight, absmax = torch.randn(n, k, dtype=dtype, device=dev) / math.sqrt(k), None
    lora_s, lora_b = torch.randn(m, r, device=dev), torch.randn(n, r, device=dev)
    if op == "forward":
        x = torch.randn(m, k, dtype=dtype, device=dev)
        return lambda path: lora_linear(x, weight, absmax, blocksize, None, lora_s, lora_b, path=path)
    dy, lora_a = torch.randn(m, n, dtype=dtype, device=dev), torch.randn(r, k, device=dev)
    seeds = torch.zeros(1, dtype=torch.int64, device=dev)
    return lambda path: lora_linear_grad_input(dy, weight, absmax, blocksize, lora_s, lora_a, [r], seeds, [0.1], path=path)


def measure(
    shapes: list[tuple[int, int]],
    dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,),
    m_values: tuple[int, ...] = MEASURE_M,
    bases: tuple[str, ...] = ("nf4", "dense"),
    rank: int = 16,
    write: bool = True,
) -> dict:
    """Time fused vs split (median of ``triton.testing.do_bench``) for every (op, base, dtype, (N, K), M) on this GPU.

    Returns this GPU's entries; with ``write`` merges them into ``dispatch_table.json``. The split path wins a
    tie only when it is faster by more than 1%, so noise does not flip well-performing fused choices.

    Usage: ``python -c "from fastlora.kernels import dispatch; dispatch.measure([(4096, 4096), (14336, 4096)])"``
    """
    import triton.testing

    if not torch.cuda.is_available():
        raise RuntimeError("dispatch.measure needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    entries: dict[str, dict] = {}
    # Shapes outermost, written after each: a run cut short by a time limit keeps what it measured.
    for n, k in shapes:
        for op in OPS:
            for base in bases:
                for dtype in dtypes:
                    row = entries.setdefault(table_key(op, base, dtype, n, k), {})
                    for m in m_values:
                        run = _problem(op, base, m, n, k, rank, dtype)
                        ms = {p: triton.testing.do_bench(lambda p=p: run(p), return_mode="median") for p in PATHS}
                        path = "split" if ms["split"] < 0.99 * ms["fused"] else "fused"
                        row[str(common.m_bucket(m))] = {"path": path, "fused_us": ms["fused"] * 1e3, "split_us": ms["split"] * 1e3}
        if write:
            table = json.loads(TABLE_PATH.read_text()) if TABLE_PATH.exists() else {"gpus": {}}
            table["gpus"].setdefault(gpu, {}).update(entries)
            TABLE_PATH.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
            _table.cache_clear()
            _looked_up.cache_clear()
    return entries
