"""The per-call path builds nothing whose size depends on tensor data (on a GPU, reading it back is a host sync):
checked on meta tensors, which have no data, so any such read raises. See docs/gpu.md, "first contact review"."""

from __future__ import annotations

import torch

from fastlora.functions.lora import Adapter, _row_mask


def test_mixed_batch_row_mask_needs_no_data():
    """``adapter_names`` batches: the [M, R] mask of which rank columns serve which row. With a tensor of repeats,
    ``repeat_interleave`` reads the repeats back to size its output (one sync per layer call on a GPU)."""
    rows = torch.tensor([1.0, 0.0, 1.0])
    adapters = [
        Adapter(torch.randn(r, 5), torch.randn(4, r), 1.0, 0.0, rows=rows if i == 0 else 1.0 - rows)
        for i, r in enumerate((2, 3))
    ]
    mask = _row_mask(adapters, 6)  # two flattened rows per row of x's leading dimension
    expected = torch.tensor([[1.0] * 2 + [0.0] * 3, [0.0] * 2 + [1.0] * 3, [1.0] * 2 + [0.0] * 3])
    assert torch.equal(mask, expected.repeat_interleave(2, dim=0))
    meta = [a._replace(lora_a=a.lora_a.to("meta"), lora_b=a.lora_b.to("meta"), rows=a.rows.to("meta")) for a in adapters]
    assert _row_mask(meta, 6).shape == (6, 5)
