"""``adapter_names`` mixed batches run as one fused call (each row of the batch with its own adapter, "__base__"
rows with none) and compute what PEFT's ``_mixed_batch_forward`` computes: outputs and gradients, every backend,
dense and NF4 bases; and a tiny Llama trained through mixed batches follows PEFT step for step."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import fastlora
from tests.conftest import lora_layer_model, randomize_lora, tiny_llama_base
from tests.test_layer_parity import CPU_BACKENDS, assert_close_fp32

# Three adapters of different ranks and scales (one rslora); adapter_names below leaves one row on the base.
ADAPTERS = ((4, 8, 0.0, False), (3, 5, 0.0, True), (2, 7, 0.0, False))
NAMES = ["extra1", "default", "__base__", "extra2", "default"]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def run(model, x, dy, adapter_names):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x, adapter_names=adapter_names)
    y.backward(dy)
    return y.detach(), {"x": x.grad, **{n: p.grad for n, p in model.named_parameters() if p.requires_grad}}


def pair(**kwargs):
    state = torch.random.get_rng_state()
    reference = lora_layer_model(**kwargs)
    torch.random.set_rng_state(state)
    return reference, lora_layer_model(**kwargs)


@pytest.mark.parametrize("k,n,t", [(70, 45, 3), (64, 33, 1)])
def test_mixed_batch_matches_peft_fp32(backend, k, n, t):
    reference, patched = pair(k=k, n=n, adapters=ADAPTERS)
    for model in (reference, patched):
        model.eval()  # PeftModel refuses adapter_names while training; gradients still flow in eval mode
    report = fastlora.patch(patched, backend=backend)
    x, dy = torch.randn(len(NAMES), t, k), torch.randn(len(NAMES), t, n)
    y_ref, g_ref = run(reference, x, dy, NAMES)
    y, g = run(patched, x, dy, NAMES)
    assert report.fused_calls == 1 and not report.fallback_calls, report
    # fp32: summation order only (see tests/test_layer_parity.py); the unused adapter-free rows equal the base.
    assert_close_fp32(y, y_ref, "y")
    assert g.keys() == g_ref.keys()
    for key in g_ref:
        assert_close_fp32(g[key], g_ref[key], key)


@pytest.mark.parametrize("k,n", [(70, 45), (128, 64)])
def test_mixed_batch_nf4_output_matches_peft(backend, k, n):
    """NF4 base, outputs only: PEFT's own 4-bit mixed batch cannot backpropagate (it adds into a view of bnb's
    output in place, which autograd forbids). The layers are called directly in training mode (dropout 0), so that
    unpatched bitsandbytes runs dequantize-then-matmul: in eval/no_grad on AVX512-BF16 machines it repacks its
    weight for a bf16 CPU kernel that rounds differently (and asserts on shapes not multiples of 64)."""
    reference, patched = pair(k=k, n=n, base="nf4", adapters=ADAPTERS)
    report = fastlora.patch(patched, backend=backend)
    x = torch.randn(len(NAMES), 2, k)
    with torch.no_grad():
        y_ref = reference.base_model.model.lin(x, adapter_names=NAMES)
        y = patched.base_model.model.lin(x, adapter_names=NAMES)
    assert report.fused_calls == 1 and not report.fallback_calls, report
    assert_close_fp32(y, y_ref, "y")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_batch_half_precision_matches_peft(dtype):
    reference, patched = pair(k=64, n=40, dtype=dtype, adapters=ADAPTERS)
    for model in (reference, patched):
        model.eval()
    fastlora.patch(patched, backend="cpp" if dtype == torch.bfloat16 else "torch")
    x, dy = torch.randn(len(NAMES), 3, 64).to(dtype), torch.randn(len(NAMES), 3, 40).to(dtype)
    (y_ref, g_ref), (y, g) = run(reference, x, dy, NAMES), run(patched, x, dy, NAMES)
    # PEFT rounds the base output and each adapter's output to the dtype before adding them, fastlora rounds once:
    # about one ulp of the output on each side (bf16 2^-8, fp16 2^-11), a few for gradients.
    tol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-9
    for key, expected in {"y": y_ref, **g_ref}.items():
        actual = y if key == "y" else g[key]
        err = (actual.float() - expected.float()).norm() / expected.float().norm()
        assert err < tol, f"{key}: relative error {err:.2e}"


def test_mixed_batch_without_any_adapter_of_the_layer_is_reported():
    model = lora_layer_model(32, 16, adapters=ADAPTERS).eval()
    report = fastlora.patch(model, backend="torch")
    with torch.no_grad():
        model(torch.randn(2, 32), adapter_names=["__base__", "__base__"])
    assert report.fallback_calls == {"adapter_names: no adapter of this layer in the batch": 1}


def test_mixed_batch_errors_stay_peft_errors():
    model = lora_layer_model(32, 16, adapters=ADAPTERS).eval()
    fastlora.patch(model, backend="torch")
    layer = model.base_model.model.lin
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        layer(torch.randn(3, 32), adapter_names=["default"])
    model.merge_adapter(["default"])
    with pytest.raises(ValueError, match="merged adapters"):
        layer(torch.randn(1, 32), adapter_names=["default"])
    model.unmerge_adapter()
    model.add_adapter("dora", LoraConfig(r=2, use_dora=True, target_modules=["lin"]))
    with pytest.raises(ValueError, match="DoRA"):
        layer(torch.randn(1, 32), adapter_names=["dora"])


def test_tiny_llama_mixed_batch_training_matches_peft():
    """10 AdamW steps on a tiny Llama whose every batch mixes two adapters and the base (eval mode: PEFT refuses
    adapter_names in training mode). fp32: summation order only, 1e-4 on a loss of ~4.9 (as the LoRA model test)."""
    batches = [torch.randint(0, 128, (3, 16)) for _ in range(2)]
    names = ["default", "second", "__base__"]
    losses = []
    for patch in (False, True):
        model = tiny_llama_base("dense", dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        model.add_adapter("second", LoraConfig(r=6, lora_alpha=6, target_modules="all-linear"))
        randomize_lora(model, std=0.05)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)  # both adapters train (PEFT marks only the active one)
        report = fastlora.patch(model, backend="cpp") if patch else None
        model.eval()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        run_losses = []
        for step in range(10):
            ids = batches[step % 2]
            loss = model(input_ids=ids, labels=ids, adapter_names=names).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            run_losses.append(loss.item())
        losses.append(run_losses)
    assert report.fused_calls == 14 * 10 and not report.fallback_calls, report
    diff = max(abs(a - b) for a, b in zip(*losses))
    print(f"mixed-batch per-step losses: PEFT {losses[0]}\n fastlora {losses[1]}\n max |diff| {diff:.2e}")
    assert diff < 1e-4
    assert losses[1][-2] < losses[1][0]  # the same batch, 8 steps later: it actually trains


def test_mixed_batch_dropout_exact_against_float64_with_own_masks(backend, monkeypatch):
    """Training mode with dropout (the layer called directly: PeftModel refuses adapter_names while training).
    fastlora's masks are not PEFT's, so the check is against float64 with the same masks (seeds captured): each
    adapter's dropped x over the whole batch, its LoRA term kept on its own rows only."""
    from fastlora.formats.dropout import keep_mask
    from fastlora.functions import lora as autograd

    k, n, t = 40, 24, 3
    adapters = ((4, 8, 0.3, False), (3, 5, 0.1, True), (2, 7, 0.0, False))
    model = lora_layer_model(k, n, adapters=adapters).train()
    fastlora.patch(model, backend=backend)
    captured = []
    real_seeds = autograd._seeds
    monkeypatch.setattr(autograd, "_seeds", lambda a, device: captured.append(real_seeds(a, device)) or captured[-1])
    layer = model.base_model.model.lin
    x, dy = torch.randn(len(NAMES), t, k), torch.randn(len(NAMES), t, n)
    x_in = x.clone().requires_grad_(True)
    y = layer(x_in, adapter_names=NAMES)
    y.backward(dy)

    x64 = x.double().reshape(-1, k).requires_grad_(True)
    y64 = x64 @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    for i, name in enumerate(sorted({a for a in NAMES if a != "__base__"})):  # the plan's adapter order
        p = layer.lora_dropout[name].p if isinstance(layer.lora_dropout[name], torch.nn.Dropout) else 0.0
        dropped = x64 * keep_mask(captured[0][i], p, x64.shape[0], k).double() / (1 - p) if p > 0 else x64
        rows = torch.tensor([a == name for a in NAMES], dtype=torch.float64).repeat_interleave(t)[:, None]
        a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        lora = layer.scaling[name] * (dropped @ a.T) @ b.T
        y64 = y64 + rows * lora
    (gx,) = torch.autograd.grad(y64, x64, dy.double().reshape(-1, n))
    assert_close_fp32(y.detach().reshape(-1, n), y64.float(), "y")
    assert_close_fp32(x_in.grad.reshape(-1, k), gx.float(), "x")
