"""The operator schema: the registered ``torch.ops.fastlora`` ops agree with the eager entry points, their fake
implementations satisfy ``torch.library.opcheck``, and the reference backend equals float64 formulas."""

from __future__ import annotations

import pytest
import torch

from fastlora import ops
from fastlora.formats.dropout import keep_mask
from fastlora.functions.nf4_weight import NF4Weight
from tests.test_nf4 import _params4bit


def _sample(m=9, k=70, n=33, ranks=(4, 3), p=(0.0, 0.25), nf4=True):
    x = torch.randn(m, k)
    r = sum(ranks)
    weight, _, _ = _params4bit(n, k, 64, True)
    w4 = NF4Weight.from_params4bit(weight)
    return dict(
        x=x,
        lora_a=torch.randn(r, k),
        lora_b=torch.randn(n, r),
        seeds=torch.tensor([11, 12]),
        ranks=list(ranks),
        p=list(p),
        scales=[2.0, 0.75],  # LoRA scales: one exact power of two, one that is not
        weight=w4.packed if nf4 else torch.randn(n, k),
        absmax=w4.absmax if nf4 else None,
        dense=w4.dequantize() if nf4 else None,
        bias=torch.randn(n),
        dy=torch.randn(m, n),
        grad_s=torch.randn(m, r),
        lora_s=torch.randn(m, r),
    )


def _op_calls(s):
    return {
        "lora_down": (s["x"], s["lora_a"], s["ranks"], s["seeds"], s["p"], s["scales"], "torch"),
        "lora_linear": (s["x"], s["weight"], s["absmax"], 64, s["bias"], s["lora_s"], s["lora_b"], "torch"),
        "lora_up_grad": (s["dy"], s["lora_b"], s["lora_s"], s["ranks"], s["scales"], "torch"),
        "lora_down_grad": (s["grad_s"], s["x"], s["ranks"], s["seeds"], s["p"], "torch"),
        "lora_linear_grad_input": (
            s["dy"], s["weight"], s["absmax"], 64, s["grad_s"], s["lora_a"], s["ranks"], s["seeds"], s["p"], "torch",
        ),
    }


@pytest.mark.parametrize("name", ["lora_down", "lora_linear", "lora_up_grad", "lora_down_grad", "lora_linear_grad_input"])
def test_registered_op_matches_eager_entry_and_passes_opcheck(name):
    args = _op_calls(_sample())[name]
    eager = getattr(ops, name)(*args)
    registered = getattr(torch.ops.fastlora, name)(*args)
    for a, b in zip(eager if isinstance(eager, tuple) else (eager,), registered if isinstance(registered, tuple) else (registered,)):
        assert torch.equal(a, b)
    torch.library.opcheck(getattr(ops, name).op, args, test_utils=("test_schema", "test_faketensor"))


def _masked(x, seeds, ranks, p):
    """Per-adapter dropped copies of x in float64 (one per rank slice)."""
    out = []
    for i, _ in enumerate(ranks):
        keep = keep_mask(seeds[i], p[i], *x.shape).double() if p[i] > 0 else 1.0
        out.append(x.double() * keep / (1 - p[i]))
    return out


def test_reference_ops_equal_float64_formulas():
    s = _sample()
    dropped = _masked(s["x"], s["seeds"], s["ranks"], s["p"])
    a64, b64 = s["lora_a"].double(), s["lora_b"].double()
    slices = [slice(0, 4), slice(4, 7)]
    expected_s = torch.cat([scale * d @ a64[sl].T for d, sl, scale in zip(dropped, slices, s["scales"])], 1)
    torch.testing.assert_close(ops.lora_down(*_op_calls(s)["lora_down"]), expected_s.float(), rtol=1e-5, atol=1e-5)

    w64 = s["dense"].double()
    y = s["x"].double() @ w64.T + s["bias"].double() + s["lora_s"].double() @ b64.T
    torch.testing.assert_close(ops.lora_linear(*_op_calls(s)["lora_linear"]), y.float(), rtol=1e-5, atol=1e-4)

    g64 = s["grad_s"].double()
    d_a = torch.cat([g64[:, sl].T @ d for d, sl in zip(dropped, slices)], 0)
    torch.testing.assert_close(ops.lora_down_grad(*_op_calls(s)["lora_down_grad"]), d_a.float(), rtol=1e-5, atol=1e-4)

    dx = s["dy"].double() @ w64
    for i, sl in enumerate(slices):
        keep = keep_mask(s["seeds"][i], s["p"][i], *s["x"].shape).double() if s["p"][i] > 0 else 1.0
        dx = dx + (g64[:, sl] @ a64[sl]) * keep / (1 - s["p"][i])
    got = ops.lora_linear_grad_input(*_op_calls(s)["lora_linear_grad_input"])
    torch.testing.assert_close(got, dx.float(), rtol=1e-5, atol=1e-4)

    grad_s, grad_b = ops.lora_up_grad(*_op_calls(s)["lora_up_grad"])
    column_scales = torch.tensor([scale for r, scale in zip(s["ranks"], s["scales"]) for _ in range(r)], dtype=torch.float64)
    torch.testing.assert_close(grad_s, (s["dy"].double() @ b64 * column_scales).float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_b, (s["dy"].double().T @ s["lora_s"].double()).float(), rtol=1e-5, atol=1e-4)


def test_compiled_graph_keeps_the_op_opaque():
    s = _sample()
    args = _op_calls(s)["lora_linear"]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(lambda *a: ops.lora_linear(*a), backend=backend, fullgraph=True)
    torch.testing.assert_close(compiled(*args), ops.lora_linear(*args))
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert targets == ["fastlora.lora_linear.default"]
