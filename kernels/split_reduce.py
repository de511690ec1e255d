"""Split reductions in one launch: programs that each reduce part of a GEMM's K dimension for the same output
tile hand their fp32 partials to the last of them to finish, which sums them in split order.

The sum's order never depends on timing, so results repeat bit for bit (unlike atomic adds of data). Used by the
decode-sized kernels, whose few output tiles would otherwise leave most SMs idle. Nothing here launches a kernel.

Ordering is written out in the source, not left to the compiler: every warp of a program stores its part of the
partial, a CTA barrier (``tl.debug_barrier``) waits for all of them, then one release-acquire atomic on the tile's
counter publishes the program's stores GPU-wide and tells it whether it arrived last; the last one reads the
others' partials after that acquire (and a second barrier), from L2 (``.cg``). The compiled code must show a
barrier and a fence before the atomic (``tests/test_triton_compile.py`` checks the sm_90 and sm_80 SASS).

The counters are zeroed at the start of each launch (:func:`tile_counters`), stream-ordered before the kernel, so a
launch that stopped half way (an interpreter error, an interrupted benchmark) cannot leave counts that would keep
a later launch from ever storing its output, and launches on different streams never share counters. Autotuning
runs several trials on one launch's tensors: the kernels' ``TrialHooks`` zero the counters before each trial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def tile_counters(tiles: int, device: torch.device) -> torch.Tensor:
    """Zeroed int32 arrival counters, one per output tile, for one launch on ``device`` (a memset on the current
    stream, from the caching allocator).

    Usage: ``counters = tile_counters(tiles_n * tiles_m, x.device)``
    """
    return torch.zeros(max(tiles, 1), dtype=torch.int32, device=device)


@triton.jit
def sum_splits(acc, partial_ptr, counter_ptr, split, offsets, mask, split_stride, SPLITS: tl.constexpr):
    """Store this program's partial ``acc`` (split ``split`` of ``SPLITS``) at ``partial_ptr + split *
    split_stride + offsets``; returns (the sum of all splits' partials, in split order, True) to the last program
    of the tile to arrive at ``counter_ptr``, and (``acc``, False) to the others, which must not store the tile."""
    tl.store(partial_ptr + split * split_stride + offsets, acc, mask=mask)
    tl.debug_barrier()  # every warp's partial stored before the one atomic below publishes them
    last = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu") == SPLITS - 1  # release ours, acquire theirs
    if last:
        tl.debug_barrier()  # the acquire (one thread's) ordered before every warp's loads
        acc = tl.load(partial_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
        for other in range(1, SPLITS):
            acc += tl.load(partial_ptr + other * split_stride + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    return acc, last
