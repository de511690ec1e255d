"""Layer benchmark: one LoRA linear layer of a real model shape, every contender on the same weights and inputs.

Contenders (each first checked against an fp32 reference of the same layer, then timed only if it passes):

- ``peft``: PEFT's ``lora.Linear`` / ``lora.bnb.Linear4bit`` as users run it (bitsandbytes for NF4).
- ``split``: the strongest existing practice (unsloth's ``fast_lora``, axolotl): W dequantized by bitsandbytes
  into one reused buffer, one GEMM, the LoRA term added in place with ``addmm_``; backward likewise. Installed as
  the forward of a PEFT LoRA layer, reading the layer's adapter per call as unsloth does, so it is called like
  the others: through its layer module.
- ``fastlora[<backend>]``: the same PEFT layer after ``fastlora.patch(model, backend=...)``, one per backend,
  each op on the path :mod:`fastlora.tuning` measured fastest (the record's ``path``).
  ``fastlora[triton:fused]`` / ``[triton:split]`` force a path (:func:`fastlora.tuning.forced`).
- ``dense``: ``F.linear`` with a dense W of the same shape in the compute dtype, no LoRA: the hardware
  reference (it is checked against ``x·Wᵀ + b``).

"fwd" runs under ``torch.inference_mode()``: an adapter's inference, on fastlora's inference graph (a trainable layer
under ``no_grad`` runs its training graph, so that checkpointing recomputes what it ran). "fwd+bwd" returns the
gradients of x, A and B via ``torch.autograd.grad``. The check runs the exact call that is timed. On CPU, ``host/call`` of a fastlora contender
is its call time minus the time spent inside its ops (:func:`fastlora.tuning.timing_ops`): Python, autograd and
argument handling.

Usage::

    records = run_layer_suite(settings, torch.device("cpu"), peaks, progress=tqdm(...))
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastlora.bench.models import LinearShape, int8_linear, layer_shapes, nf4_linear
from fastlora.bench.results import LayerRecord
from fastlora.bench.split import SplitForward, weight_source
from fastlora.bench.timing import (
    UNLIMITED, Peaks, RotatingInputs, RunBudget, TimingPolicy, cache_bytes, host_seconds, time_interleaved,
)

#: Largest accepted max |out - ref| / max |ref| per compute dtype. The reference computes in fp32 from the same
#: (already rounded) inputs, so what remains is output rounding and summation order; a wrong LoRA scale, a
#: missing bias or a transposed operand is off by tens of percent.
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
#: LoRA alpha / r, as the usual "alpha = 2r" configurations have it.
LORA_SCALE = 2.0
#: Suffix of a base name whose adapter is DoRA ("nf4+dora"): contenders then compute "dora", not "lora".
DORA = "+dora"


def base_kind(base: str) -> str:
    """The base weight's kind of a case's base name: "nf4" for "nf4" and "nf4+dora"."""
    return base.removesuffix(DORA)
PEFT = "peft"


@dataclass(frozen=True)
class LayerCase:
    """One timed problem: an M x K -> N LoRA layer with a ``base`` ("dense"|"nf4"|"int8") W, in ``mode``
    ("fwd"|"fwd+bwd").
    A base named with "+dora" (e.g. "nf4+dora") carries a DoRA adapter (``use_dora=True``) instead of plain LoRA."""

    model: str
    shape: LinearShape
    tokens: int
    base: str
    mode: str
    rank: int
    dtype: torch.dtype

    def flops(self, computes: str) -> float:
        """Useful floating-point operations: the base GEMMs (dx only in backward: W is frozen) plus, for a LoRA
        contender, the low-rank products (S = x·Aᵀ, S·Bᵀ; dy·B, its product with A, dA and dB)."""
        m, k, n, r = self.tokens, self.shape.in_features, self.shape.out_features, self.rank
        backward = self.mode == "fwd+bwd"
        base = 2 * m * k * n * (2 if backward else 1)
        lora = 2 * m * r * (k + n) * (3 if backward else 1)
        return base + (lora if computes != "base" else 0)

    def min_bytes(self, computes: str) -> float:
        """Bytes a perfect implementation must move: W once per pass (NF4: 0.5 B/param plus one u8 absmax per
        64; 8-bit: 1 B/param plus one fp32 scale per row), activations and their gradients once, LoRA weights
        (fp32) read and their gradients written."""
        m, k, n, r = self.tokens, self.shape.in_features, self.shape.out_features, self.rank
        elt = torch.finfo(self.dtype).bits // 8
        weight = {"nf4": n * k * (0.5 + 1 / 64), "int8": n * k + 4 * n}.get(base_kind(self.base), n * k * elt)
        backward = self.mode == "fwd+bwd"
        passes = 2 if backward else 1
        activations = elt * (m * k * (3 if backward else 1) + m * n * passes)  # x (twice in bwd), dx; y, dy
        lora = 4 * r * (k + n) * (3 if backward else 1) if computes != "base" else 0
        return weight * passes + activations + lora


@dataclass
class BaseLayer:
    """A frozen base layer (dense, bitsandbytes NF4 with double quant, or bitsandbytes 8-bit) and the fp32 W and bias the
    reference computes with."""

    layer: nn.Module
    base: str
    weight_fp32: Tensor
    bias_fp32: Tensor | None
    dtype: torch.dtype


@dataclass
class LayerFixture:
    """A base layer and one adapter (A [r, K], B [N, r], fp32 as PEFT keeps them), shared by all contenders of
    a shape and rank."""

    base: BaseLayer
    lora_a: Tensor
    lora_b: Tensor


@dataclass
class Contender:
    """One way to compute the layer. ``computes`` is "lora" (the LoRA layer) or "base" (x·Wᵀ + b only);
    ``trainable`` are the tensors besides x that fwd+bwd differentiates. fastlora contenders also carry their
    ``backend``, the Triton path they force (``forced_path``) and the PatchReport that counts PEFT fallbacks."""

    name: str
    computes: str
    forward: Callable[[Tensor], Tensor]
    trainable: tuple[Tensor, ...] = ()
    backend: str | None = None
    forced_path: str | None = None
    patch_report: object | None = None
    note: str = ""

    def context(self) -> ContextManager:
        """What every call runs inside: the forced path, if any."""
        if self.forced_path is None:
            return contextlib.nullcontext()
        from fastlora import tuning

        return tuning.forced(self.forced_path)


def fastlora_name(backend: str, forced_path: str | None = None) -> str:
    """Contender name of fastlora with ``backend`` (and a forced Triton path): "fastlora[cpp]", "fastlora[triton:split]"."""
    return f"fastlora[{backend}:{forced_path}]" if forced_path else f"fastlora[{backend}]"


class _OneLayer(nn.Module):
    """A model holding one linear layer for ``get_peft_model`` to target."""

    def __init__(self, proj: nn.Module, base: str):
        super().__init__()
        self.proj = proj
        # PEFT wraps a bnb layer in lora.bnb.Linear4bit / Linear8bitLt only when the model says it was loaded so.
        self.is_loaded_in_4bit = base == "nf4"
        self.is_loaded_in_8bit = base == "int8"

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _randn(generator: torch.Generator, *size: int, std: float) -> Tensor:
    return torch.randn(*size, generator=generator, device=generator.device) * std


def make_base(shape: LinearShape, base: str, dtype: torch.dtype, device: torch.device, seed: int) -> BaseLayer:
    """Random base layer: dense ``dtype``, NF4 (double quant) computing in ``dtype``, or 8-bit (computing in its
    input's dtype); drawn on ``device``."""
    import bitsandbytes.functional as bnbF

    generator = torch.Generator(device=device).manual_seed(seed)
    k, n = shape.in_features, shape.out_features
    weight = _randn(generator, n, k, std=k**-0.5).to(dtype)  # y has unit scale for unit-scale x
    bias = _randn(generator, n, std=0.1).to(dtype) if shape.bias else None
    if base == "nf4":
        layer = nf4_linear(weight, bias, compute_dtype=dtype)
        weight_fp32 = bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    elif base == "int8":
        layer = int8_linear(weight, bias)
        weight_fp32 = bnbF.int8_vectorwise_dequant(layer.weight.data, layer.weight.SCB)
    elif base == "dense":
        layer = nn.Linear(k, n, bias=shape.bias, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        weight_fp32 = weight.float()
    else:
        raise ValueError(f"base must be 'dense', 'nf4' or 'int8', not {base!r}")
    return BaseLayer(layer, base, weight_fp32, None if bias is None else bias.float(), dtype)


def add_adapter(base: BaseLayer, rank: int, seed: int) -> LayerFixture:
    """A random adapter for ``base``: A like PEFT's init; B random (PEFT starts it at zero), sized so the LoRA
    term is as large as the base term, so a wrong scale or a dropped LoRA term cannot hide in the tolerance."""
    generator = torch.Generator(device=base.weight_fp32.device).manual_seed(seed)
    n, k = base.weight_fp32.shape
    return LayerFixture(base, _randn(generator, rank, k, std=k**-0.5), _randn(generator, n, rank, std=0.5 * rank**-0.5))


def make_fixture(shape: LinearShape, base: str, rank: int, dtype: torch.dtype, device: torch.device, seed: int) -> LayerFixture:
    """A base layer and an adapter in one call (Usage: ``make_fixture(shape, "nf4", 16, torch.bfloat16, dev, 0)``)."""
    return add_adapter(make_base(shape, base, dtype, device, seed), rank, seed + 1)


def peft_layer(fixture: LayerFixture, dora: bool = False) -> tuple[nn.Module, nn.Module]:
    """(PeftModel, its LoRA layer) around the fixture's base, with the fixture's adapter weights. With ``dora``, a
    DoRA adapter: its magnitude m starts as PEFT sets it, at ‖W‖ per row (B was zero then), so g = m/‖W + s·B·A‖ ≠ 1."""
    from peft import LoraConfig, get_peft_model

    rank = fixture.lora_a.shape[0]
    config = LoraConfig(
        r=rank, lora_alpha=LORA_SCALE * rank, lora_dropout=0.0, use_dora=dora, target_modules=["proj"]
    )
    # PEFT's DoRA forward on CPU replaces the base module's quantized weight by a new Params object on every call
    # (``dequantize_module_weight``): a DoRA contender gets its own copy, so it cannot disturb the others' weight.
    base_layer = copy.deepcopy(fixture.base.layer) if dora else fixture.base.layer
    model = get_peft_model(_OneLayer(base_layer, fixture.base.base), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(fixture.lora_a)
        layer.lora_B["default"].weight.copy_(fixture.lora_b)
    return model, layer


def peft_contender(
    fixture: LayerFixture, backend: str | None = None, forced_path: str | None = None, dora: bool = False
) -> Contender:
    """PEFT's LoRA layer around the fixture's base; with ``backend``, patched by fastlora (raises
    :class:`ContenderUnavailable` when fastlora leaves the layer on PEFT, with the reason). The layer is called
    directly, not through the PeftModel, so no wrapper overhead is timed. ``dora``: a DoRA adapter (computes "dora",
    the magnitude trainable too)."""
    model, layer = peft_layer(fixture, dora)
    trainable = (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    computes = "dora" if dora else "lora"
    if dora:
        trainable += (layer.lora_magnitude_vector["default"].weight,)
    if backend is None:
        return Contender(PEFT, computes, layer, trainable)

    import fastlora

    report = fastlora.patch(model, backend=backend)
    if not report.patched:
        raise ContenderUnavailable(f"fastlora left the layer on PEFT: {report.skipped or report}")
    return Contender(fastlora_name(backend, forced_path), computes, layer, trainable, backend, forced_path, report)


class ContenderUnavailable(RuntimeError):
    """This contender cannot run this case here (the message says why): recorded as "skipped"."""


def split_contender(fixture: LayerFixture) -> Contender:
    """The split practice installed on its own PEFT LoRA layer (same weights), called through the layer module."""
    _, layer = peft_layer(fixture)
    dequantize, note = weight_source(fixture.base)
    layer.forward = SplitForward(layer, dequantize)
    return Contender("split", "lora", layer, (layer.lora_A["default"].weight, layer.lora_B["default"].weight), note=note)


def dense_contender(fixture: LayerFixture) -> Contender:
    weight = fixture.base.weight_fp32.to(fixture.base.dtype)
    bias = fixture.base.layer.bias
    return Contender("dense", "base", lambda x: F.linear(x, weight, bias), note="dense F.linear, no LoRA")


def run_once(contender: Contender, x: Tensor, grad_y: Tensor, mode: str) -> list[Tensor]:
    """The call that is checked and timed: y, and in "fwd+bwd" the gradients of x and the trainable tensors."""
    with contender.context():
        if mode == "fwd":
            with torch.inference_mode():
                return [contender.forward(x)]
        y = contender.forward(x)
        return [y, *torch.autograd.grad(y, (x, *contender.trainable), grad_y)]


def reference_outputs(fixture: LayerFixture, computes: str, x: Tensor, grad_y: Tensor, mode: str) -> list[Tensor]:
    """The same outputs as :func:`run_once`, computed in fp32 from the same inputs and weights."""
    x32 = x.detach().float().requires_grad_()
    a32 = fixture.lora_a.detach().clone().requires_grad_()
    b32 = fixture.lora_b.detach().clone().requires_grad_()
    with torch.enable_grad():
        y = F.linear(x32, fixture.base.weight_fp32, fixture.base.bias_fp32)
        inputs = [x32]
        if computes == "lora":
            y = y + LORA_SCALE * (x32 @ a32.T) @ b32.T
            inputs += [a32, b32]
        elif computes == "dora":
            # g ⊙ (x·Wᵀ + s·x·Aᵀ·Bᵀ) + b with g = m / ‖W + s·B·A‖ (detached) and m = ‖W‖ (see peft_layer)
            w = fixture.base.weight_fp32
            magnitude = w.norm(dim=1).requires_grad_()
            scale = magnitude / (w + LORA_SCALE * fixture.lora_b @ fixture.lora_a).norm(dim=1)
            y = scale * (x32 @ w.T + LORA_SCALE * (x32 @ a32.T) @ b32.T)
            y = y if fixture.base.bias_fp32 is None else y + fixture.base.bias_fp32
            inputs += [a32, b32, magnitude]
        if mode == "fwd":
            return [y.detach()]
        return [y.detach(), *torch.autograd.grad(y, inputs, grad_y.float())]


def relative_error(got: list[Tensor], want: list[Tensor]) -> float:
    """max over outputs of max |got - want| / max |want| (inf when shapes differ or values are not finite)."""
    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return math.inf
        diff = (g.detach().float() - w).abs().max().item()
        worst = max(worst, diff / max(w.abs().max().item(), 1e-12))
    return worst if math.isfinite(worst) else math.inf


def contenders_for(
    fixture: LayerFixture, settings, device: torch.device, dora: bool = False
) -> tuple[list[Contender], dict[str, str]]:
    """The contenders the settings ask for, and for each one that cannot run here, the reason. A DoRA case (``dora``)
    has PEFT and fastlora only: the split practice and dense F.linear have no DoRA form."""
    builders: list[tuple[str, Callable[[], Contender]]] = [(PEFT, lambda: peft_contender(fixture, dora=dora))]
    if settings.include_split and not dora:
        builders.append(("split", lambda: split_contender(fixture)))
    for backend in settings.backends:
        paths = settings.triton_paths if backend == "triton" else ("auto",)
        for path in paths:
            forced = None if path == "auto" else path
            patched = lambda b=backend, p=forced: peft_contender(fixture, b, p, dora)  # noqa: E731
            builders.append((fastlora_name(backend, forced), patched))
    if settings.include_dense and not dora:
        builders.append(("dense", lambda: dense_contender(fixture)))
    contenders, unavailable = [], {}
    for name, build in builders:
        try:
            contenders.append(build())
        except Exception as err:  # noqa: BLE001 - recorded per case as skipped, with the reason
            unavailable[name] = f"{type(err).__name__}: {err}"
    return contenders, unavailable


def chosen_paths(case: LayerCase, backend: str) -> str | None:
    """The paths :mod:`fastlora.tuning` chose for this case on ``backend``, with their source: the layer call's graph
    (:mod:`fastlora.functions.graph`) and, where it runs fastlora's Function, the base-weight ops, e.g. "layer: function
    (measured here); lora_linear: whole (measured here); lora_linear_grad_input: whole (cache)" or "layer: native
    (cache)"; None when none was made."""
    from fastlora import tuning

    layer_op = "lora_layer_inference" if case.mode == "fwd" else "lora_layer"
    ops = ("lora_linear",) if case.mode == "fwd" else ("lora_linear", "lora_linear_grad_input")
    wanted = (tuning.m_bucket(case.tokens), case.shape.out_features, case.shape.in_features, str(case.dtype).removeprefix("torch."))
    found = {
        d.key.op: (d.path, f"{d.path} ({d.source})")
        for d in tuning.decisions()
        if d.key.backend == backend and d.key.op in (layer_op, *ops) and (d.key.m_bucket, d.key.n, d.key.k, d.key.dtype) == wanted
    }
    parts = []
    if layer_op in found:
        parts.append(f"layer: {found[layer_op][1]}")
    if found.get(layer_op, ("function",))[0] == "function":
        parts += [f"{op}: {found[op][1]}" for op in ops if op in found]
    return "; ".join(parts) or None


def cpu_host_seconds(
    contender: Contender, fn: Callable[[], object], x: Tensor, grad_y: Tensor, mode: str, calls: int = 10
) -> float | None:
    """CPU host seconds per call of a fastlora contender (None for the others), median over ``calls`` calls: the
    call's time minus the time spent inside its ops (Python, autograd and argument handling remain). A call on a
    whole-layer graph (:mod:`fastlora.functions.graph`: the C++ node or torch's nodes) runs no tuned op; its host time is the
    call's time minus that of the same graph run directly on the call's tensors (``x``, ``grad_y``), interleaved."""
    if contender.backend is None:
        return None
    from fastlora import tuning

    host = []
    for _ in range(calls):
        with tuning.timing_ops() as inside:
            started = time.perf_counter()
            fn()
            if inside[0] == 0.0:
                return _graph_host_seconds(contender, fn, x, grad_y, mode, calls)
            host.append(time.perf_counter() - started - inside[0])
    return statistics.median(host)


def _graph_host_seconds(
    contender: Contender, fn: Callable[[], object], x: Tensor, grad_y: Tensor, mode: str, calls: int
) -> float | None:
    """The layer call's median time minus that of its graph called directly (see :func:`cpu_host_seconds`)."""
    from fastlora.functions import graph
    from fastlora.wiring.plan import call_plan

    layer = contender.forward
    plan = call_plan(layer, x.device.type, x, (), {})  # FusedForward resolves the device per call, from x
    if isinstance(plan, str) or len(plan[2]) != 1:
        return None
    x_compute, base, adapters, _ = plan
    x2d = x_compute.reshape(-1, x_compute.shape[-1])
    adapter, seeds = adapters[0], torch.zeros(1, dtype=torch.int64, device=x.device)
    grad_context = torch.inference_mode if mode == "fwd" else torch.enable_grad
    with grad_context():
        path = graph.path(x2d, base, adapter, contender.backend, None)  # decided by the checked call: a lookup
    if path == "function":
        return None

    def direct():
        with grad_context():
            y = graph.run(path, x2d, base, adapter, seeds)
            if mode != "fwd":
                torch.autograd.grad(y, (x2d, adapter.lora_a, adapter.lora_b), grad_y.reshape(y.shape))

    layer_times, graph_times = [], []
    for _ in range(calls):
        for sink, call in ((layer_times, fn), (graph_times, direct)):
            started = time.perf_counter()
            call()
            sink.append(time.perf_counter() - started)
    return max(statistics.median(layer_times) - statistics.median(graph_times), 0.0)


def run_case(
    case: LayerCase,
    fixture: LayerFixture,
    contenders: list[Contender],
    unavailable: dict[str, str],
    device: torch.device,
    peaks: Peaks | None,
    policy: TimingPolicy,
) -> list[LayerRecord]:
    """Check every contender against the fp32 reference, time those that pass (interleaved), return records."""
    tolerance = TOLERANCE[case.dtype]
    k, n, m = case.shape.in_features, case.shape.out_features, case.tokens
    generator = torch.Generator(device=device).manual_seed(m * 7919 + k * 31 + n)

    def make_inputs(_: int) -> tuple[Tensor, Tensor]:
        x = _randn(generator, m, k, std=1.0).to(case.dtype).requires_grad_(case.mode == "fwd+bwd")
        return x, _randn(generator, m, n, std=1.0).to(case.dtype)

    elt = torch.finfo(case.dtype).bits // 8
    pool = RotatingInputs(make_inputs, (m * k + m * n) * elt, cache_bytes(device))
    x0, grad_y0 = pool.first()
    references: dict[str, list[Tensor]] = {}

    records: dict[str, LayerRecord] = {}
    timed: dict[str, Callable[[], object]] = {}
    for name, reason in unavailable.items():
        records[name] = _record(case, name, "skipped", reason, tolerance=tolerance)
    for contender in contenders:
        want = references.get(contender.computes)
        if want is None:
            want = references[contender.computes] = reference_outputs(fixture, contender.computes, x0, grad_y0, case.mode)
        status, detail, error = _check(contender, x0, grad_y0, case.mode, want, tolerance)
        path = chosen_paths(case, contender.backend) if contender.backend is not None else None
        records[contender.name] = _record(case, contender.name, status, detail or contender.note, error, tolerance, path)
        if status == "ok":
            timed[contender.name] = lambda c=contender: run_once(c, *pool.next(), case.mode)
    del references, x0, grad_y0  # the fp32 reference can be larger than the layer: free it before timing
    try:
        medians = time_interleaved(timed, device, policy)
        if device.type == "cuda":
            hosts = {name: host_seconds(fn, device) for name, fn in timed.items()}
        else:
            x_first, grad_first = pool.first()
            hosts = {
                c.name: cpu_host_seconds(c, timed[c.name], x_first, grad_first, case.mode) for c in contenders if c.name in timed
            }
    except Exception as err:  # noqa: BLE001 - e.g. out of memory at a large M: recorded, the suite goes on
        status = "oom" if isinstance(err, torch.OutOfMemoryError) else "error"
        for name in timed:
            records[name].status, records[name].detail = status, f"while timing: {err}".splitlines()[0]
        medians, hosts = {}, {}
    peft_time = medians.get(PEFT)
    computes = {c.name: c.computes for c in contenders}
    for name, seconds in medians.items():
        record = records[name]
        record.median_s = seconds
        record.host_s = hosts.get(name)
        record.speedup_vs_peft = peft_time / seconds if peft_time else None
        record.tflops = case.flops(computes[name]) / seconds / 1e12
        record.gbps = case.min_bytes(computes[name]) / seconds / 1e9
        if peaks is not None:
            record.gemm_peak_fraction = record.tflops / peaks.gemm_tflops
            record.copy_peak_fraction = record.gbps / peaks.copy_gbps
    return list(records.values())


def _check(contender: Contender, x: Tensor, grad_y: Tensor, mode: str, want: list[Tensor], tolerance: float):
    """(status, detail, error) of one checked call: "ok", "mismatch", "fallback", "oom" or "error"."""
    report = contender.patch_report
    fallbacks_before = sum(report.fallback_calls.values()) if report is not None else 0
    try:
        got = run_once(contender, x, grad_y, mode)
    except torch.OutOfMemoryError as err:
        return "oom", str(err).splitlines()[0], None
    except Exception as err:  # noqa: BLE001 - a contender that raises is reported, the others still run
        return "error", f"{type(err).__name__}: {err}".splitlines()[0], None
    if report is not None and sum(report.fallback_calls.values()) > fallbacks_before:
        return "fallback", f"ran PEFT's forward: {dict(report.fallback_calls)}", None
    error = relative_error(got, want)
    if not error <= tolerance:
        return "mismatch", f"max relative error {error:.3g} > tolerance {tolerance:g}", error
    return "ok", "", error


def _record(case: LayerCase, contender: str, status: str, detail: str = "", error=None, tolerance=None, path=None) -> LayerRecord:
    return LayerRecord(
        model=case.model,
        projections=case.shape.projections,
        in_features=case.shape.in_features,
        out_features=case.shape.out_features,
        bias=case.shape.bias,
        tokens=case.tokens,
        base=case.base,
        mode=case.mode,
        rank=case.rank,
        dtype=str(case.dtype).removeprefix("torch."),
        contender=contender,
        status=status,
        detail=detail,
        check_error=error,
        tolerance=tolerance,
        path=path,
    )


def selected_shapes(model: str, settings) -> list[LinearShape]:
    """The model's layer shapes, restricted to ``settings.projections`` when it names any."""
    shapes = layer_shapes(model)
    if not settings.projections:
        return shapes
    return [s for s in shapes if set(s.projections.split(",")) & set(settings.projections)]


def count_cases(settings) -> int:
    """How many cases :func:`run_layer_suite` runs (for the progress bar)."""
    shapes = sum(len(selected_shapes(model, settings)) for model in settings.layer_models)
    per_dtype = shapes * len(settings.bases) * len(settings.ranks) * len(settings.modes) * len(settings.tokens)
    return per_dtype * len(settings.layer_suite_dtypes())


def run_layer_suite(
    settings, device: torch.device, peaks: Peaks | None, progress=None, budget: RunBudget = UNLIMITED, checkpoint=None
) -> list[LayerRecord]:
    """Every (compute dtype, model shape, base, rank, mode, M) case of ``settings``; one record per contender and
    case. Stops before the next case once ``budget`` is spent; calls ``checkpoint(records)`` after each base layer.
    ``peaks`` are those of one dtype: cases in another get no fraction of peak."""
    records: list[LayerRecord] = []
    for dtype in settings.layer_suite_dtypes():
        dtype_peaks = peaks if peaks is not None and peaks.dtype == str(dtype).removeprefix("torch.") else None
        records += _dtype_cases(settings, dtype, device, dtype_peaks, progress, budget, checkpoint, records)
        if budget.spent():
            break
    return records


def _dtype_cases(settings, dtype, device, peaks, progress, budget, checkpoint, done: list[LayerRecord]) -> list[LayerRecord]:
    """The cases of one compute dtype (see :func:`run_layer_suite`); ``done``: the records of earlier dtypes, for
    the checkpoints."""
    records: list[LayerRecord] = []
    for model in settings.layer_models:
        for shape_index, shape in enumerate(selected_shapes(model, settings)):
            for base in settings.bases:
                if budget.spent():
                    return records
                base_layer = make_base(shape, base_kind(base), dtype, device, seed=settings.seed + shape_index)
                for rank in settings.ranks:
                    fixture = add_adapter(base_layer, rank, seed=settings.seed + rank)
                    contenders, unavailable = contenders_for(fixture, settings, device, dora=base.endswith(DORA))
                    for mode in settings.modes:
                        for tokens in settings.tokens:
                            if budget.spent():
                                return records
                            case = LayerCase(model, shape, tokens, base, mode, rank, dtype)
                            if progress is not None:
                                name = str(dtype).removeprefix("torch.")
                                progress.set_postfix_str(f"{name} {model} {shape.projections} {base} r{rank} {mode} M={tokens}")
                            records += run_case(case, fixture, contenders, unavailable, device, peaks, settings.timing)
                            if progress is not None:
                                progress.update(1)
                    del fixture, contenders
                del base_layer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if checkpoint is not None:
                    checkpoint(done + records)
    return records


def cases_done(records: list[LayerRecord]) -> int:
    """How many cases ``records`` covers (each case has one record per contender)."""
    return len({(r.model, r.projections, r.base, r.rank, r.mode, r.tokens, r.dtype) for r in records})
