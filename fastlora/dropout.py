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


def keep_mask(seed: torch.Tensor | int, p: float, rows: int, cols: int, device=None) -> torch.Tensor:
    """Bool [rows, cols]: which elements dropout with probability ``p`` keeps (the definition all backends share)."""
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor(seed, dtype=torch.int64, device=device)
    device = seed.device
    key = mix32(seed.to(torch.int64))
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device) & MASK32
    h = mix32(idx ^ key)
    return (h >= dropout_threshold(p)).reshape(rows, cols)


def apply_dropout(x: torch.Tensor, seed: torch.Tensor | int, p: float) -> torch.Tensor:
    """``x[M, K]`` with dropout applied under the shared mask definition (kept values scaled by 1/(1-p))."""
    if p == 0.0:
        return x
    keep = keep_mask(seed, p, x.shape[0], x.shape[1], device=x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
