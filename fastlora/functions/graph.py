"""Which graph a single-adapter layer call runs on, chosen per shape by measuring the whole call.

- "function": fastlora's :class:`~fastlora.functions.lora.LoRALinearFunction` (the backend's ops, each on its own tuned
  path, below a Python ``autograd.Function``);
- "native": the same ops of the C++ backend in one C++ autograd node (``csrc/lora_layer.cpp``: no Python in
  forward or backward), for any base the C++ ops serve (dense, NF4, 8-bit), dropout included;
- "native_half": that node with both base GEMMs in x's dtype (the C++ "half" path), for bf16/fp16 compute with a
  W that is not dense fp32, where the CPU multiplies that dtype natively (:func:`fastlora.backends.cpp.native_half_gemm`);
- "native_half_lora": a C++ node with the LoRA products in x's dtype too (``csrc/lora_layer_half.cpp``), offered
  besides "native_half" only where the adapter weights are in x's dtype themselves: PEFT then computes its LoRA chain
  in that dtype (with fp32 adapters, PEFT's default, it computes it in fp32, and so do the other graphs);
- "autograd": torch's own nodes, ``addmm(F.linear(x, W, b), x·Aᵀ, Bᵀ, alpha=s)``, for a dense W and no dropout: in
  fp32 at any size; for a dense W in x's half dtype only up to :data:`HALF_AUTOGRAD_MAX_TOKENS` rows, computed as PEFT
  computes it (the base GEMM rounded to x's dtype, the LoRA chain in the adapters' dtype, the sum rounded once), and
  saving what PEFT saves (x in the adapters' dtype: at few rows only, so a long sequence's memory stays the native
  graphs' and the accounting's).

At few tokens a layer call's time is mostly host work, and a Python backward is a large part of it. The graphs
save the same tensors (x and the thin S = s·drop(x)·Aᵀ, plus the dropout seed; W, A and B are the layer's own) and
compute the LoRA products in fp32, except "native_half_lora" (in x's dtype, see above). The choice applies only where
they compute the same thing: one adapter, no ``lora_bias``, mixed batch or DoRA, a base bias that needs no gradient,
not under ``torch.compile``, on a kernel backend whose paths are timed (not the torch reference, the oracle, nor
Triton's CPU interpreter). "native_half" rounds the base GEMM to x's dtype before the fp32 LoRA term is added (as
PEFT does with fp32 adapters). It is made like the ops' paths
(:func:`fastlora.tuning.choose`: op "lora_layer", forced by ``FASTLORA_PATH=lora_layer=native``), timing one
forward+backward of each candidate on detached copies of the call's inputs (no ``.grad`` is touched), outside the
caller's saved-tensor hooks and on a fork of the random generators (so activation checkpointing, which recomputes
without deciding again, sees the same draws). The first candidate listed keeps the key unless another is faster by
more than :data:`MARGIN`. A trainable layer's calls share one choice with grad on or off (activation checkpointing
recomputes under grad what it ran under no_grad, and must round the same); a frozen layer's calls and calls under
inference mode choose the same way (op "lora_layer_inference"), timing the forward.

Usage::

    path = graph.path(x, base, adapter, backend, function)   # "function", "native", "native_half", ... or "autograd"
    y = graph.run(path, x, base, adapter, seeds)             # for all but "function"
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlora import tuning
from fastlora.backends import cpp  # its extension is built on first use, not on import
from fastlora.functions.nf4_weight import KEEP_UP_TO_TOKENS, resolve_absmax

_memo = tuning.memo_holder()
#: The default graph ("native", or "native_half" where half GEMMs serve: the least host work) keeps a key unless
#: another is faster by more than this. Timing repeats a call with its caches warm, which flatters the graphs with
#: more Python per call: in a model each layer call finds its caches cold from the layers before. Measured on the
#: 2-core Xeon, interleaved with other layers' calls as the benchmark does, "function" and "autograd" took 8-9% longer
#: than their warm timing (512→1536, M=128, forward+backward) while "native" took the same, and warm timings of the
#: three scatter by about 5% run to run.
MARGIN = 0.10
is_compiling = torch.compiler.is_compiling  # bound once: this runs on every layer call

#: Most rows of a call for which "autograd" is a candidate over a dense half-precision W: at a few rows a call is mostly
#: host work and PEFT's own ATen nodes (oneDNN's half GEMV) can be the fastest graph; beyond, the native graphs save less.
#: An M-bucket boundary (fastlora.tuning.m_bucket), so every M of a shape key has the same candidates.
HALF_AUTOGRAD_MAX_TOKENS = 64
#: The C++ node's graphs and the path each gives :func:`fastlora.backends.cpp.bound_lora_layer`.
_NATIVE_PATHS = {"native": "auto", "native_half": "half", "native_half_lora": "half_lora"}
#: ``function(x, base, adapter, backend)``: the call on fastlora's own Function (or its ops alone without grad).
Function = Callable[..., Tensor]


def _candidates(x: Tensor, base, adapter, backend: str) -> tuple[str, ...]:
    """The graphs that compute this call (see the module docstring), the default first; :func:`path` has checked the
    adapter and the bias."""
    native = backend == "cpp" and native_on(x.device.type)
    dense_f32 = (
        base.absmax is None and adapter.dropout_p == 0.0 and x.dtype is torch.float32 and base.weight.dtype is torch.float32
    )
    if native:
        if dense_f32:
            return ("native", "function", "autograd")
        converted = base.absmax is not None or base.weight.dtype is not torch.float32  # not a dense fp32 W
        half = converted and x.dtype in (torch.bfloat16, torch.float16) and cpp.native_half_gemm(x.dtype)
        torch_nodes = ("autograd",) if _dense_half_few_rows(x, base, adapter) else ()
        # With half GEMMs available, "native_half" is the default: "native" computes in fp32 and takes 2-3x as long
        # from 16 rows up (it stays a candidate: at few NF4 rows its fused fp32 kernels win by far), and among the
        # graphs that remain, "function" often times within 3% of it while running slower in a model (more Python
        # per call, flattered by warm timing; see MARGIN): the margin then keeps the default.
        if half and _adapter_in(x.dtype, adapter):
            return ("native_half", "native", "native_half_lora", "function") + torch_nodes
        return (("native_half", "native", "function") if half else ("native", "function")) + torch_nodes
    if dense_f32 and backend == "triton" and x.is_cuda:
        return ("function", "autograd")
    return ()


def _dense_half_few_rows(x: Tensor, base, adapter) -> bool:
    """Whether "autograd" computes this half-precision call (a dense W in x's dtype, no dropout, few rows)."""
    return (
        base.absmax is None and base.weight.dtype is x.dtype and x.dtype in (torch.bfloat16, torch.float16)
        and adapter.dropout_p == 0.0 and x.shape[0] <= HALF_AUTOGRAD_MAX_TOKENS
    )  # fmt: skip


def _adapter_in(dtype: torch.dtype, adapter) -> bool:
    """Whether both adapter weights are in ``dtype`` (the LoRA products may then run in it, as PEFT's do)."""
    return adapter.lora_a.dtype is dtype and adapter.lora_b.dtype is dtype


def path(x: Tensor, base, adapter, backend: str, function: Function) -> str:
    """The graph this call (2-D x, one adapter) runs on. ``function`` computes it the fastlora way, for the timing."""
    if (
        adapter.dora is not None
        or adapter.lora_bias is not None
        or adapter.rows is not None
        or (base.bias is not None and base.bias.requires_grad)
        or is_compiling()
    ):
        return "function"  # only fastlora's Function computes these
    # A trainable layer decides as in training even under no_grad (the first forward of reentrant or offloaded
    # activation checkpointing, an evaluation between steps): its recomputation with grad then runs the same graph
    # and rounds exactly as the forward it replays. Only a frozen layer, or inference mode (no graph can be built on
    # its tensors), decides by the forward alone.
    trainable = x.requires_grad or adapter.lora_a.requires_grad or adapter.lora_b.requires_grad
    training = trainable and not torch.is_inference_mode_enabled()
    raw = (x.shape, x.dtype, base.weight.shape, base.weight.dtype, base.absmax is None, base.bias is None,
           adapter.lora_a.shape, adapter.lora_a.dtype, adapter.lora_b.dtype, adapter.dropout_p > 0.0, x.requires_grad,
           training, backend)  # fmt: skip
    chosen = _memo[0].get(raw)
    if chosen is None:
        candidates = _candidates(x, base, adapter, backend)
        chosen = _memo[0][raw] = _decide(candidates, x, base, adapter, backend, training, function) if candidates else "function"
    return chosen


def native_on(device_type: str) -> bool:
    """Whether calls on ``device_type`` can run on a native graph (the C++ node: CPU only)."""
    return device_type == "cpu"


def decided() -> dict:
    """The graph decisions in force (a new object after ``tuning.reset``, or under ``tuning.forced``): what a
    call bound to a graph (:func:`bind`) was decided under. Usage: ``valid = graph.decided() is kept``"""
    return _memo[0]


def run(path: str, x: Tensor, base, adapter, seeds: Tensor) -> Tensor:
    """The call on graph ``path`` (any but "function"); ``seeds``: the call's dropout seed (one int64)."""
    if path in _NATIVE_PATHS:
        return bind(path, base, adapter)(x, seeds)
    # PEFT's order: the base output in x's dtype, the LoRA chain in the adapters' dtype, the sum rounded to x's dtype
    # (no-op conversions in fp32).
    lora_dtype = adapter.lora_a.dtype
    y = torch.addmm(F.linear(x, base.weight, base.bias).to(lora_dtype), x.to(lora_dtype) @ adapter.lora_a.T,
                    adapter.lora_b.T, alpha=adapter.scale)  # fmt: skip
    return y.to(x.dtype)


def bind(path: str, base, adapter) -> Callable[[Tensor, Tensor], Tensor] | None:
    """:func:`run` on a native graph with the layer's arguments fixed: ``call(x, seeds)`` (None for the other graphs),
    so that a layer's repeated calls skip re-reading them (:func:`fastlora.functions.lora.bound_call`).

    Usage: ``call = graph.bind("native", base, adapter); y = call(x, seeds)``
    """
    if path not in _NATIVE_PATHS:
        return None
    layer = cpp.bound_lora_layer(adapter.lora_a, adapter.lora_b, base.weight, base.blocksize, base.bias,
                                 adapter.dropout_p, adapter.scale, _NATIVE_PATHS[path])  # fmt: skip
    if base.nested is None:
        absmax = base.absmax
        return lambda x, seeds: layer(x, absmax, seeds)
    return lambda x, seeds: layer(x, _absmax(base, x), seeds)  # resolved per call, as the grad mode and rows ask


def _absmax(base, x: Tensor) -> Tensor | None:
    """The absmax a C++ node is given (and saves): with double quantization, this call's resolved fp32 copy (kept
    per weight at decode sizes without grad, as fastlora.functions.lora does)."""
    keep = not torch.is_grad_enabled() and x.shape[0] <= KEEP_UP_TO_TOKENS
    return resolve_absmax(base.absmax, base.nested, "cpp", keep)


def _decide(candidates, x, base, adapter, backend, training, function: Function) -> str:
    # The timing draws random numbers (dropout seeds of the timed calls, a gradient): on a fork of the generators, so
    # the model's own draws are the same whether or not this call decided (activation checkpointing recomputes the
    # forward without deciding again, and must regenerate the same dropout masks).
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        return _measured(candidates, x, base, adapter, backend, training, function)


def _measured(candidates, x, base, adapter, backend, training, function: Function) -> str:
    m, k = x.shape
    n, r = base.out_features, adapter.lora_a.shape[0]
    kind = tuning.base_kind(base.weight.dtype, base.absmax is None)
    # Adapters in x's dtype have a candidate more, so a key of their own: "bfloat16+bfloat16 adapter".
    dtype = tuning.dtype_name(x.dtype)
    if "native_half_lora" in candidates:
        dtype += f"+{dtype} adapter"
    key = tuning.ShapeKey(backend, "lora_layer" if training else "lora_layer_inference", tuning.m_bucket(m), n, k, r,
                          dtype, kind, adapter.dropout_p > 0.0, tuning.device_name(x.device))  # fmt: skip
    seeds = torch.zeros(1, dtype=torch.int64, device=x.device)  # timing runs: any fixed seed will do

    def call(graph: str, x_: Tensor, adapter_) -> Tensor:
        return function(x_, base, adapter_, backend) if graph == "function" else run(graph, x_, base, adapter_, seeds)

    if not training:
        with torch.no_grad():
            runs = {graph: (lambda g=graph: call(g, x, adapter)) for graph in candidates}
            return tuning.choose(key, runs, x.device, MARGIN)
    x_leaf = x.detach().requires_grad_(x.requires_grad)
    copy = adapter._replace(lora_a=adapter.lora_a.detach().requires_grad_(adapter.lora_a.requires_grad),
                            lora_b=adapter.lora_b.detach().requires_grad_(adapter.lora_b.requires_grad))  # fmt: skip
    leaves = [t for t in (x_leaf, copy.lora_a, copy.lora_b) if t.requires_grad]
    grad_y = torch.randn(m, n, device=x.device, dtype=x.dtype)

    def forward_backward(graph: str) -> Callable[[], object]:
        return lambda: torch.autograd.grad(call(graph, x_leaf, copy), leaves, grad_y)

    # Timed on a graph of its own, outside any saved-tensor hooks of the caller (activation checkpointing runs the
    # layer under hooks that would take the timing graph's tensors for the model's, and stop it early).
    with torch.enable_grad(), _without_saved_tensor_hooks():
        return tuning.choose(key, {graph: forward_backward(graph) for graph in candidates}, x.device, MARGIN)


@contextlib.contextmanager
def _without_saved_tensor_hooks() -> Iterator[None]:
    """Take every default saved-tensor hook (``torch.autograd.graph.saved_tensors_hooks``) off for the block and put
    them back after, in order."""
    autograd = torch._C._autograd
    hooks = []
    while (top := autograd._top_saved_tensors_default_hooks(True)) is not None:
        hooks.append(top)
        autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(hooks):
            autograd._push_saved_tensors_default_hooks(pack, unpack)
