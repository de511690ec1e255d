"""A tiny QLoRA Llama trained with the C++ backend matches the torch reference backend step for step.

Both backends compute every fused op in fp32 and round at the same points, so only GEMM summation order
differs: fp32 compute agrees to ~1e-6 per step, bf16 compute to a bf16 rounding flip now and then, which 10 steps
of AdamW amplify to ~1e-3 at most on a loss of ~4.9.
"""

from __future__ import annotations

import shutil

import pytest
import torch

import fastlora
from fastlora.backends import cpp
from tests.conftest import tiny_llama_peft
from tests.test_model_parity import train

if shutil.which("c++") is None:
    pytest.skip("no C++ compiler: the cpp backend falls back to torch here", allow_module_level=True)

STEPS = 10
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


# The standard QLoRA recipe (bf16 compute, dropout) and PEFT's fastest CPU setting (fp32 compute).
@pytest.mark.parametrize("dtype,dropout", [(torch.bfloat16, 0.1), (torch.float32, 0.0)], ids=["bf16_dropout", "fp32"])
def test_qlora_training_cpp_matches_torch_backend(dtype, dropout):
    assert cpp.unavailable_reason() is None, cpp.unavailable_reason()
    data = [torch.randint(0, 128, (2, 24)) for _ in range(2)]
    batches = [data[i % 2] for i in range(STEPS)]
    losses = {}
    for backend in ("torch", "cpp"):
        model = tiny_llama_peft("qlora", dtype=dtype, dropout=dropout)
        report = fastlora.patch(model, backend=backend)
        assert set(report.patched.values()) == {backend} and len(report.patched) == 14
        # Same seed for both runs: the dropout masks are drawn from torch's generator, one seed per call.
        torch.manual_seed(1234)
        losses[backend] = train(model, batches)
        assert report.fused_calls == 14 * STEPS and not report.fallback_calls
    diff = max(abs(a - b) for a, b in zip(losses["torch"], losses["cpp"]))
    print(f"{dtype} dropout {dropout}: torch {losses['torch']}\n cpp {losses['cpp']}\n max |diff| {diff:.2e}")
    assert diff < LOSS_TOLERANCE[dtype]
    assert losses["cpp"][-1] < losses["cpp"][0]  # it actually trains
