"""Autotuning with several configs gives what one config gives, for the kernels that accumulate into an output or
count split arrivals, and costs no copy for launches that only store (``kernels.common.TrialHooks``).

The interpreter normally prunes every kernel to one config (nothing is benchmarked); here the pruner offers three
interpreter-sized configs and Triton's benchmark is replaced by one that runs each trial three times and makes the
last config win, so every trial after the first runs on the tensors the earlier ones wrote to.

    TRITON_INTERPRET=1 python -m pytest -m interpreter tests/test_autotune_trials.py
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1"),
]

if os.environ.get("TRITON_INTERPRET") == "1":
    import triton

    from fastlora.kernels import common, lora_linear_grad_input_transposed, lora_linear_transposed
    from fastlora.kernels.lora_linear import lora_linear, lora_linear_kernel
    from fastlora.kernels.lora_linear_grad_input import lora_linear_grad_input, lora_linear_grad_input_kernel

TRIALS_PER_CONFIG = 3


def gemm_configs():
    return [common.gemm_config(bm, bn, bk, 4, 1, group_m=2) for bm, bn, bk in ((32, 32, 32), (16, 32, 16), (32, 16, 32))]


def split_configs(block_names, split_name):
    """Three configs of a transposed kernel: no split, 2 and 4 splits (its workspace holds 4)."""
    outer, tokens, inner = block_names
    return [
        triton.Config({outer: 32, tokens: 16, inner: 32, split_name: split}, num_warps=4, num_stages=1)
        for split in (1, 2, 4)
    ]


class Trials:
    """What the patched autotuner saw: per pre-hook call, whether it saved a copy; per trial, the output."""

    def __init__(self):
        self.copies: list[bool] = []
        self.outputs: list[torch.Tensor] = []


@pytest.fixture
def tune(monkeypatch):
    """``tune(kernel, configs, output=None)``: the kernel's next first launch benchmarks ``configs`` (the last one
    wins). With ``output`` (an argument the kernel only stores), that argument is set to NaN before each trial and
    kept after it, so a trial that stores nothing shows. Returns the :class:`Trials`."""

    def set_up(kernel, configs, output=None):
        offer(monkeypatch, kernel, configs)
        trials = Trials()
        benchmarked = []  # one entry per config timed

        def do_bench(kernel_call, quantiles):
            for _ in range(TRIALS_PER_CONFIG):
                if output is not None:
                    kernel.nargs[output].fill_(float("nan"))
                kernel_call()
                if output is not None:
                    trials.outputs.append(kernel.nargs[output].clone())
            benchmarked.append(kernel_call)
            return [float(len(configs) - len(benchmarked))] * 3  # later configs time faster

        pre_hook = kernel.pre_hook

        def counting_pre_hook(args, reset_only=False):
            pre_hook(args, reset_only)
            # TrialHooks.saved holds the copies made for this trial (a kernel without TrialHooks makes none).
            trials.copies.append(bool(getattr(getattr(pre_hook, "__self__", None), "saved", None)))

        monkeypatch.setitem(vars(kernel), "do_bench", do_bench)  # over the cached_property, never evaluated
        monkeypatch.setattr(kernel, "pre_hook", counting_pre_hook)
        return trials

    return set_up


def offer(monkeypatch, kernel, configs):
    """The kernel's next first launch chooses among ``configs`` (one: it runs it, nothing is benchmarked)."""
    monkeypatch.setattr(common, "_TUNED", {})
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "early_config_prune", lambda *args, **kwargs: list(configs))


def single(monkeypatch, kernel, config):
    offer(monkeypatch, kernel, [config])


def assert_same(tuned, single_config):
    # fp32 sums over K <= 97 in another tile order: a few ulps. A compounded or unstored output is off by O(1).
    torch.testing.assert_close(tuned, single_config, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["split", "fused"])
def test_lora_linear_autotuned_matches_one_config_and_copies_only_when_accumulating(tune, monkeypatch, path):
    torch.manual_seed(0)
    m, n, k, r = 37, 45, 97, 8
    x, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    s, b = torch.randn(m, r), torch.randn(n, r)
    configs = gemm_configs()
    trials = tune(lora_linear_kernel, configs)
    tuned = lora_linear(x, w, None, 0, bias, s, b, path=path)
    # The split path (BASE=0) adds onto the cuBLAS product in y: a copy before each trial, none for the chosen
    # config's run; the fused path only stores y: no copy at all.
    count = len(configs) * TRIALS_PER_CONFIG
    assert trials.copies == ([True] * count if path == "split" else [False] * count) + [False]
    single(monkeypatch, lora_linear_kernel, configs[-1])
    assert_same(tuned, lora_linear(x, w, None, 0, bias, s, b, path=path))


def test_lora_linear_grad_input_autotuned_split_path_matches_one_config(tune, monkeypatch):
    torch.manual_seed(1)
    m, n, k, r = 33, 40, 70, 16
    dy, w, ds, a = torch.randn(m, n), torch.randn(n, k), torch.randn(m, r), torch.randn(r, k)
    seeds = torch.zeros(1, dtype=torch.int64)
    configs = gemm_configs()
    trials = tune(lora_linear_grad_input_kernel, configs)
    tuned = lora_linear_grad_input(dy, w, None, 0, ds, a, [r], seeds, [0.0], path="split")
    assert trials.copies.count(True) == len(configs) * TRIALS_PER_CONFIG
    single(monkeypatch, lora_linear_grad_input_kernel, configs[-1])
    assert_same(tuned, lora_linear_grad_input(dy, w, None, 0, ds, a, [r], seeds, [0.0], path="split"))


def test_split_k_transposed_forward_autotuned_matches_one_config(tune, monkeypatch):
    """Every trial's split sum counts arrivals from zero: without the reset, a split trial after the first stores
    no y (its timing then leaves out the sum and the store), nor does the chosen config's run."""
    torch.manual_seed(2)
    m, n, k, r = 5, 45, 97, 8
    x, w, s, b = torch.randn(m, k), torch.randn(n, k), torch.randn(m, r), torch.randn(n, r)
    kernel = lora_linear_transposed.lora_linear_transposed_kernel
    configs = split_configs(("BLOCK_N", "BLOCK_M", "BLOCK_K"), "SPLIT_K")
    trials = tune(kernel, configs, output="y_ptr")
    tuned = lora_linear_transposed.lora_linear_transposed(x, w, None, 0, None, s, b)
    single(monkeypatch, kernel, configs[-1])
    expected = lora_linear_transposed.lora_linear_transposed(x, w, None, 0, None, s, b)
    assert_same(tuned, expected)
    assert len(trials.outputs) == len(configs) * TRIALS_PER_CONFIG
    for output in trials.outputs:
        assert_same(output, expected)


def test_split_n_transposed_grad_input_autotuned_matches_one_config(tune, monkeypatch):
    torch.manual_seed(3)
    m, n, k, r = 3, 97, 45, 4
    dy, w, ds, a = torch.randn(m, n), torch.randn(n, k), torch.randn(m, r), torch.randn(r, k)
    seeds = torch.zeros(1, dtype=torch.int64)
    kernel = lora_linear_grad_input_transposed.lora_linear_grad_input_transposed_kernel
    configs = split_configs(("BLOCK_K", "BLOCK_M", "BLOCK_N"), "SPLIT_N")
    trials = tune(kernel, configs, output="dx_ptr")
    launch = lora_linear_grad_input_transposed.lora_linear_grad_input_transposed
    tuned = launch(dy, w, None, 0, ds, a, [r], seeds, [0.0])
    single(monkeypatch, kernel, configs[-1])
    expected = launch(dy, w, None, 0, ds, a, [r], seeds, [0.0])
    assert_same(tuned, expected)
    assert len(trials.outputs) == len(configs) * TRIALS_PER_CONFIG
    for output in trials.outputs:
        assert_same(output, expected)
