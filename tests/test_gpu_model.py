"""The patched model on a CUDA GPU (skipped without one): tiny Llama parity with PEFT for backend "triton", and
CUDA-graph capture of a patched layer's forward+backward.

    python -m pytest -m gpu tests
"""

from __future__ import annotations

import pytest
import torch

import fastlora
from tests.conftest import lora_layer_model, tiny_llama_peft
from tests.test_model_parity import STEPS, max_abs_diff, train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kind", ["qlora", "dense"])
def test_tiny_llama_triton_matches_peft_on_gpu(kind):
    data = [torch.randint(0, 128, (2, 64), device="cuda") for _ in range(2)]
    batches = [data[i % 2] for i in range(STEPS)]
    reference = tiny_llama_peft(kind, dtype=torch.bfloat16).cuda()
    patched = tiny_llama_peft(kind, dtype=torch.bfloat16).cuda()
    report = fastlora.patch(patched, backend="triton")
    assert set(report.patched.values()) == {"triton"} and not report.skipped
    ref_losses, losses = train(reference, batches), train(patched, batches)
    assert report.fused_calls == 14 * STEPS and not report.fallback_calls
    # Same bf16 tolerance as the CPU parity test (tests/test_model_parity.py).
    assert max_abs_diff(ref_losses, losses) < 2e-2
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_cuda_graph_capture_of_patched_forward_backward(base):
    m, k, n = 64, 256, 192
    model = lora_layer_model(k, n, base=base, dtype=torch.bfloat16, adapters=((16, 32, 0.0, False),)).cuda()
    fastlora.patch(model, backend="triton")
    params = [p for p in model.parameters() if p.requires_grad]
    static_x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    static_dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step():
        y = model(static_x)
        y.backward(static_dy)
        return y

    # Warm up on a side stream (autotuning, absmax cache, launch tables) before capture, as CUDA graphs require.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()

    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    replayed_y, replayed_grads = static_y.clone(), [p.grad.clone() for p in params]

    for p in params:
        p.grad = None
    eager_y = model(new_x)
    eager_y.backward(static_dy)
    # Same kernels, same inputs: replay equals eager exactly.
    assert torch.equal(replayed_y, eager_y.detach())
    for got, p in zip(replayed_grads, params):
        assert torch.equal(got, p.grad)
