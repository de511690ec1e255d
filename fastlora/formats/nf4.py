"""The NF4 format as bitsandbytes stores it: the facts the kernels, the C++ sources and the backends all read.

A bitsandbytes ``Params4bit`` holds W[N, K] flattened row-major, two 4-bit codes per byte (element 2i in the
high nibble, 2i+1 in the low one); code c stands for ``NF4_TABLE[c]``. Blocks of ``blocksize`` consecutive flat
elements share one absmax; with double quantization ("nested") that absmax is itself an 8-bit code:
``code2[q] * absmax2[i // blocksize2] + offset``. csrc/ decodes with the same 16 values (the tests check every
backend against bitsandbytes).

Usage::

    table = nf4_table(x.device)          # fp32 [16], cached per device
"""

from __future__ import annotations

import torch

from fastlora.tensor_cache import lasting

#: The 16 NF4 code values (QLoRA paper, as bitsandbytes ships them), index = 4-bit code.
NF4_TABLE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

_TABLE_CACHE: dict[torch.device, torch.Tensor] = {}


def nf4_table(device: torch.device | str) -> torch.Tensor:
    """The NF4 code table as an fp32 tensor on ``device`` (cached)."""
    device = torch.device(device)
    table = _TABLE_CACHE.get(device)
    if table is None:
        table = _TABLE_CACHE[device] = lasting(lambda: torch.tensor(NF4_TABLE, dtype=torch.float32, device=device))
    return table
