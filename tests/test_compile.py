"""``torch.compile`` on patched models: the fused LoRA linear is a handful of opaque ``fastlora::`` custom ops
(fake implementations in fastlora/ops.py) inside one graph, with no graph break, no recompilation from step to
step, and forward + backward results equal to eager.

Compiling is slow on a 2-core CPU, so the whole tiny Llama goes through dynamo + AOTAutograd with the
``aot_eager`` backend (which traces forward and backward through the fake implementations, the part that is
fastlora's) and only a single patched layer through the default inductor backend.
"""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora import backends
from tests.conftest import lora_layer_model, tiny_llama_peft

BEST_CPU_BACKEND = backends.resolve("auto", "cpu")
LORA_LAYERS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)
MODELS = {"qlora-bf16": ("qlora", torch.bfloat16), "dense-fp32": ("dense", torch.float32)}


def patched_llama(kind_name):
    kind, dtype = MODELS[kind_name]
    model = tiny_llama_peft(kind, dtype=dtype)
    report = fastlora.patch(model, backend=BEST_CPU_BACKEND)
    assert len(report.patched) == LORA_LAYERS
    return model, report


def fastlora_op_counts(graph_modules) -> dict[str, int]:
    """fastlora ops per name in the graphs, including the forward/backward bodies dynamo traces for an
    autograd.Function (sub-GraphModules)."""
    counts: dict[str, int] = {}
    for gm in graph_modules:
        for sub in gm.modules():
            if not isinstance(sub, torch.fx.GraphModule):
                continue
            for node in sub.graph.nodes:
                name = str(node.target)
                if node.op == "call_function" and name.startswith("fastlora."):
                    counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind_name", list(MODELS))
def test_patched_model_is_one_graph_with_opaque_fused_ops(kind_name):
    model, _ = patched_llama(kind_name)
    ids = torch.randint(0, 128, (2, 16))
    explanation = torch._dynamo.explain(model)(input_ids=ids, labels=ids)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    # Each LoRA layer's forward is one lora_down (S = x·Aᵀ) and one lora_linear (base GEMM + epilogue) node, its
    # backward one lora_up_grad and one lora_down_grad (plus lora_linear_grad_input where x needs a gradient):
    # opaque ops, not the reference's decomposition.
    counts = fastlora_op_counts(explanation.graphs)
    for op in ("lora_down", "lora_linear", "lora_up_grad", "lora_down_grad"):
        assert counts.get(f"fastlora.{op}.default") == LORA_LAYERS, counts


def training_steps(model, batches):
    """AdamW steps; per step the loss and the adapter gradients (keyed without torch.compile's ``_orig_mod.``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    losses, grads = [], []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n.replace("_orig_mod.", ""): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind_name", list(MODELS))
def test_compiled_training_matches_eager(kind_name):
    torch._dynamo.reset()  # graphs compiled for another model (dtype) by an earlier test are not a recompile here
    eager, _ = patched_llama(kind_name)
    compiled_model, report = patched_llama(kind_name)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(3)]
    eager_losses, eager_grads = training_steps(eager, batches)
    calls_before = report.fused_calls
    # The first step compiles; the next ones must reuse the graph (a Python int read under compile, such as a
    # call counter, would make dynamo guard on it and recompile every step).
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses, grads = training_steps(compiled, batches)
    print(f"{kind_name}: eager {eager_losses}\ncompiled {losses}")
    # aot_eager runs the same kernels in the same order: fp32 agrees to rounding (1e-6 on a loss of ~4.85); in
    # bf16 AOTAutograd's decompositions of the surrounding ops (RMSNorm, rotary) may round a few values
    # differently: 1e-2, as for one bf16 rounding per layer.
    tol = 1e-5 if kind_name == "dense-fp32" else 1e-2
    assert max(abs(a - b) for a, b in zip(losses, eager_losses)) < tol
    for step_grads, step_eager in zip(grads, eager_grads):
        for name, grad in step_grads.items():
            torch.testing.assert_close(grad.float(), step_eager[name].float(), rtol=tol * 10, atol=tol)
    # Calls inside a compiled region are not counted (counting would recompile); the op count test above is the
    # evidence that the compiled graph runs the fused ops.
    assert report.fused_calls == calls_before


@pytest.mark.timeout(180)
@pytest.mark.parametrize("base, dtype", [("dense", torch.float32), ("nf4", torch.bfloat16)])
def test_inductor_compiled_layer_matches_eager(base, dtype):
    model = lora_layer_model(64, 96, base=base, dtype=dtype, adapters=((4, 8, 0.0, False), (2, 4, 0.0, True)))
    fastlora.patch(model, backend=BEST_CPU_BACKEND)
    x = torch.randn(3, 8, 64, dtype=dtype)

    def forward_backward(module):
        x_leaf = x.clone().requires_grad_(True)
        y = module(x_leaf)
        (y.float() ** 2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad] + [x_leaf.grad]
        model.zero_grad(set_to_none=True)
        return y.detach(), grads

    y_eager, grads_eager = forward_backward(model)
    y_compiled, grads_compiled = forward_backward(torch.compile(model, fullgraph=True))
    # Inductor calls the same custom-op kernels and only fuses the glue around them (casts, slicing the gradients):
    # agreement to a few ulps of the dtype.
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y_compiled.float(), y_eager.float(), rtol=tol, atol=tol)
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
