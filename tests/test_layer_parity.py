"""A patched PEFT LoRA layer computes what the unpatched layer computes: outputs and the gradients of x, every A,
every B and the base bias, for dense and NF4 bases, fp32 and half precision, several adapters and dropout."""

from __future__ import annotations

import pytest
import torch

import fastlora
from fastlora.formats.dropout import draw_seeds, keep_mask
from fastlora.memory.tracker import quant_state_tensors
from tests.conftest import lora_layer_model

from fastlora.backends import unavailable_reason

# Every backend that serves CPU tensors in this process. Triton's interpreter is switched on per process, so its
# cases are marked for the interpreter run (scripts/test.sh runs them in a process of their own) and skip elsewhere.
CPU_BACKENDS = [name for name in ("torch", "cpp") if unavailable_reason(name, "cpu") is None] + [
    pytest.param(
        "triton",
        marks=[
            pytest.mark.interpreter,
            pytest.mark.skipif(unavailable_reason("triton", "cpu") is not None, reason="needs TRITON_INTERPRET=1"),
        ],
    )
]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


def run(model, x, dy):
    """Output and gradients (x, bias, adapter weights) of one forward+backward."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    grads = {"x": x.grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[name] = p.grad
    return y.detach(), grads


def assert_close_fp32(actual, expected, name=""):
    """fp32 parity: 1e-5 relative, with the absolute floor scaled to the tensor's magnitude, since an element that
    is a cancelling sum of M or N terms carries rounding of the size of its terms, not of itself."""
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=lambda s: f"{name}: {s}")


def assert_patched_matches_peft_fp32(model, backend, x, dy, n_grads):
    """One forward+backward of ``model`` (a PEFT model around one layer "lin") before and after patching it with
    ``backend``: the layer fused, one fused call and no fallback, and the output and every gradient (``n_grads`` of
    them: x, trainable base parameters, A and B per adapter) equal to PEFT's within fp32 parity."""
    y_ref, g_ref = run(model, x, dy)
    report = fastlora.patch(model, backend=backend)
    assert report.patched == {"base_model.model.lin": backend} and not report.skipped
    y, g = run(model, x, dy)
    assert report.fused_calls == 1 and not report.fallback_calls
    assert_close_fp32(y, y_ref)
    assert g.keys() == g_ref.keys() and len(g) == n_grads
    for name in g:
        assert_close_fp32(g[name], g_ref[name], name)


BF16_ROUNDOFF = 2.0**-8  # unit roundoff: half the spacing of bf16 numbers at 1.0


def assert_bf16_autocast_close(y, g, y_ref, g_ref):
    """A patched layer's bf16-autocast output and gradients against PEFT's, relative to each tensor's scale s.
    Output: each side rounds its result to bf16 once (u·s each), PEFT also rounds its base term before the add
    (u·s) and the LoRA chain x·A, ·B, ·scaling (3u of a term smaller than s): 4u·s bounds it (seen: up to 2.03u·s,
    so 2u was flaky). Gradients: the same roundings in the backward GEMMs, 4u·s (seen: up to 2.05u·s)."""
    assert y.dtype == y_ref.dtype == torch.bfloat16
    bound = 4 * BF16_ROUNDOFF
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=bound * y_ref.float().abs().max().item())
    for name in g:
        ref = g_ref[name].float()
        torch.testing.assert_close(
            g[name].float(), ref, rtol=0, atol=bound * ref.abs().max().item(), msg=lambda s: f"{name}: {s}"
        )



def layer_of(model):
    return model.base_model.model.lin


def float64_reference(model, x, dy, seeds=None):
    """The LoRA linear in float64 from the layer's own tensors (dequantized exactly for NF4), with the given masks."""
    layer = layer_of(model)
    base = layer.get_base_layer()
    if hasattr(base.weight, "quant_state"):
        from fastlora.functions.nf4_weight import NF4Weight

        w = NF4Weight.from_params4bit(base.weight).dequantize(torch.float32).double()
    else:
        w = base.weight.double()
    x64 = x.double().detach().requires_grad_(True)
    y = x64 @ w.T
    if base.bias is not None:
        y = y + base.bias.double()
    for i, name in enumerate(layer.active_adapters):
        a, b = layer.lora_A[name].weight.double(), layer.lora_B[name].weight.double()
        drop_x = x64
        p = layer.lora_dropout[name].p if isinstance(layer.lora_dropout[name], torch.nn.Dropout) else 0.0
        if p > 0 and layer.training:
            keep = keep_mask(seeds[i], p, x.shape[0], x.shape[1]).double()
            drop_x = x64 * keep / (1 - p)
        y = y + layer.scaling[name] * (drop_x @ a.T) @ b.T
    (gx,) = torch.autograd.grad(y, x64, dy.double())
    return y.detach(), gx


CASES = [
    # (M, K, N): a single token, odd sizes, K not a multiple of the NF4 block size, more tokens than features.
    (1, 33, 17),
    (7, 64, 45),
    (130, 70, 96),
]


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("m,k,n", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n_adapters", [1, 2])
def test_fp32_parity_with_peft(base, m, k, n, bias, n_adapters, backend):
    adapters = ((4, 8, 0.0, False), (3, 5, 0.0, True))[:n_adapters]  # second adapter uses rslora scaling
    model = lora_layer_model(k, n, base=base, dtype=torch.float32, bias=bias, adapters=adapters)
    if bias:
        layer_of(model).get_base_layer().bias.requires_grad_(True)
    # fp32 end to end: the only differences are summation order (K <= 130 terms): 1e-5 relative is ~100 ulps.
    assert_patched_matches_peft_fp32(model, backend, torch.randn(m, k), torch.randn(m, n), 1 + 2 * n_adapters + bias)


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("m,k,n", CASES[1:])
def test_inference_forward(base, m, k, n, backend):
    """Under no_grad, and with frozen adapters, the patched layer runs its ops without an autograd node: the output
    equals the training forward's bit for bit (same ops, same order) and PEFT's within fp32 rounding."""
    adapters = ((4, 8, 0.0, False), (3, 5, 0.0, True))
    model = lora_layer_model(k, n, base=base, dtype=torch.float32, bias=True, adapters=adapters)
    x = torch.randn(m, k)
    with torch.no_grad():
        y_peft = model(x)
    report = fastlora.patch(model, backend=backend)
    y_train = model(x.clone().requires_grad_(True))
    with torch.no_grad():
        y_no_grad = model(x)
    for p in model.parameters():
        p.requires_grad_(False)
    y_frozen = model(x)
    assert report.fused_calls == 3 and not report.fallback_calls
    assert y_train.grad_fn is not None and y_no_grad.grad_fn is None and y_frozen.grad_fn is None
    assert torch.equal(y_no_grad, y_train.detach()) and torch.equal(y_frozen, y_no_grad)
    assert_close_fp32(y_no_grad, y_peft)


def relative_error(a, ref):
    """‖a − ref‖ / ‖ref‖ over the whole tensor, with ``ref`` float64."""
    return ((a.double() - ref).norm() / ref.norm()).item()


def assert_half_output_no_worse_than_peft(y, gx, y_peft, gx_peft, y64, gx64, dtype):
    """A half-precision layer's output and input gradient against float64 on the same inputs: fastlora's error no
    larger than PEFT's by more than half an output ulp (one rounding of the result), and the output within 2 ulps."""
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert relative_error(y, y64) <= relative_error(y_peft, y64) + 0.5 * ulp
    assert relative_error(y, y64) < 2 * ulp
    assert relative_error(gx, gx64) <= relative_error(gx_peft, gx64) + 0.5 * ulp


@pytest.mark.parametrize("base", ["dense", "nf4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", CASES[1:])
def test_half_precision_no_worse_than_peft(base, dtype, m, k, n, backend):
    """In bf16/fp16, PEFT rounds the base output and the LoRA term separately; fastlora accumulates both in fp32
    and rounds once. Both are compared with a float64 computation on the same (half) inputs: fastlora's error
    must not exceed PEFT's by more than half an output ulp's worth, and both stay within a few ulps."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter's bf16 tl.dot is wrong (triton#11584); bf16 runs in the GPU tests")
    model = lora_layer_model(k, n, base=base, dtype=dtype, adapters=((4, 8, 0.0, False), (2, 4, 0.0, False)))
    x, dy = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
    y_peft, g_peft = run(model, x, dy)
    y64, gx64 = float64_reference(model, x, dy)
    fastlora.patch(model, backend=backend)
    y, g = run(model, x, dy)
    assert y.dtype == y_peft.dtype == dtype and g["x"].dtype == dtype
    assert_half_output_no_worse_than_peft(y, g["x"], y_peft, g_peft["x"], y64, gx64, dtype)
    # Adapter gradients are fp32 in both, computed from the same half-precision x and dy. The Triton kernels run the
    # LoRA branch of a half-precision model with TF32 dots (fastlora.kernels.common.dot_precision): operands keep
    # 11 significant bits, so a product carries up to 2**-10 relative error, and a sum that cancels carries it
    # relative to its terms (hence the floor scaled to the tensor's largest value). fp32 backends: fp32 parity, the
    # same floor for the same reason (a sum of M=130 terms in another order: seen up to 6e-7 of the largest value).
    for name in g:
        if name != "x":
            if backend == "triton":
                torch.testing.assert_close(
                    g[name], g_peft[name], rtol=2.0**-10, atol=2.0**-10 * g_peft[name].abs().max().item(),
                    msg=lambda s: f"{name}: {s}",
                )
            else:
                assert_close_fp32(g[name], g_peft[name], name)


@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_quant_layouts(blocksize, nested, backend):
    model = lora_layer_model(200, 24, base="nf4", dtype=torch.float32, blocksize=blocksize, nested=nested)
    x, dy = torch.randn(5, 200), torch.randn(5, 24)
    y_ref, g_ref = run(model, x, dy)
    fastlora.patch(model, backend=backend)
    y, g = run(model, x, dy)
    assert_close_fp32(y, y_ref)
    for name in g:
        assert_close_fp32(g[name], g_ref[name], name)


def test_autocast_dense_fp32_base(backend):
    """Under bf16 autocast PEFT runs the base and the LoRA matmuls in bf16; fastlora runs the base in bf16 (as
    autocast would) and the LoRA term in fp32: outputs agree to bf16 precision, dtype is autocast's."""
    if backend == "triton":
        pytest.skip("bf16 autocast: the Triton interpreter's bf16 tl.dot is wrong (triton#11584)")
    model = lora_layer_model(64, 48, base="dense", dtype=torch.float32)
    x, dy = torch.randn(9, 64), torch.randn(9, 48, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, g_ref = run(model, x, dy)
    fastlora.patch(model, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, g = run(model, x, dy)
    assert_bf16_autocast_close(y, g, y_ref, g_ref)


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_dropout_matches_masked_reference(base, backend):
    """Training-mode dropout: fastlora's masks are its own counter-based masks (PEFT draws different ones from
    torch's RNG), so the check is exact against a float64 computation with those masks, per adapter."""
    m, k, n = 33, 70, 40
    model = lora_layer_model(k, n, base=base, adapters=((4, 8, 0.3, False), (2, 2, 0.1, False)))
    model.train()
    fastlora.patch(model, backend=backend)
    x, dy = torch.randn(m, k), torch.randn(m, n)
    torch.manual_seed(1234)
    seeds = draw_seeds(2, "cpu")
    torch.manual_seed(1234)
    y, g = run(model, x, dy)
    y64, gx64 = float64_reference(model, x, dy, seeds)
    assert_close_fp32(y, y64.float())
    assert_close_fp32(g["x"], gx64.float())
    # Eval mode turns dropout off: output equals PEFT's eval output.
    model.eval()
    y_eval, _ = run(model, x, dy)
    fastlora.unpatch(model)
    y_peft_eval, _ = run(model, x, dy)
    assert_close_fp32(y_eval, y_peft_eval)


def test_dropout_statistics_match_peft(backend):
    """Same keep probability and 1/(1-p) scaling as PEFT's nn.Dropout: the LoRA term's mean and variance over many
    dropout draws agree with PEFT's (masks themselves differ)."""
    k, n, p = 64, 8, 0.25
    model = lora_layer_model(k, n, base="dense", bias=False, adapters=((4, 8, p, False),))
    model.train()
    x = torch.randn(512, k)
    layer = layer_of(model)

    def lora_term():
        with torch.no_grad():
            return model(x) - layer.get_base_layer()(x)

    peft_terms = torch.stack([lora_term() for _ in range(20)])
    fastlora.patch(model, backend=backend)
    ours = torch.stack([lora_term() for _ in range(20)])
    # 20 x 512 x 8 samples: means and spreads agree to a few percent.
    torch.testing.assert_close(ours.mean(0).mean(), peft_terms.mean(0).mean(), rtol=0.05, atol=0.01)
    torch.testing.assert_close(ours.std(), peft_terms.std(), rtol=0.05, atol=0)
    # Different calls draw different masks.
    assert not torch.equal(ours[0], ours[1])


def saved_activation_bytes(output: torch.Tensor, model: torch.nn.Module) -> int:
    """Bytes of distinct storages the autograd graph of ``output`` keeps for backward, excluding the model's own
    parameters and buffers (persistent memory, not activations; bitsandbytes' quant state included). Walks the graph
    rather than using saved-tensor hooks because bitsandbytes' MatMul4Bit keeps x on ``ctx.tensors``, bypassing them."""
    persistent = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    states = [p.quant_state for p in model.parameters() if getattr(p, "quant_state", None) is not None]
    persistent |= {t.untyped_storage().data_ptr() for state in states for t in quant_state_tensors(state)}
    seen, total, stack, visited = set(), 0, [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = list(getattr(node, "saved_tensors", ()) or ()) + list(getattr(node, "tensors", ()) or ())
        tensors += [getattr(node, a) for a in dir(node) if a.startswith("_saved_")]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ptr = t.untyped_storage().data_ptr()
                if ptr not in seen and ptr not in persistent:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return total


def test_saved_activations_smaller_than_peft(backend):
    """QLoRA layer with fp32 adapters on a bf16 base: PEFT keeps an fp32 copy of x for lora_A's gradient and the
    [M, r] intermediate (the base matmul needs only W); fastlora keeps x in bf16, S [M, r] and the seeds, and no
    copy of the (fp32) adapters. (Where q, k and v read the same x, PEFT makes three fp32 copies and fastlora
    shares one.)"""
    m, k, n = 256, 128, 96
    model = lora_layer_model(k, n, base="nf4", dtype=torch.bfloat16)

    def measure():
        x = torch.randn(m, k, dtype=torch.bfloat16, requires_grad=True)
        return saved_activation_bytes(model(x), model)

    peft_bytes = measure()
    fastlora.patch(model, backend=backend)
    ours = measure()
    x_bytes = m * k * 2
    print(f"saved activations: PEFT {peft_bytes} B, fastlora {ours} B, x (bf16) alone {x_bytes} B")
    assert peft_bytes >= 2 * x_bytes  # the fp32 copy of x
    assert ours < 0.6 * peft_bytes
    r = 4  # lora_layer_model's default adapter
    assert ours <= x_bytes + m * r * 4 + 8  # x, S in fp32, one int64 seed: nothing else
