"""``fastlora.patch(model, backend="triton")`` on the tiny Llama (QLoRA and dense-base LoRA), on CPU under Triton's
interpreter: per-step training losses match the torch reference backend.

    TRITON_INTERPRET=1 python -m pytest tests/test_triton_model.py

Both backends draw the same dropout seeds (same generator state) and share the mask hash, so the runs differ
only in summation order: fp32 compute agrees to ~1e-6 per step, which a few AdamW steps keep below 1e-4 on a
loss of ~4.9. Skipped without the interpreter (the GPU run of the same comparison is in the gpu tests).
"""

from __future__ import annotations

import os

import pytest
import torch

import fastlora
from tests.conftest import tiny_llama_peft
from tests.test_model_parity import train

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1",
        reason="interpreter test: run `TRITON_INTERPRET=1 python -m pytest tests/test_triton_model.py`",
    ),
]

STEPS = 3  # the interpreter runs ~80 kernel launches per step


@pytest.mark.parametrize("kind", ["qlora", "dense"])
def test_fp32_dropout_training_matches_torch_backend(kind):
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(STEPS)]
    losses = {}
    for backend in ("torch", "triton"):
        model = tiny_llama_peft(kind, dtype=torch.float32, dropout=0.1)
        report = fastlora.patch(model, backend=backend)
        assert len(report.patched) == 14 and not report.skipped
        torch.manual_seed(1234)  # the same dropout seeds for both backends
        losses[backend] = train(model, batches)
        assert report.fused_calls == 14 * STEPS and not report.fallback_calls
    diff = max(abs(a - b) for a, b in zip(losses["torch"], losses["triton"]))
    print(f"per-step losses: torch {losses['torch']}\n triton {losses['triton']}\n max |diff| {diff:.2e}")
    assert diff < 1e-4
