"""Pieces every fastlora kernel shares: the NF4 and int8 tile readers, the dropout hash, dot precision, launch helpers.

Nothing here launches a kernel. The ``@triton.jit`` helpers are inlined into the kernels that call them.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from fastlora.formats.dropout import dropout_threshold
from fastlora.formats.nf4 import nf4_table
from fastlora.kernels import resources

#: Smallest tile edge ``tl.dot`` accepts; thin operands (LoRA rank) are padded up to it.
MIN_DOT = 16
#: M is rounded up to a power of two (at least this) to key autotuning and dispatch, so a training run with
#: varying sequence lengths tunes a handful of buckets instead of every M.
MIN_M_BUCKET = 16


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (``TRITON_INTERPRET=1``), i.e. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Host-side integer helpers in plain Python: ``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr
# functions since Triton 3.5, and calling them from host code costs microseconds each (argument unwrapping), a
# few dozen times per layer call.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ``a`` and positive ``b``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n`` <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def m_bucket(m: int) -> int:
    """The autotune/dispatch bucket of ``m`` tokens: the next power of two, at least 16."""
    return max(MIN_M_BUCKET, next_power_of_2(m))


def rank_block(r: int) -> int:
    """Tile width for a LoRA rank ``r``: a power of two, at least ``tl.dot``'s minimum of 16."""
    return max(MIN_DOT, next_power_of_2(r))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands when the model computes in ``dtype``.

    fp32 models follow ``torch.get_float32_matmul_precision()`` so fp32 parity with PEFT holds ("highest" →
    IEEE). Half-precision models only meet fp32 operands in the LoRA branch (A, B and S are fp32); TF32 keeps
    that branch's error (~5e-4 relative) far below the bf16/fp16 rounding of the output.
    """
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def config_pruner(config_sets: dict[str, list], pick, interpreter: triton.Config, fn):
    """An ``early_config_prune`` hook: the interpreter's one small config, or the configs of the set ``pick`` names
    that fit the launch's GPU (:func:`fastlora.kernels.resources.fitting`).

    ``pick(hopper: bool, args: dict) -> str`` chooses among ``config_sets`` from the GPU generation and the launch
    arguments (base kind, dtype). The generation, the capability check and the shared memory are those of the
    device of the launch's tensors, not the current device. With one config left, Triton's autotuner runs it
    without timing, so interpreter runs never benchmark.
    """

    def prune(configs, named_args, **kwargs):
        if interpreting():
            return [interpreter]
        args = {**named_args, **kwargs}
        device = resources.tensor_device(args)
        resources.check_capability(device)
        chosen = config_sets[pick(resources.capability(device)[0] >= 9, args)]
        return resources.fitting(fn, chosen, args, device)

    return prune


def all_configs(config_sets: dict[str, list]) -> list:
    """Every config of every set, for ``triton.autotune`` (the pruner narrows them per launch)."""
    return [cfg for configs in config_sets.values() for cfg in configs]


class TrialHooks:
    """Triton autotuner pre/post hooks for a kernel that accumulates into an argument in some launches.

    Each benchmarked trial of a config runs the kernel on the launch's own tensors. ``reset_to_zero`` arguments
    (split-reduction arrival counters) are zeroed before every trial and before the chosen config's run, else the
    second trial would find counts left by the first and never store its output. ``restore_value`` arguments are
    copied before a trial and written back after it, but only when ``accumulates(args)`` says this launch adds onto
    them (``BASE=0`` reads y or dx back): a launch that only stores them pays for no copy. Triton's own
    ``restore_value`` would copy on every trial of every launch.

    Usage: ``TrialHooks(restore_value=["y_ptr"], accumulates=lambda args: args["BASE"] == 0)``
    """

    def __init__(self, *, reset_to_zero=(), restore_value=(), accumulates=lambda args: True):
        self.reset_to_zero, self.restore_value, self.accumulates = tuple(reset_to_zero), tuple(restore_value), accumulates
        self.saved: dict[str, torch.Tensor] = {}

    def pre_hook(self, args: dict, reset_only: bool = False) -> None:
        for name in self.reset_to_zero:
            args[name].zero_()
        if not reset_only and self.restore_value and self.accumulates(args):
            self.saved = {name: args[name].clone() for name in self.restore_value}

    def post_hook(self, args: dict, exception=None) -> None:
        for name, value in self.saved.items():
            args[name].copy_(value)
        self.saved = {}


def autotuned(config_sets: dict[str, list], pick, interpreter: triton.Config, key: list[str], hooks=None):
    """``triton.autotune`` over every config of ``config_sets``, narrowed per launch by :func:`config_pruner` to
    the configs of the set ``pick`` names that fit the GPU (the interpreter's one config under ``TRITON_INTERPRET=1``).
    A kernel that accumulates into an argument, or counts arrivals, passes its :class:`TrialHooks`.

    Usage: ``@common.autotuned(CONFIGS, config_set, INTERPRETER_CONFIG, key=["N", "K"])`` above ``@triton.jit``
    """

    def decorate(fn):
        return triton.autotune(
            configs=all_configs(config_sets),
            key=key,
            prune_configs_by={"early_config_prune": config_pruner(config_sets, pick, interpreter, fn)},
            pre_hook=hooks.pre_hook if hooks else None,
            post_hook=hooks.post_hook if hooks else None,
        )(fn)

    return decorate


def by_generation(hopper: bool, args: dict) -> str:
    """The config set of an elementwise kernel: the GPU generation's (its tiles do not depend on the dtype)."""
    return "hopper" if hopper else "ampere"


def generation(hopper: bool, fp32: bool) -> str:
    """Config set prefix: fp32 inputs (IEEE ``tl.dot`` is FMA-based, register hungry) get small tiles."""
    return "fp32" if fp32 else ("hopper" if hopper else "ampere")


def gemm_config(bm: int, bn: int, bk: int, warps: int, stages: int, group_m: int = 8) -> triton.Config:
    """An autotune config of the tiled GEMM kernels (BLOCK_M/N/K tiles, GROUP_M swizzle)."""
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m}, num_warps=warps, num_stages=stages
    )


#: Rank tile from which the thin GEMMs (lora_down, lora_down_grad) take their "-wide" config sets: their
#: [BLOCK_K or BLOCK_M, R_BLOCK] fp32 operand, staged per pipeline stage, outgrows the other sets' shared memory.
WIDE_RANK_BLOCK = 256


def config_set_by_x_dtype(hopper: bool, args: dict) -> str:
    """The config set of a thin-GEMM launch: fp32 x gets its own, else the GPU generation's; "-wide" from a rank
    tile of :data:`WIDE_RANK_BLOCK`."""
    name = generation(hopper, args["x_ptr"].dtype == torch.float32)
    return f"{name}-wide" if args["R_BLOCK"] >= WIDE_RANK_BLOCK else name


def config_set_by_base(input_ptr: str, base_nf4: int):
    """A config-set picker for the base-GEMM kernels: fp32 ``input_ptr`` gets its own set, else the GPU
    generation's set for the base kind (``BASE == base_nf4`` is NF4; the split epilogue counts as dense)."""

    def pick(hopper: bool, args: dict) -> str:
        gen = generation(hopper, args[input_ptr].dtype == torch.float32)
        return gen if gen == "fp32" else f"{gen}-{'nf4' if args['BASE'] == base_nf4 else 'dense'}"

    return pick


#: Most tokens the transposed few-token kernels take: the tokens are wgmma's N side there, and their split
#: workspaces hold SPLIT x M x N fp32 partials.
MAX_FEW_TOKENS = 64
#: Key of the base-GEMM kernels' autotuning: the M bucket, the problem, the rank tile and the base kind.
BASE_GEMM_KEY = ["M_BUCKET", "N", "K", "R_BLOCK", "BASE"]


def base_gemm_constexprs(blocksize: int, k: int, dtype: torch.dtype) -> dict:
    """The constexprs every base-GEMM kernel takes besides its own: the NF4 block layout along K and the dot
    precisions for a model computing in ``dtype``.

    Usage: ``common.launch(kernel, grid, key, *args, BASE=base, **common.base_gemm_constexprs(64, k, x.dtype))``
    """
    precision = dot_precision(dtype)
    return dict(
        BLOCKSIZE=blocksize,
        EVEN_K=k % 2 == 0,
        K_ALIGNED=blocksize > 0 and k % blocksize == 0,
        PRECISION=precision,
        LORA_PRECISION=precision,
    )


def packed_bytes(weight: torch.Tensor) -> torch.Tensor:
    """NF4 codes in any ``quant_storage`` dtype and shape as the flat uint8 tensor the kernels index (no copy)."""
    if weight.dtype == torch.uint8 and weight.dim() == 1:  # what fastlora's NF4Weight holds: skip two view ops
        return weight
    return weight.view(torch.uint8).reshape(-1)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a nominal 8 for the CPU interpreter)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def table(device: torch.device) -> torch.Tensor:
    """The 16-entry fp32 NF4 code table on ``device`` (kernels gather from it; it stays in L1)."""
    return nf4_table(device)


#: Where the 16 code values start in :func:`nf4_decode_table` (fp32 elements), after the 256 byte pairs.
CODE_TABLE_OFFSET = tl.constexpr(512)


@functools.lru_cache(maxsize=16)
def nf4_decode_table(device: torch.device) -> torch.Tensor:
    """f32[528] on ``device``, the table :func:`nf4_tile` reads: for each byte b, the NF4 values of its high and
    low nibble (elements 2b, 2b+1), then the 16 code values (from :data:`CODE_TABLE_OFFSET`). 2 KiB: stays in L1.

    Usage: ``table = common.nf4_decode_table(x.device)``
    """
    values, codes = nf4_table(device), torch.arange(256, device=device)
    pairs = torch.stack([values[codes >> 4], values[codes & 0xF]], dim=1)
    return torch.cat([pairs.reshape(-1), values]).contiguous()


@functools.lru_cache(maxsize=256)
def _group_tables(device: torch.device, ranks: tuple[int, ...], dropout_p: tuple[float, ...]):
    # Adapters without dropout need no mask: they merge into one group with one wide dot. Adapters with
    # dropout keep a group each (their own mask). Row: (first rank column, rank, drop threshold, adapter).
    if all(p == 0.0 for p in dropout_p):
        rows, scales = [(0, sum(ranks), 0, 0)], [1.0]
    else:
        starts = [sum(ranks[:i]) for i in range(len(ranks))]
        rows = [(s, r, dropout_threshold(p), i) for i, (s, r, p) in enumerate(zip(starts, ranks, dropout_p))]
        scales = [1.0 / (1.0 - p) for p in dropout_p]
    groups = torch.tensor(rows, dtype=torch.int64, device=device)
    group_scales = torch.tensor(scales, dtype=torch.float32, device=device)
    return groups, group_scales, max(r for _, r, _, _ in rows)


@functools.lru_cache(maxsize=256)
def _column_scales(device: torch.device, ranks: tuple[int, ...], scales: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor([s for r, s in zip(ranks, scales) for _ in range(r)], dtype=torch.float32, device=device)


def column_scales(ranks: list[int], scales: list[float], device: torch.device) -> torch.Tensor:
    """f32[R]: each stacked rank column's LoRA scale (adapter a's s_a over its r_a columns), for the thin kernels'
    epilogue. Cached per (device, ranks, scales) like :func:`adapter_groups`, so CUDA-graph captures only read it."""
    return _column_scales(torch.device(device), tuple(ranks), tuple(scales))


# Per (autotuned kernel, launch key): the kwargs of the config its autotuner chose.
_TUNED: dict[tuple, dict] = {}


def device_guard(device: torch.device):
    """The context a launch on ``device`` runs in: that CUDA device made current (Triton launches on the current
    device and its current stream), nothing for other devices (the interpreter's CPU tensors).

    Usage: ``with common.device_guard(x.device): kernel[grid](x, ...)``
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid, key: tuple, *args, **kwargs) -> None:
    """Launch ``kernel`` on ``grid`` on the device ``key[0]`` (the device of its tensors), under :func:`device_guard`.

    An autotuned kernel's first launch per ``key`` goes through Triton's autotuner (it prunes to the configs that fit
    the device, then tunes or runs the one left); later ones take the config it chose, straight to the JIT function.
    Triton's ``Autotuner.run`` rebuilds argument dicts and its key (with ``str`` of every tensor's dtype) on every
    launch: on the 2-core test machine, with the jitted launch itself stubbed out, a launch through the autotuner
    cost 14.7 µs of host time and this direct call 2.5 µs. At decode-sized M a layer's forward and backward are six
    launches bound by host time.
    ``key`` must start with the device and determine the config: the launchers pass the device, the dtypes and the
    autotune key's values. A kernel that cannot compile or launch raises (e.g.
    :class:`~fastlora.kernels.resources.DoesNotFit`); nothing is remembered for its key then.

    Usage: ``common.launch(my_kernel, grid, (x.device, x.dtype, m_bucket, k), x, y, m, k, BLOCK_R=16)``
    """
    with device_guard(key[0]):
        if not isinstance(kernel, Autotuner):
            kernel[grid](*args, **kwargs)
            return
        config_kwargs = _TUNED.get((kernel, key))
        if config_kwargs is None:
            kernel[grid](*args, **kwargs)
            _TUNED[(kernel, key)] = kernel.best_config.all_kwargs()
            return
        kernel.fn.run(*args, grid=grid, warmup=False, **kwargs, **config_kwargs)


@functools.lru_cache(maxsize=16)
def no_seeds(device: torch.device) -> torch.Tensor:
    """A seeds tensor for a call without dropout (the kernels never read it, but need a pointer)."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def adapter_groups(ranks: list[int], dropout_p: list[float], device: torch.device):
    """Per-group launch table for stacked adapters: ``(groups i64[G, 4], keep scales 1/(1-p) f32[G], widest rank)``.

    Cached per (device, ranks, p), so the first (warm-up) call builds it and CUDA-graph captures only read it.
    """
    # tuple() of the tuples the autograd function passes is free; equal ints and floats hash alike.
    return _group_tables(torch.device(device), tuple(ranks), tuple(dropout_p))


# ---- @triton.jit helpers ---------------------------------------------------------------------------------------


@triton.jit
def mix32(x):
    """lowbias32 on uint32 (products wrap modulo 2**32), as :func:`fastlora.formats.dropout.mix32`."""
    x ^= x >> 16
    x *= tl.full((), 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), 0x846CA68B, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def dropout_keep(seed_ptr, rows, cols, K, threshold):
    """Bool [len(rows), len(cols)]: elements of x[M, K] the hash dropout keeps (:mod:`fastlora.formats.dropout`).

    The seed is read from memory, not passed by value, so a CUDA graph replays with the seed of the moment.
    """
    key = mix32(tl.load(seed_ptr).to(tl.uint32))
    flat = rows.to(tl.uint32)[:, None] * K.to(tl.uint32) + cols.to(tl.uint32)[None, :]  # wraps mod 2**32
    return mix32(flat ^ key).to(tl.int64) >= threshold


@triton.jit
def nf4_tile(
    packed_ptr,
    absmax_ptr,
    table_ptr,
    rows,
    k0,
    N,
    K,
    BLOCKSIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    ROW_SCALE: tl.constexpr,
):
    """fp32 W[rows, k0:k0+BLOCK_K] of an NF4 weight W[N, K], unpacked in registers (zero outside W).

    ``table_ptr`` is :func:`nf4_decode_table`. Flat element i = n*K + k sits in byte i // 2, high nibble when i
    is even. With K even every row starts on a byte, so a row's bytes are contiguous: they are loaded 8-16 at a
    time and each decoded with one 8-byte gather of both nibbles' values (``EVEN_K``; the SASS of a per-element
    4-byte gather spent a nibble split, a 64-bit address and a load per element). ``ROW_SCALE`` (blocks never
    cross rows and the tile lies inside one block) loads one absmax per row, not per element.
    """
    if EVEN_K:
        byte = nf4_row_bytes(packed_ptr, rows, k0, N, K, BLOCK_K).to(tl.int32)
        pair = tl.load(table_ptr.to(tl.pointer_type(tl.int64)) + byte)  # little-endian: the high nibble's value first
        high = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        low = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        values = tl.interleave(high, low)
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        flat = rows.to(tl.int64)[:, None] * K + cols[None, :]
        ok = (rows < N)[:, None] & (cols < K)[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=ok, other=0).to(tl.int32)
        codes = (byte >> (4 - 4 * (flat % 2)).to(tl.int32)) & 0xF
        values = tl.load(table_ptr + CODE_TABLE_OFFSET + codes)
    return values * nf4_scales(absmax_ptr, rows, k0, N, K, BLOCKSIZE, BLOCK_K, ROW_SCALE)


@triton.jit
def nf4_row_bytes(packed_ptr, rows, k0, N, K, BLOCK_K: tl.constexpr):
    """u8 [len(rows), BLOCK_K // 2]: the packed bytes of W[rows, k0:k0+BLOCK_K] for an even K (0 outside W).

    The row stride is written ``K // 2`` (not ``rows * K // 2``) so Triton sees contiguous, aligned bytes and
    loads 8 or 16 of them per instruction instead of one.
    """
    half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    ok = (rows < N)[:, None] & (half < K // 2)[None, :]
    return tl.load(packed_ptr + rows.to(tl.int64)[:, None] * (K // 2) + half[None, :], mask=ok, other=0)


@triton.jit
def nf4_scales(absmax_ptr, rows, k0, N, K, BLOCKSIZE: tl.constexpr, BLOCK_K: tl.constexpr, ROW_SCALE: tl.constexpr):
    """fp32 absmax of W[rows, k0:k0+BLOCK_K]: [len(rows), 1] with ``ROW_SCALE`` (see :func:`nf4_tile`), else one
    per element (0 outside W)."""
    row_base = rows.to(tl.int64) * K
    row_ok = rows < N
    if ROW_SCALE:
        scale = tl.load(absmax_ptr + (row_base + k0) // BLOCKSIZE, mask=row_ok, other=0.0)[:, None]
    else:
        cols = k0 + tl.arange(0, BLOCK_K)
        flat = row_base[:, None] + cols[None, :]
        scale = tl.load(absmax_ptr + flat // BLOCKSIZE, mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    return scale


@triton.jit
def int8_tile(codes_ptr, scb_ptr, rows, cols, N, K):
    """fp32 W[rows, cols] of a bitsandbytes 8-bit weight W[N, K] (int8 codes row-major, fp32 SCB [N]), zero outside W.

    ``code * SCB[row] * (1/127)`` in fp32, left to right, with bitsandbytes' fp32 reciprocal of 127: bit-identical
    to ``int8_vectorwise_dequant``.
    """
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < K)[None, :]
    codes = tl.load(codes_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=ok, other=0)
    scb = tl.load(scb_ptr + rows, mask=row_ok, other=0.0)
    return codes.to(tl.float32) * scb[:, None] * 7.874015718698502e-3


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M row tiles walked together, so neighbours share W tiles in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n
