"""Issue 20's inference-mode reproduction in a fresh process (tests/test_inference_mode.py runs it).

Per case: a patched model's first call of a shape runs under ``torch.inference_mode()``, then the same model and a
second model built afterwards train (forward + backward). Every process-wide cache fastlora fills on a first call
(dropout seeds, constants, NF4 absmax, DoRA norms, plan memo, graph and path choices) is filled under inference
mode first, which is the order that broke training. Gradients are compared with unpatched PEFT on the same
weights and input. Prints one JSON line per case: {"case", "backend", "error" or the largest relative difference}.

Usage::

    python tests/inference_mode_worker.py cpp
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import warnings

import torch
from torch import nn

import fastlora
from fastlora import tuning
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import dora as peft_dora

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from conftest import Wrapper, nf4_linear, randomize_lora  # noqa: E402


def mlp(dtype: torch.dtype) -> nn.Module:
    model = nn.Sequential()
    model.add_module("lin0", nn.Linear(10, 20))
    model.add_module("relu", nn.ReLU())
    model.add_module("lin1", nn.Linear(20, 3))
    return model.to(dtype)


def build(case: str) -> nn.Module:
    """A fresh PEFT model of ``case``, LoRA weights random (so every gradient is non-trivial)."""
    if case == "nf4":
        base, targets, extra = Wrapper(nf4_linear(64, 48, bias=True, compute_dtype=torch.float32), True), ["lin"], {}
    else:
        base, targets = mlp(torch.bfloat16 if case.startswith("dense-bf16") else torch.float32), ["lin0"]
        extra = {"use_dora": True} if case == "dora" else {}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, **extra))
    randomize_lora(model)
    return model


CASES = ("dense", "dense-bf16", "dense-bf16-fp32-gemm", "dora", "nf4")


def gradients(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    model(x).float().square().sum().backward()
    grads = {name: p.grad.float() for name, p in model.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.float()
    return grads


def largest_difference(model: nn.Module, x: torch.Tensor) -> float:
    """Train the patched ``model`` one step on ``x`` and compare every gradient with PEFT's (an unpatched copy)."""
    reference = copy.deepcopy(model)
    fastlora.unpatch(reference)
    report = model.fastlora_report
    fused_before = report.fused_calls
    got, want = gradients(model, x), gradients(reference, x)
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    assert report.fused_calls > fused_before and not report.fallback_calls, report
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)) for k in want)


def patched(case: str, backend: str) -> nn.Module:
    model = build(case)
    model.fastlora_report = fastlora.patch(model, backend=backend)
    assert model.fastlora_report.patched, model.fastlora_report
    return model


#: Cases whose layer graph is forced on the C++ backend: the fp32 node on a bf16 W converts W into the C++ ops'
#: per-thread scratch buffer, which outlives the call (its first use here is under inference mode).
FORCED = {"dense-bf16-fp32-gemm": "lora_layer=native,lora_layer_inference=native"}


def run(case: str, backend: str) -> dict:
    """The case's result; a kernel or graph that failed to launch (a reported fallback, or a candidate left out of
    the timing) is an error too: the caches it read were made under inference mode."""
    forced = FORCED.get(case) if backend == "cpp" else None
    with warnings.catch_warnings(record=True) as caught, tuning.forced(forced) if forced else contextlib.nullcontext():
        warnings.simplefilter("always", tuning.LaunchFallbackWarning)
        result = _run(case, backend)
    failed = [str(w.message) for w in caught if issubclass(w.category, tuning.LaunchFallbackWarning)]
    if failed:
        result["error"] = failed[0]
    return result


def _run(case: str, backend: str) -> dict:
    dtype = torch.bfloat16 if case.startswith("dense-bf16") else torch.float32
    x = torch.randn(5, 64 if case == "nf4" else 10, dtype=dtype)
    first = patched(case, backend)
    first.eval()  # evaluation before training, as PEFT's tests and Trainer do (DoRA caches its norm here)
    with torch.inference_mode():
        first(x)
    first.train()
    result = {"case": case, "backend": backend}
    try:
        result["same_model"] = largest_difference(first, x)
        result["second_model"] = largest_difference(patched(case, backend), x)
    except RuntimeError as err:
        result["error"] = str(err).splitlines()[0]
    return result


if __name__ == "__main__":
    torch.manual_seed(0)
    peft_dora.ENABLE_DORA_CACHING = True
    for case in CASES:
        print(json.dumps(run(case, sys.argv[1])), flush=True)
