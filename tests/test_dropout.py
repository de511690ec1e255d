"""The shared counter-based dropout mask: reproducible, seed-dependent, with the requested keep rate."""

import math

import pytest
import torch

from fastlora.formats.dropout import apply_dropout, dropout_threshold, keep_mask, mix32


def test_mix32_matches_integer_definition():
    def lowbias32(x):  # plain Python ints, the definition every backend implements
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = torch.randint(0, 2**32, (1000,), dtype=torch.int64)
    values[:3] = torch.tensor([0, 1, 2**32 - 1])
    assert mix32(values).tolist() == [lowbias32(v) for v in values.tolist()]


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_and_scaling(p):
    rows, cols = 300, 301
    keep = keep_mask(torch.randint(0, 2**31 - 1, ()), p, rows, cols)
    n = rows * cols
    # Binomial: the kept fraction is within 6 standard deviations of 1 - p (false-failure odds ~1e-9).
    assert abs(keep.float().mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n)
    x = torch.randn(rows, cols)
    dropped = apply_dropout(x, 123, p)
    kept = keep_mask(123, p, rows, cols)
    assert torch.equal(dropped[~kept], torch.zeros_like(dropped[~kept]))
    torch.testing.assert_close(dropped[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)


def test_reproducible_and_seed_dependent():
    a = keep_mask(7, 0.5, 64, 64)
    assert torch.equal(a, keep_mask(7, 0.5, 64, 64))
    b = keep_mask(8, 0.5, 64, 64)
    assert (a != b).float().mean() > 0.4  # independent masks disagree on ~half the elements
    # Neighbouring rows are not copies of each other.
    assert (a[0] != a[1]).any()


def test_threshold_bounds():
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**31
    with pytest.raises(ValueError):
        dropout_threshold(1.0)
