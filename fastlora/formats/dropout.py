"""Counter-based dropout masks that every backend (torch, Triton, C++) reproduces bit for bit.

A mask is a pure function of (seed, element index), so forward and backward regenerate it instead of saving
it: no [M, K] mask or dropped copy of x is kept for backward. For adapter a with seed s_a and probability p_a,
element (m, k) of x[M, K] is kept when ``hash32((m*K + k) mod 2**32 XOR mix32(s_a)) >= threshold(p_a)``, and
kept values are scaled by 1/(1-p_a), as ``nn.Dropout`` does. Seeds are drawn from torch's generator on x's
device, so ``torch.manual_seed`` reproduces a run and CUDA graphs replay fresh masks.

Usage::

    seeds = draw_seeds(n_adapters, x.device)
    keep = keep_mask(seeds[0], p=0.1, rows=M, cols=K)   # bool [M, K], the reference definition
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
#: Multipliers of the "lowbias32" integer hash (C. Wellons): a bijection on uint32 with good avalanche.
MIX_MUL_1 = 0x7FEB352D
MIX_MUL_2 = 0x846CA68B
#: Seeds are drawn below this bound so they fit an int32 in every backend.
SEED_BOUND = 2**31 - 1


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on uint32 values held in int64 (the products wrap modulo 2**64; only the low 32 bits are kept)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * MIX_MUL_1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MUL_2) & MASK32
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which a hash drops its element: floor(p * 2**32), computed in float64."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return min(int(p * 2.0**32), MASK32)


def draw_seeds(n: int, device: torch.device | str) -> torch.Tensor:
    """``n`` fresh int64 seeds on ``device`` from torch's generator for that device."""
    return torch.randint(0, SEED_BOUND, (n,), dtype=torch.int64, device=device)


#: Elements hashed at a time: bounds the int64 temporaries of :func:`keep_mask` and :func:`apply_dropout` (a few
#: live at once, 8 bytes per element: ~100 MB) whatever the size of x; a 16k x 4k x would otherwise hold ~0.5 GB per
#: temporary, a 70B model's layer several GB.
CHUNK_ELEMENTS = 1 << 22


def _keep_flat(key: torch.Tensor, threshold: int, start: int, end: int) -> torch.Tensor:
    """Bool [end - start]: the mask of flat elements ``start <= i < end`` for a mixed seed ``key``."""
    idx = torch.arange(start, end, dtype=torch.int64, device=key.device) & MASK32
    return mix32(idx ^ key) >= threshold


def keep_mask(seed: torch.Tensor | int, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """Bool [rows, cols]: which elements dropout with probability ``p`` keeps (the definition all backends share).

    Usage: ``keep = keep_mask(seeds[0], 0.1, m, k)``
    """
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, dtype=torch.int64, device=device)
    key, threshold = mix32(seed.to(torch.int64)), dropout_threshold(p)
    keep = torch.empty(rows * cols, dtype=torch.bool, device=seed.device)
    for start in range(0, rows * cols, CHUNK_ELEMENTS):
        end = min(start + CHUNK_ELEMENTS, rows * cols)
        keep[start:end] = _keep_flat(key, threshold, start, end)
    return keep.reshape(rows, cols)


def apply_dropout(x: torch.Tensor, seed: torch.Tensor | int, p: float) -> torch.Tensor:
    """``x[M, K]`` with dropout applied under the shared mask definition (kept values scaled by 1/(1-p)), computed
    a few million elements at a time into the output (temporaries bounded by :data:`CHUNK_ELEMENTS`).

    Usage: ``dropped = apply_dropout(x, seeds[0], 0.1)``
    """
    if p == 0.0:
        return x
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, dtype=torch.int64, device=x.device)
    key, threshold, scale = mix32(seed.to(torch.int64)), dropout_threshold(p), 1.0 / (1.0 - p)
    rows, cols = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        keep = _keep_flat(key, threshold, r0 * cols, r1 * cols).view(r1 - r0, cols)
        out[r0:r1] = x[r0:r1] * keep.to(x.dtype) * scale  # as nn.Dropout rounds: x·keep, then the scale
    return out
