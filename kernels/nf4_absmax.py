"""Double-quantized NF4 absmax, resolved to fp32: ``absmax[i] = code2[q[i]] * absmax2[i // blocksize2] + offset``.

Runs once per weight (fastlora caches the result), so it is a plain elementwise kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlora.kernels import common

BLOCK = 1024


@triton.jit
def nf4_absmax_kernel(q_ptr, code2_ptr, absmax2_ptr, out_ptr, NUMEL, offset, BLOCKSIZE2: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < NUMEL
    code = tl.load(code2_ptr + tl.load(q_ptr + idx, mask=ok, other=0).to(tl.int32))
    scale = tl.load(absmax2_ptr + idx // BLOCKSIZE2, mask=ok, other=0.0)
    tl.store(out_ptr + idx, code * scale + offset, mask=ok)


def nf4_resolve_absmax(
    absmax_q: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor, blocksize2: int, offset: float
) -> torch.Tensor:
    """fp32 absmax of a double-quantized NF4 weight, rounded as bitsandbytes rounds it (multiply, then add).

    Usage: ``absmax = nf4_resolve_absmax(state.absmax, state.state2.code, state.state2.absmax, 256, offset)``
    """
    out = torch.empty(absmax_q.shape, dtype=torch.float32, device=absmax_q.device)
    numel = absmax_q.numel()
    # No FMA contraction: bitsandbytes rounds the product before adding the offset.
    common.launch(
        nf4_absmax_kernel, (common.cdiv(numel, BLOCK),), (out.device,),
        absmax_q.reshape(-1), code2.float(), absmax2.float(), out, numel, offset,
        BLOCKSIZE2=blocksize2, BLOCK=BLOCK, enable_fp_fusion=False,
    )  # fmt: skip
    return out
