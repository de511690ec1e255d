"""The paths that can run on CUDA build no int64 temporaries the size of x or W: dropout hashes, the NF4 reference
dequantization and absmax resolution, DoRA's row norms and its dropout terms work a bounded number of elements at a
time (``CHUNK_ELEMENTS``, made small here so the test's small tensors span many chunks).

Every op's int64 outputs are recorded by a ``TorchDispatchMode``; the largest must stay within one chunk. Results are
compared with the unchunked formulas, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastlora.backends import reference
from fastlora.formats import dropout

CHUNK = 256


class LargestInt64(TorchDispatchMode):
    """Records the largest int64 tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.int64:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(dropout, "CHUNK_ELEMENTS", CHUNK)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", CHUNK)


def _unchunked_keep(seed: int, p: float, rows: int, cols: int) -> torch.Tensor:
    key = dropout.mix32(torch.tensor(seed, dtype=torch.int64))
    idx = torch.arange(rows * cols, dtype=torch.int64) & dropout.MASK32
    return (dropout.mix32(idx ^ key) >= dropout.dropout_threshold(p)).reshape(rows, cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_hashes_a_chunk_at_a_time(dtype):
    rows, cols, p = 37, 101, 0.3  # a row spans parts of two chunks; 3737 elements: 15 chunks
    x = torch.randn(rows, cols).to(dtype)
    with LargestInt64() as largest:
        keep = dropout.keep_mask(11, p, rows, cols)
        dropped = dropout.apply_dropout(x, 11, p)
    assert 0 < largest.numel <= CHUNK
    want = _unchunked_keep(11, p, rows, cols)
    assert torch.equal(keep, want)
    assert torch.equal(dropped, x * want.to(dtype) * (1.0 / (1.0 - p)))


def test_dropout_keeps_gradients():
    x = torch.randn(9, 70, requires_grad=True)
    dropout.apply_dropout(x, 5, 0.5).sum().backward()
    assert torch.equal(x.grad, _unchunked_keep(5, 0.5, 9, 70).float() * 2.0)


def _nf4(n: int, k: int, blocksize: int):
    import bitsandbytes.functional as bnbF

    w = torch.randn(n, k) / k**0.5
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    return packed.reshape(-1), state


@pytest.mark.parametrize("n,k", [(33, 97), (16, 256)])
def test_nf4_reference_dequantizes_a_chunk_at_a_time(n, k):
    """Bit-identical to bitsandbytes, K odd (bytes straddle chunk and row edges) and even; the absmax of double
    quantization resolved without an int64 index per element."""
    import bitsandbytes.functional as bnbF

    packed, state = _nf4(n, k, 64)
    s2 = state.state2
    with LargestInt64() as largest:
        absmax = reference.nf4_resolve_absmax(state.absmax, s2.code, s2.absmax, s2.blocksize, float(state.offset))
        w = reference.nf4_dequantize(packed, absmax, 64, n, k, torch.bfloat16)
    assert largest.numel <= CHUNK
    assert torch.equal(absmax, bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset)
    assert torch.equal(w, bnbF.dequantize_4bit(packed.reshape(-1, 1), state).to(torch.bfloat16))


@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_dora_row_norms_a_chunk_of_rows_at_a_time(base):
    from types import SimpleNamespace

    from fastlora.functions.dora import _squared_row_norms

    n, k = 45, 97
    if base == "nf4":
        packed, state = _nf4(n, k, 64)
        absmax = reference.nf4_resolve_absmax(state.absmax, state.state2.code, state.state2.absmax, 256, float(state.offset))
        weight, w32 = packed, reference.nf4_dequantize(packed, absmax, 64, n, k, torch.float32)
    else:
        weight, absmax = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) + 0.5
        w32 = reference.int8_dequantize(weight, absmax, torch.float32)
    with LargestInt64() as largest:
        norms = _squared_row_norms(SimpleNamespace(weight=weight, absmax=absmax, nested=None, blocksize=64, out_features=n), k)
    assert largest.numel <= CHUNK
    torch.testing.assert_close(norms, w32.double().square().sum(1).float(), rtol=1e-6, atol=0)  # fp32 row sums


def test_reference_grad_input_dropout_term_is_chunked():
    m, n, k, r, p = 13, 20, 50, 4, 0.25
    dy, w = torch.randn(m, n), torch.randn(n, k)
    ds, a, seeds = torch.randn(m, r), torch.randn(r, k), torch.tensor([17])
    with LargestInt64() as largest:
        dx = reference.lora_linear_grad_input(dy, w, None, 0, ds, a, [r], seeds, [p])
    assert largest.numel <= CHUNK
    want = dy @ w + (ds @ a) * _unchunked_keep(17, p, m, k).float() * (1.0 / (1.0 - p))
    torch.testing.assert_close(dx, want, rtol=1e-6, atol=1e-6)
