"""The grouped expert LoRA ops (fastlora.grouped_ops) of each CPU backend against float64 formulas.

Per expert group of the expert-sorted x: y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ and its gradients, with empty experts, odd
sizes, a transposed W (gpt-oss storage), PEFT's permuted B view, two adapters with different ranks and scales, and
R = 0. fp32 results within 1e-5 relative of float64 (a few roundings of K-long fp32 sums); 16-bit outputs within
one unit roundoff of the float64 value's scale plus the fp32 error (computed in fp32, rounded once).
"""

from __future__ import annotations

import pytest
import torch

from fastlora import grouped_ops as moe_ops
from fastlora.moe.autograd import grouped_lora_linear
from tests.moe_scope import BACKENDS


def _case(seed: int, dtype=torch.float32, experts=5, k=19, n=23, ranks=(3, 5), transposed=False, counts=None):
    g = torch.Generator().manual_seed(seed)
    counts = counts or [0, 4, 1, 0, 9][:experts]
    offsets = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    rows = int(offsets[-1])
    x = torch.randn(rows, k, generator=g).to(dtype)
    stored = torch.randn(experts, k, n, generator=g) if transposed else torch.randn(experts, n, k, generator=g)
    weight = (stored.transpose(1, 2) if transposed else stored).to(dtype)
    adapters = []
    for r in ranks:
        a = torch.randn(experts * r, k, generator=g).view(experts, r, k)
        b = torch.randn(n, r * experts, generator=g).view(n, r, experts).permute(2, 0, 1)  # PEFT's B layout
        adapters.append((a, b, 0.5 + r / 4))
    return x, offsets, weight, adapters


def _float64(x, offsets, weight, adapters):
    y = torch.zeros(x.shape[0], weight.shape[1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offsets.tolist()):
        x_e = x[start:end].double()
        y[start:end] = x_e @ weight[e].double().T
        for a, b, s in adapters:
            y[start:end] += s * (x_e @ a[e].double().T) @ b[e].double().T
        start = end
    return y


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transposed", [False, True])
def test_forward_and_gradients_match_float64(backend, transposed):
    x, offsets, weight, adapters = _case(1, transposed=transposed)
    x.requires_grad_(True)
    leaves = [t.detach().clone().requires_grad_(True) for pair in adapters for t in pair[:2]]
    live = [(leaves[2 * i], leaves[2 * i + 1], s) for i, (_, _, s) in enumerate(adapters)]
    y = grouped_lora_linear(x, offsets, weight, live, backend)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * grad).sum().backward()

    x64 = x.detach().double().requires_grad_(True)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    live64 = [(leaves64[2 * i], leaves64[2 * i + 1], s) for i, (_, _, s) in enumerate(adapters)]
    y64 = _float64(x64, offsets, weight, live64)
    (y64 * grad.double()).sum().backward()

    assert _rel(y, y64) < 1e-5
    assert _rel(x.grad, x64.grad) < 1e-5
    for got, want in zip(leaves, leaves64):
        assert _rel(got.grad, want.grad) < 1e-5
    assert torch.count_nonzero(leaves[0].grad[0]) == 0  # expert 0 has no tokens: no gradient for its A


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_adapters_is_the_grouped_gemm(backend):
    x, offsets, weight, _ = _case(2, counts=[3, 0, 2, 6, 1])
    x.requires_grad_(True)
    y = grouped_lora_linear(x, offsets, weight, [], backend)
    y.sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    y64 = _float64(x64, offsets, weight, [])
    y64.sum().backward()
    assert _rel(y, y64) < 1e-5 and _rel(x.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_rounds_once(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 tl.dot is wrong (triton#11584); bf16 runs in the GPU tests")
    x, offsets, weight, adapters = _case(3, dtype=dtype, k=37, n=29)
    y = grouped_lora_linear(x, offsets, weight, adapters, backend)
    assert y.dtype == dtype
    y64 = _float64(x, offsets, weight, adapters)
    unit_roundoff = torch.finfo(dtype).eps / 2
    # one rounding of each output to `dtype` (relative u), plus the fp32 accumulation (far below u)
    assert ((y.double() - y64).abs() <= unit_roundoff * y64.abs() * 1.01 + 1e-6 * y64.abs().max()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_registered_ops_agree_with_direct_calls(backend):
    x, offsets, weight, adapters = _case(4)
    (a, b, s), = adapters[:1]
    y, lora_s = moe_ops.grouped_lora_forward(x, offsets, weight, a, b, [a.shape[1]], [s], backend)
    direct = moe_ops.implementation(backend, "cpu").grouped_lora_forward(x, offsets, weight, a, b, [a.shape[1]], [s])
    torch.testing.assert_close(y, direct[0], rtol=0, atol=0)
    torch.testing.assert_close(lora_s, direct[1], rtol=0, atol=0)
    grads = moe_ops.grouped_lora_backward(torch.ones_like(y), x, lora_s, offsets, weight, a, b, [a.shape[1]], [s], False, backend)
    assert grads[0].shape == (0, x.shape[1]) and grads[1].shape == a.shape and grads[2].shape == b.shape


def test_fake_implementation_gives_shapes_for_compile():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, offsets, weight, adapters = _case(5)
    a, b, s = adapters[0]
    with FakeTensorMode(allow_non_fake_inputs=True):
        y, lora_s = moe_ops.grouped_lora_forward(x, offsets, weight, a, b, [a.shape[1]], [s], "torch")
    assert y.shape == (x.shape[0], weight.shape[1]) and lora_s.shape == (x.shape[0], a.shape[1])
    assert lora_s.dtype == torch.float32
