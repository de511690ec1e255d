"""The layer cases as pytest-benchmark tests: PEFT, the split practice and fastlora, per base, mode and M.

pytest-benchmark tracks one contender across commits (``--benchmark-autosave`` / ``--benchmark-compare`` /
``--benchmark-histogram``); ratios between contenders come from the interleaved suite (``fastlora bench``), which
times them in one process, alternating, on the same inputs. Every case is first checked against the fp32 reference
of :func:`fastlora.bench.layers.reference_outputs` with the suite's tolerance, so a wrong contender fails instead of
being timed.

Usage::

    pytest bench --benchmark-only                      # time every case (about 3 minutes on 2 CPU cores)
    pytest bench --benchmark-disable                   # CI: each case checked and run once
    pytest bench --benchmark-only --benchmark-autosave -k "nf4 and fastlora"
"""

from __future__ import annotations

import pytest
import torch

from fastlora.bench.layers import (
    TOLERANCE, LayerFixture, make_fixture, peft_contender, reference_outputs, relative_error, run_once, split_contender,
)
from fastlora.bench.models import layer_shapes
from fastlora.bench.settings import available_backends

#: The CPU default layer model's first shape (q_proj/o_proj of the "tiny" preset) keeps a disabled run to seconds.
SHAPE = layer_shapes("tiny")[0]
RANK = 16
DEVICE = torch.device("cpu")
DTYPE = torch.float32
CONTENDERS = ("peft", "split", *(f"fastlora[{name}]" for name in available_backends("cpu") if name != "torch"))


def _contender(name: str, fixture: LayerFixture):
    if name == "peft":
        return peft_contender(fixture)
    if name == "split":
        return split_contender(fixture)
    return peft_contender(fixture, backend=name.removeprefix("fastlora[").removesuffix("]"))


@pytest.mark.parametrize("tokens", (1, 128))
@pytest.mark.parametrize("mode", ("fwd", "fwd+bwd"))
@pytest.mark.parametrize("base", ("dense", "nf4"))
@pytest.mark.parametrize("contender", CONTENDERS)
def test_layer(benchmark, contender: str, base: str, mode: str, tokens: int) -> None:
    fixture = make_fixture(SHAPE, base, RANK, DTYPE, DEVICE, seed=tokens)
    layer = _contender(contender, fixture)
    generator = torch.Generator().manual_seed(tokens + 1)
    x = torch.randn(tokens, SHAPE.in_features, generator=generator, dtype=DTYPE).requires_grad_(mode == "fwd+bwd")
    grad_y = torch.randn(tokens, SHAPE.out_features, generator=generator, dtype=DTYPE)
    # fp32 reference from the same rounded weights: what remains is summation order (TOLERANCE's justification).
    want = reference_outputs(fixture, layer.computes, x, grad_y, mode)
    assert relative_error(run_once(layer, x, grad_y, mode), want) <= TOLERANCE[DTYPE]
    benchmark.group = f"{base} {mode} M={tokens} {SHAPE.in_features}->{SHAPE.out_features} r={RANK}"
    benchmark(run_once, layer, x, grad_y, mode)
