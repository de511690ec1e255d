"""Chunked RMSNorm (fastlora.training.rms_norm, ``patch(chunked_norms=True)``) against transformers' own RMSNorm modules.

Tolerances: both compute each row in fp32 from the same input and round once to the input dtype. Forward does the
same operations row by row (equal outputs, checked to 1e-6 relative in fp32 and to one bf16 rounding, 2^-8, in
bf16). Backward uses the closed form r·(g - n·mean(g·n)) instead of autograd's chain of ops: the same value up
to fp32 reassociation (1e-5 relative in fp32) before the final rounding (one bf16 step, 2^-7 relative, in bf16).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

import fastlora
from fastlora.training import rms_norm
from tests.conftest import TINY_LLAMA, tiny_llama_peft
from tests.test_trainers import BEST_CPU_BACKEND

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2**-7, atol=2**-7)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen3RMSNorm])
def test_matches_transformers_norm_over_several_chunks(norm_class, dtype, monkeypatch):
    monkeypatch.setattr(rms_norm, "CHUNK_ELEMENTS", 5 * 48)  # 5 rows per chunk: 37 rows end on a partial chunk
    norm = norm_class(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = (torch.randn(1, 37, 48) * 3).to(dtype).requires_grad_()
    g = torch.randn(1, 37, 48).to(dtype)
    ref = norm(x)
    ref_dx, ref_dw = torch.autograd.grad(ref, [x, norm.weight], g)
    y = rms_norm.rms_norm(x, norm.weight, norm.variance_epsilon)
    dx, dw = torch.autograd.grad(y, [x, norm.weight], g)
    assert y.dtype == ref.dtype and dx.dtype == x.dtype and dw.dtype == norm.weight.dtype
    torch.testing.assert_close(y, ref, **({"rtol": 1e-6, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 2**-8}))
    torch.testing.assert_close(dx, ref_dx, **TOL[dtype])
    torch.testing.assert_close(dw, ref_dw, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * 37)  # a sum over 37 rows


def test_saves_only_input_and_one_float_per_row():
    x = torch.randn(64, 32, requires_grad=True)
    weight = torch.ones(32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm.rms_norm(x, weight, 1e-6)
    assert sorted(t.numel() for t in saved) == [32, 64, 64 * 32]


def test_patched_model_gradients_match_and_unfamiliar_norms_are_reported():
    model = tiny_llama_peft("dense", dtype=torch.float32)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 19))
    grads = []
    for chunked in (False, True):
        report = fastlora.patch(model, backend=BEST_CPU_BACKEND, chunked_norms=chunked)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        model.zero_grad(set_to_none=True)
        fastlora.unpatch(model)
    assert report.chunked_norms == "5 RMSNorms chunked, saving x and rstd only" and not report.unchunked_norms
    for name, g in grads[1].items():
        torch.testing.assert_close(g, grads[0][name], rtol=1e-5, atol=1e-7)
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, LlamaRMSNorm))
    assert rms_norm.refusal(GemmaRMSNorm(8)).startswith("GemmaRMSNorm: not one of the Llama-form RMSNorms")
