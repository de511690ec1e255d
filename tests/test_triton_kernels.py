"""Every Triton kernel against the reference ops, on CPU under Triton's interpreter (fp16 and fp32).

Run with the interpreter switched on before Triton is imported (it is read when kernels are decorated)::

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py

Without it every test here is skipped. bf16 is left to the GPU tests: the interpreter's bf16 ``tl.dot`` is
wrong (triton#11584). Shapes are odd on purpose: M in 1, 7, 33, 130 and N, K off the 32-wide interpreter
tiles; K=200 makes absmax blocks cross rows, K=97 (odd) splits bytes across rows, K=256 takes the
one-absmax-per-row fast path. Outputs start as NaN (``poisoned_empty``), so an unwritten element fails.

Tolerances are bounds, not guesses: with ``magnitude`` = the same sum taken over absolute values, the
kernel and the reference may differ by ``out_eps * |ref| + acc_eps * magnitude`` where out_eps is one ulp of
the output dtype (both round once) and acc_eps covers fp32 accumulation in a different order (2K units of
2**-24) plus, for fp16, rounding NF4/dense W values to fp16 before ``tl.dot`` (2**-11; the reference keeps
them in fp32).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter tests: run `TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py`",
    ),
]

if os.environ.get("TRITON_INTERPRET") == "1":
    import bitsandbytes.functional as bnbF

    from fastlora import kernels, ops
    from fastlora.backends import reference as ref
    from fastlora.formats.dropout import apply_dropout, draw_seeds, keep_mask
    from fastlora.functions.nf4_weight import quant_state_absmax
    from fastlora.kernels import dispatch

DTYPES = [torch.float16, torch.float32]
MS = [1, 7, 33, 130]
# (N, K): K=200 blocks cross rows; K=97 odd (bytes cross rows, N*K odd); K=256 one absmax per row tile.
SHAPES = [(72, 200), (45, 97), (40, 256)]
ADAPTERS = {  # name: (ranks, dropout p)
    "one": ([8], [0.0]),
    "one_dropout": ([16], [0.5]),
    "three_dropout": ([4, 16, 8], [0.25, 0.0, 0.5]),
}
OUT_EPS = {torch.float16: 2.0**-10, torch.float32: 2.0**-23}
W_EPS = {torch.float16: 2.0**-11, torch.float32: 0.0}


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    """Every float tensor the launchers allocate starts as NaN, so an element no program writes fails."""
    real_empty = torch.empty

    def empty(*size, dtype=None, **kwargs):
        out = real_empty(*size, dtype=dtype, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)


def assert_bounded(actual, expected, magnitude, dtype, k):
    """|actual - expected| <= out_eps(dtype)*|expected| + (2k*2**-24 + w_eps(dtype))*magnitude, elementwise."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert not actual.isnan().any(), "unwritten (NaN) elements"
    bound = OUT_EPS[dtype] * expected.double().abs() + (2 * k * 2.0**-24 + W_EPS[dtype]) * magnitude.double()
    err = (actual.double() - expected.double()).abs()
    worst = (err - bound).argmax()
    assert (err <= bound + 1e-30).all(), f"err {err.flatten()[worst]:.3g} > bound {bound.flatten()[worst]:.3g}"


def forward_float64(x, w32, s, b, bias, col_scale=None):
    """(exact, magnitude) of ``(x·Wᵀ + S·Bᵀ) ⊙ col_scale + bias`` in float64: the formula, and the same sum over
    absolute values (what :func:`assert_bounded` scales the accumulation error by)."""
    x64, w64, s64, b64 = x.double(), w32.double(), s.double(), b.double()
    exact, magnitude = x64 @ w64.T + s64 @ b64.T, x64.abs() @ w64.abs().T + s64.abs() @ b64.abs().T
    if col_scale is not None:
        exact, magnitude = exact * col_scale.double(), magnitude * col_scale.double()
    return exact + bias.double(), magnitude + bias.double().abs()


def grad_input_float64(dy, w32, ds, a, ranks, seeds, p):
    """(exact, magnitude) of ``dy·W + Σ_a (dS_a·A_a) ⊙ keep_a / (1 - p_a)`` in float64, as :func:`forward_float64`."""
    dy64 = dy.double()
    magnitude, exact = dy64.abs() @ w32.double().abs(), dy64 @ w32.double()
    for i, (ds_i, a_i) in enumerate(zip(ds.double().split(ranks, 1), a.double().split(ranks))):
        keep = keep_mask(seeds[i], p[i], dy.shape[0], a.shape[1]).double() / (1 - p[i])
        magnitude += (ds_i.abs() @ a_i.abs()) * keep
        exact += (ds_i @ a_i) * keep
    return exact, magnitude


def nf4_weight(n, k, blocksize, nested):
    """(packed u8, fp32 absmax, fp32 W) of a random W[n, k] quantized by bitsandbytes on the CPU."""
    packed, state = bnbF.quantize_4bit(torch.randn(n, k) / k**0.5, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    absmax = quant_state_absmax(state)
    return packed.reshape(-1), absmax, ref.nf4_dequantize(packed.reshape(-1), absmax, blocksize, n, k, torch.float32)


def base_weight(base, n, k, dtype, blocksize=64, nested=True):
    """(weight as the op takes it, absmax or None, fp32 W as the kernels see it before rounding)."""
    if base == "nf4":
        return nf4_weight(n, k, blocksize, nested)
    w = (torch.randn(n, k) / k**0.5).to(dtype)
    return w, None, w.float()


def stacked_adapters(name, k):
    ranks, p = ADAPTERS[name]
    return torch.randn(sum(ranks), k) / k**0.5, ranks, draw_seeds(len(ranks), "cpu"), p


def lora_scales(ranks):
    """One LoRA scale per adapter, 2.0 then others that are not powers of two (1.5, 0.3, ...)."""
    return [2.0, 1.5, 0.3][: len(ranks)]


def column_scales(ranks, scales):
    """The scale of each stacked rank column, float64."""
    return torch.tensor([s for r, s in zip(ranks, scales) for _ in range(r)], dtype=torch.float64)


def dropped(x, ranks, seeds, p):
    """drop_a(x) per adapter in float64 (the masks are the reference definition's)."""
    return [apply_dropout(x.double(), seeds[i], p[i]) for i in range(len(ranks))]


# ---- NF4 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blocksize", [64, 128])
def test_resolve_absmax_bit_exact(blocksize):
    # 130*200/64 = 407 absmax codes: two blocks of the second-level absmax (256 codes each).
    _, state = bnbF.quantize_4bit(torch.randn(130, 200), blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    s2 = state.state2
    got = kernels.nf4_resolve_absmax(state.absmax, s2.code, s2.absmax, s2.blocksize, float(state.offset))
    expected = ref.nf4_resolve_absmax(state.absmax, s2.code, s2.absmax, s2.blocksize, float(state.offset))
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("n,k", [(72, 200), (45, 97), (1, 1), (9, 257)])
@pytest.mark.parametrize("blocksize,nested", [(64, True), (128, False)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_bit_exact(n, k, blocksize, nested, dtype):
    packed, state = bnbF.quantize_4bit(torch.randn(n, k), blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    got = kernels.nf4_dequantize(packed.reshape(-1), quant_state_absmax(state), blocksize, n, k, dtype)
    state.dtype = dtype
    assert torch.equal(got, bnbF.dequantize_4bit(packed, state))


# ---- LoRA down and its gradient ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("adapters", list(ADAPTERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_down(m, adapters, dtype):
    k = 97
    x = torch.randn(m, k).to(dtype)
    a, ranks, seeds, p = stacked_adapters(adapters, k)
    scales = lora_scales(ranks)
    got = kernels.lora_down(x, a, ranks, seeds, p, scales)
    expected = ref.lora_down(x, a, ranks, seeds, p, scales)
    magnitude = torch.cat([xd.abs() @ a_i.double().abs().T for xd, a_i in zip(dropped(x, ranks, seeds, p), a.split(ranks))], 1)
    assert_bounded(got, expected, magnitude * column_scales(ranks, scales), torch.float32, k)


@pytest.mark.parametrize("m,rows_per_split", [(1, None), (33, None), (130, None), (130, 48)])
@pytest.mark.parametrize("adapters", list(ADAPTERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_down_grad(m, rows_per_split, adapters, dtype):
    k = 200
    x = torch.randn(m, k).to(dtype)
    _, ranks, seeds, p = stacked_adapters(adapters, k)
    grad_s = torch.randn(m, sum(ranks))
    got = kernels.lora_down_grad(grad_s, x, ranks, seeds, p, rows_per_split=rows_per_split)
    expected = ref.lora_down_grad(grad_s, x, ranks, seeds, p)
    parts = [g.double().abs().T @ xd.abs() for g, xd in zip(grad_s.split(ranks, 1), dropped(x, ranks, seeds, p))]
    assert_bounded(got, expected, torch.cat(parts), torch.float32, m)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_up_grad(m, dtype):
    n, ranks = 72, [16, 8]
    scales = lora_scales(ranks)
    dy, b, s = torch.randn(m, n).to(dtype), torch.randn(n, sum(ranks)), torch.randn(m, sum(ranks))
    got_ds, got_db = kernels.lora_up_grad(dy, b, s, ranks, scales)
    exp_ds, exp_db = ref.lora_up_grad(dy, b, s, ranks, scales)
    dy64 = dy.double().abs()
    assert_bounded(got_ds, exp_ds, dy64 @ b.double().abs() * column_scales(ranks, scales), torch.float32, n)
    assert_bounded(got_db, exp_db, dy64.T @ s.double().abs(), torch.float32, m)


# ---- fused linear forward and backward -------------------------------------------------------------------------


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("base", ["nf4", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["fused", "split"])
def test_lora_linear(m, n, k, base, dtype, path):
    blocksize, nested = (64, True) if m % 2 else (128, False)
    weight, absmax, w32 = base_weight(base, n, k, dtype, blocksize, nested)
    x, bias = torch.randn(m, k).to(dtype), (torch.randn(n) * 0.1).to(dtype)
    s, b = torch.randn(m, 24), torch.randn(n, 24) * 0.1
    got = kernels.lora_linear(x, weight, absmax, blocksize, bias, s, b, path=path)
    expected = ref.lora_linear(x, weight, absmax, blocksize, bias, s, b)
    exact, magnitude = forward_float64(x, w32, s, b, bias)
    assert_bounded(got, expected, magnitude, dtype, k)
    assert_bounded(got, exact.to(dtype), magnitude, dtype, k)  # the float64 formula, rounded once


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("base", ["nf4", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["fused", "split"])
def test_lora_linear_grad_input(m, n, k, base, dtype, path):
    adapters = "three_dropout" if m % 2 else "one"
    blocksize, nested = (128, True) if m % 2 else (64, False)
    weight, absmax, w32 = base_weight(base, n, k, dtype, blocksize, nested)
    a, ranks, seeds, p = stacked_adapters(adapters, k)
    dy, ds = torch.randn(m, n).to(dtype), torch.randn(m, sum(ranks))
    got = kernels.lora_linear_grad_input(dy, weight, absmax, blocksize, ds, a, ranks, seeds, p, path=path)
    expected = ref.lora_linear_grad_input(dy, weight, absmax, blocksize, ds, a, ranks, seeds, p)
    exact, magnitude = grad_input_float64(dy, w32, ds, a, ranks, seeds, p)
    assert_bounded(got, expected, magnitude, dtype, max(n, 16))
    assert_bounded(got, exact.to(dtype), magnitude, dtype, max(n, 16))


def test_lora_linear_without_adapters():
    x, w = torch.randn(7, 40, dtype=torch.float16), torch.randn(24, 40, dtype=torch.float16)
    s, b = torch.zeros(7, 0), torch.zeros(24, 0)
    got = kernels.lora_linear(x, w, None, 64, None, s, b, path="fused")
    assert_bounded(got, ref.lora_linear(x, w, None, 64, None, s, b), x.double().abs() @ w.double().abs().T, torch.float16, 40)


# ---- the op layer and dispatch ---------------------------------------------------------------------------------


def test_ops_route_to_triton_backend():
    m, n, k = 7, 45, 97
    packed, absmax, _ = nf4_weight(n, k, 64, True)
    x, a, b, seeds = torch.randn(m, k, dtype=torch.float16), torch.randn(16, k) / 10, torch.randn(n, 16), draw_seeds(1, "cpu")
    s = {be: ops.lora_down(x, a, [16], seeds, [0.5], [1.5], be) for be in ("triton", "torch")}
    y = {be: ops.lora_linear(x, packed, absmax, 64, None, s["torch"], b, be) for be in ("triton", "torch")}
    torch.testing.assert_close(s["triton"], s["torch"], rtol=1e-5, atol=1e-5)  # fp32, K=97
    torch.testing.assert_close(y["triton"], y["torch"], rtol=2e-3, atol=2e-3)  # fp16 output: 2 ulp


def test_dispatch_choice_is_reported(monkeypatch):
    got = dispatch.choice("forward", "nf4", 16, 4096, 4096, torch.bfloat16)
    assert got.path in dispatch.PATHS and got.source
    assert dispatch.choice("forward", "nf4", 1, 64, 64, torch.float16).path == "fused"
    monkeypatch.setenv(dispatch.ENV_VAR, "split")
    assert dispatch.choice("grad_input", "dense", 1, 64, 64, torch.float16) == ("split", f"forced by {dispatch.ENV_VAR}")


def test_launch_goes_through_the_autotuner_once_per_key(monkeypatch):
    """``common.launch`` tunes through Triton's autotuner on a key's first launch and reuses its choice afterwards
    (skipping the autotuner's per-launch bookkeeping); results stay those of the reference."""
    import importlib

    from fastlora.kernels import common

    kernel = importlib.import_module("fastlora.kernels.lora_linear").lora_linear_kernel
    autotuner_runs = []
    through_autotuner = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **kw: autotuner_runs.append(kw["grid"]) or through_autotuner(*a, **kw))
    monkeypatch.setattr(common, "_TUNED", {})
    n, k = 45, 97
    w, b = torch.randn(n, k, dtype=torch.float16), torch.randn(n, 8)
    for m, tuned in [(3, 1), (5, 1), (16, 1), (17, 2), (3, 2)]:  # buckets 16, 16, 16, 32, 16
        x, s = torch.randn(m, k, dtype=torch.float16), torch.randn(m, 8)
        y = kernels.lora_linear(x, w, None, 0, None, s, b, path="fused")
        want = x.double() @ w.double().T + s.double() @ b.double().T
        torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=2e-3)  # fp16 output, K=97: a few ulp
        assert len(autotuner_runs) == tuned, m


# ---- transposed small-M variants (candidates for the run-time chooser) ------------------------------------------


@pytest.mark.parametrize("m", MS[:3])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("base", ["nf4", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_transposed(m, n, k, base, dtype):
    """Yᵀ = W·Xᵀ tiling with its K splits summed by the last program, against the float64 formula; odd m with a
    DoRA column scale. A second call checks that the split counters were left at zero."""
    from fastlora.kernels.lora_linear_transposed import lora_linear_transposed

    blocksize, nested = (64, True) if m % 2 else (128, False)
    weight, absmax, w32 = base_weight(base, n, k, dtype, blocksize, nested)
    x, bias = torch.randn(m, k).to(dtype), (torch.randn(n) * 0.1).to(dtype)
    s, b = torch.randn(m, 24), torch.randn(n, 24) * 0.1
    col_scale = torch.rand(n) + 0.5 if m % 2 else None
    got = lora_linear_transposed(x, weight, absmax, blocksize, bias, s, b, col_scale)
    assert torch.equal(lora_linear_transposed(x, weight, absmax, blocksize, bias, s, b, col_scale), got)
    exact, magnitude = forward_float64(x, w32, s, b, bias, col_scale)
    assert_bounded(got, exact.to(dtype), magnitude, dtype, k)  # the float64 formula, rounded once


@pytest.mark.parametrize("m", MS[:3])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("base", ["nf4", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_linear_grad_input_transposed(m, n, k, base, dtype):
    from fastlora.kernels.lora_linear_grad_input_transposed import lora_linear_grad_input_transposed

    adapters = "three_dropout" if m % 2 else "one"
    blocksize, nested = (128, True) if m % 2 else (64, False)
    weight, absmax, w32 = base_weight(base, n, k, dtype, blocksize, nested)
    a, ranks, seeds, p = stacked_adapters(adapters, k)
    dy, ds = torch.randn(m, n).to(dtype), torch.randn(m, sum(ranks))
    got = lora_linear_grad_input_transposed(dy, weight, absmax, blocksize, ds, a, ranks, seeds, p)
    exact, magnitude = grad_input_float64(dy, w32, ds, a, ranks, seeds, p)
    assert_bounded(got, exact.to(dtype), magnitude, dtype, max(n, 16))


@pytest.mark.parametrize("module", ["lora_linear_transposed", "lora_linear_grad_input_transposed"])
def test_split_counters_left_by_an_aborted_launch_do_not_poison_the_next(module, monkeypatch):
    """A launch that stops after some splits arrived leaves their tiles' counters non-zero. The next launch must
    still find the last split of each tile and store every element (NaN-poisoned outputs catch a tile never
    stored). Simulated by raising every counter a launch used after it returned."""
    import importlib

    from fastlora.kernels import split_reduce

    launcher = getattr(importlib.import_module(f"fastlora.kernels.{module}"), module)
    used, real = [], split_reduce.tile_counters
    monkeypatch.setattr(split_reduce, "tile_counters", lambda *a: used.append(real(*a)) or used[-1])
    m, n, k = 5, 72, 200
    weight, absmax, w32 = base_weight("dense", n, k, torch.float32)
    if module == "lora_linear_transposed":
        x, s, b = torch.randn(m, k), torch.randn(m, 8), torch.randn(n, 8)
        run = lambda: launcher(x, weight, absmax, 0, None, s, b)  # noqa: E731
    else:
        dy, ds, a = torch.randn(m, n), torch.randn(m, 8), torch.randn(8, k)
        run = lambda: launcher(dy, weight, absmax, 0, ds, a, [8], draw_seeds(1, "cpu"), [0.0])  # noqa: E731
    first = run()
    used[-1].fill_(1)  # what an aborted launch of the old shared counters left behind
    second = run()
    assert not second.isnan().any(), "a tile was never stored"
    assert torch.equal(first, second)


@pytest.mark.parametrize("op", ["forward", "grad_input"])
def test_transposed_kernels_refuse_what_they_do_not_take(op):
    """The few-token kernels are one fused path over dense or NF4 W for at most MAX_FEW_TOKENS tokens: anything
    else is a clear ValueError before any launch (the chooser only offers them where they apply)."""
    from fastlora.kernels import common
    from fastlora.kernels.lora_linear_grad_input_transposed import lora_linear_grad_input_transposed
    from fastlora.kernels.lora_linear_transposed import lora_linear_transposed

    n, k, r = 40, 64, 4
    dense, codes, scb = torch.randn(n, k), torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n) + 1
    a, b = torch.randn(r, k), torch.randn(n, r)

    def call(m, weight, absmax=None, path=None):
        """The op on fresh inputs, and its float64 formula (dense W)."""
        if op == "forward":
            x, s = torch.randn(m, k), torch.randn(m, r)
            got = lora_linear_transposed(x, weight, absmax, 64, None, s, b, path=path)
            return got, x.double() @ dense.double().T + s.double() @ b.double().T
        ds, dy = torch.randn(m, r), torch.randn(m, n)
        got = lora_linear_grad_input_transposed(dy, weight, absmax, 64, ds, a, [r], common.no_seeds(dy.device), [0.0], path)
        return got, dy.double() @ dense.double() + ds.double() @ a.double()

    with pytest.raises(ValueError, match="fused kernel only"):
        call(4, dense, path="split")
    with pytest.raises(ValueError, match="not 8-bit codes"):
        call(4, codes, scb)
    with pytest.raises(ValueError, match=f"at most {common.MAX_FEW_TOKENS} tokens"):
        call(common.MAX_FEW_TOKENS + 1, dense)
    got, exact = call(common.MAX_FEW_TOKENS, dense, path="fused")  # the largest M it takes is served
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)  # fp32 IEEE dots over 64 or 40 terms


def test_nf4_decode_table_layout():
    """The table nf4_tile reads: (high nibble's value, low nibble's value) for each byte, as bitsandbytes packs
    them, then the 16 code values."""
    from fastlora.formats.nf4 import nf4_table
    from fastlora.kernels import common

    table, values = common.nf4_decode_table(torch.device("cpu")), nf4_table("cpu")
    pairs, codes = table[: common.CODE_TABLE_OFFSET].view(256, 2), torch.arange(256)
    assert table.shape == (528,) and torch.equal(table[common.CODE_TABLE_OFFSET :], values)
    assert torch.equal(pairs[:, 0], values[codes >> 4]) and torch.equal(pairs[:, 1], values[codes & 15])
