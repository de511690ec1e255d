"""Verify mode: the first fused call of each layer and input signature is checked against PEFT's own forward.

``fastlora.patch(model, verify=True)`` (or ``FASTLORA_VERIFY=1``) makes each patched layer, on the first call with
a new signature (input shape and dtype, active adapters, train/eval mode, a mixed batch's adapters), also run PEFT's forward on the same
input, and, where autograd can run, the backward of both with one random upstream gradient. Outputs and the
gradients of x and of every trainable tensor of the layer are compared within the dtype's tolerance. A layer that
differs falls back to PEFT's forward for good, with a loud warning and a report entry naming the layer, the
tensor and the size of the difference. A gradient that differs from PEFT's beyond the tolerance is judged against a
float64 run of PEFT's forward on a copy of the layer (float layers): it passes when fastlora is within the tolerance
of it or no further from it than twice PEFT's own error (ill-conditioned layers, where PEFT's error is the larger).

Cost: per layer and signature, one extra fused forward + backward and one PEFT forward + backward (about three
times the layer's work, once); later calls pay one dictionary lookup. Both sides run with the layer's LoRA
dropout switched off (fastlora's masks are not PEFT's, so only the dropout-free computation can agree), and
neither side's extra backward touches ``.grad`` (gradients are taken with ``torch.autograd.grad``), so training
proceeds exactly as without verification.

Usage::

    report = fastlora.patch(model, verify=True)
    model(**batch)                         # first calls verify
    report.verify_failures                 # {"layer name": "what differed and by how much"}
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

ENV_VAR = "FASTLORA_VERIFY"

#: Largest accepted max|fused - peft| / max|peft| per compute dtype. PEFT rounds the base and LoRA outputs to the
#: compute dtype separately and fastlora rounds their fp32 sum once, so half-precision results differ by a few
#: units in the last place (bf16: 2^-8 relative each); fp32 differs by summation order only. A wrong or missing
#: term (a dropped adapter, a wrong scale, a transposed operand) is off by tens of percent.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}
#: fp32 when the user allows TF32 matmuls (``torch.set_float32_matmul_precision("high")``): 10-bit mantissas.
TF32_TOLERANCE = 4e-3


def requested(verify: Optional[bool]) -> bool:
    """Whether verify mode is on: the ``patch`` argument when given, else the ``FASTLORA_VERIFY`` variable."""
    if verify is not None:
        return verify
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance for outputs and gradients computed in ``dtype``."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return TF32_TOLERANCE
    return TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])


class Mismatch(NamedTuple):
    """The first tensor that differed: its name, the relative difference and the tolerance it exceeded."""

    tensor: str
    difference: float
    tolerance: float

    def __str__(self) -> str:
        return f"{self.tensor} differs from PEFT's by {self.difference:.3g} (relative to its largest value; tolerance {self.tolerance:.3g})"


def signature(layer: nn.Module, x: Tensor, adapter_names: Optional[list] = None) -> tuple:
    """What makes a call new for verification: input shape and dtype, active adapters, train/eval mode, and the
    adapters a mixed batch (``adapter_names``) uses."""
    batch_adapters = tuple(sorted(set(adapter_names))) if adapter_names is not None else None
    return (tuple(x.shape), x.dtype, tuple(layer.active_adapters), layer.training, batch_adapters)


def relative_difference(got: Tensor, expected: Tensor) -> float:
    """max|got - expected| / max|expected| in fp64 (the absolute difference when ``expected`` is all zeros)."""
    got, expected = got.detach().double(), expected.detach().double()
    if got.shape != expected.shape:
        return float("inf")
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (got - expected).abs().max().item() if expected.numel() else 0.0
    if error != error:  # NaN in one of them
        return float("inf")
    return error / scale if scale > 0 else error


@contextlib.contextmanager
def _dropout_off(layer: nn.Module) -> Iterator[None]:
    dropouts = [m for m in layer._modules["lora_dropout"].values() if m.training]
    for module in dropouts:
        module.training = False
    try:
        yield
    finally:
        for module in dropouts:
            module.training = True


def compare_with_peft(
    layer: nn.Module, x: Tensor, fused: Callable[[Tensor], Tensor], peft: Callable[[Tensor], Tensor]
) -> Optional[Mismatch]:
    """Run ``fused`` and ``peft`` (the layer's two forwards) on a detached copy of ``x`` with dropout off; compare the
    outputs and, when autograd can run, the gradients of x and of the layer's trainable tensors. None when all agree.
    """
    trainable = [(name, p) for name, p in layer.named_parameters() if p.requires_grad]
    backward = not torch.is_inference_mode_enabled() and not (x.is_inference() and not trainable)
    with _dropout_off(layer), torch.enable_grad() if backward else contextlib.nullcontext():
        inputs = x.detach().requires_grad_(backward and x.is_floating_point())
        got, expected = fused(inputs), peft(inputs)
        tol = tolerance(expected.dtype)
        # Its own generator: verifying must not move the user's random stream (dropout, data order).
        generator = torch.Generator(expected.device).manual_seed(0)
        upstream = torch.randn(expected.shape, generator=generator, device=expected.device).to(expected.dtype)
        exact = None  # float64 results (output, then gradients), computed only if some tensor differs
        difference = relative_difference(got, expected)
        if difference > tol:
            exact = _float64_run(layer, x, upstream, backward)
            if exact is None or not _no_worse_than_peft(got, expected, exact[0], tol):
                return Mismatch("output", difference, tol)
        if not backward:
            return None
        names = ["input gradient"] + [f"gradient of {name}" for name, _ in trainable]
        wrt = [inputs] + [p for _, p in trainable]
        got_grads = _grads(got, wrt, upstream)
        expected_grads = _grads(expected, wrt, upstream)
    for i, (name, g, e) in enumerate(zip(names, got_grads, expected_grads)):
        if g is None and e is None:
            continue
        if g is None or e is None:
            return Mismatch(f"{name} (computed by only one side)", float("inf"), tol)
        difference = relative_difference(g, e)
        if difference > tol:
            exact = exact if exact is not None else _float64_run(layer, x, upstream, backward)
            if exact is None or not _no_worse_than_peft(g, e, exact[i + 1], tol):
                return Mismatch(name, difference, tol)
    return None


def _no_worse_than_peft(got: Tensor, expected: Tensor, exact: Optional[Tensor], tol: float) -> bool:
    """Whether fastlora's ``got`` is within ``tol`` of the float64 ``exact`` result, or no further from it than twice
    PEFT's own error: on an ill-conditioned layer (LoRA-GA leaves max|W| = 2e7 that s·B·A cancels down to 1) both
    sides' rounding errors exceed the result itself, and PEFT's is no reference."""
    if exact is None:
        return False
    error = relative_difference(got, exact)
    return error <= tol or error <= 2.0 * relative_difference(expected, exact)


def _float64_run(layer: nn.Module, x: Tensor, upstream: Tensor, backward: bool) -> Optional[list[Optional[Tensor]]]:
    """PEFT's forward run in float64 on a copy of ``layer`` (dropout off): its output, then (``backward``) the input
    gradient and the trainable tensors' gradients for ``upstream``; None for a layer with non-float tensors."""
    if not all(t.is_floating_point() for t in (*layer.parameters(), *layer.buffers())):
        return None
    import copy

    with torch.inference_mode(False), torch.enable_grad():
        exact = copy.deepcopy(layer).double()
        exact.__dict__.pop("forward", None)  # PEFT's class forward, not fastlora's
        inputs = x.detach().double().requires_grad_(True)
        with _dropout_off(exact):
            output = type(exact).forward(exact, inputs)
        if not backward:
            return [output.detach()]
        wrt = [inputs] + [p for p in exact.parameters() if p.requires_grad]
        return [output.detach()] + _grads(output, wrt, upstream.double())


def _grads(output: Tensor, wrt: list[Tensor], upstream: Tensor) -> list[Optional[Tensor]]:
    if not output.requires_grad:
        return [None] * len(wrt)
    return list(torch.autograd.grad(output, wrt, upstream, allow_unused=True))
