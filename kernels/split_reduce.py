"""Split reductions in one launch: programs that each reduce part of a GEMM's K dimension for the same output
tile hand their fp32 partials to the last of them to finish, which sums them in split order.

The sum's order never depends on timing, so results repeat bit for bit (unlike atomic adds of data). Used by the
decode-sized kernels, whose few output tiles would otherwise leave most SMs idle. Nothing here launches a kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_counters: dict[torch.device, torch.Tensor] = {}


def tile_counters(tiles: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, shared by launches on ``device``: each kernel leaves
    them zero again, and launches on one stream run in order.

    Usage: ``counters = tile_counters(tiles_n * tiles_m, x.device)``
    """
    counters = _counters.get(device)
    if counters is None or counters.numel() < tiles:
        counters = _counters[device] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    return counters


@triton.jit
def sum_splits(acc, partial_ptr, counter_ptr, split, offsets, mask, split_stride, SPLITS: tl.constexpr):
    """Store this program's partial ``acc`` (split ``split`` of ``SPLITS``) at ``partial_ptr + split *
    split_stride + offsets``; returns (the sum of all splits' partials, in split order, True) to the last program
    of the tile to arrive at ``counter_ptr``, and (``acc``, False) to the others, which must not store the tile."""
    tl.store(partial_ptr + split * split_stride + offsets, acc, mask=mask)
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel") == SPLITS - 1  # releases our partial, acquires the others'
    if last:
        acc = tl.load(partial_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        for other in range(1, SPLITS):
            acc += tl.load(partial_ptr + other * split_stride + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch
    return acc, last
