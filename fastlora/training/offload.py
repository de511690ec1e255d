"""Offloaded checkpoints: the input of each checkpointed decoder layer waits for backward in host memory, not on
the device.

Gradient checkpointing keeps one tensor per decoder layer, its input hidden states ([batch, seq, hidden]); at long
context those are what is left on the device (Llama-3-8B at 300k tokens: 32 x 2.3 GiB in bf16). Here each is
copied to a pinned host buffer on a side stream in forward (the device copy is freed as soon as the copy ends),
and in backward copied back one layer ahead: while layer i recomputes and backwards, layer i-1's input is already
on its way (double-buffered: at most two layer inputs are on the device at a time). The layer is recomputed and
differentiated by :class:`OffloadedCheckpointFunction`, which returns the gradients of the layer's input and of
its trainable parameters (LoRA) through autograd, like a non-reentrant checkpoint: no ``.grad`` side effects.
On the CPU the copies are plain copies (host memory is the device's): the path runs and is tested there; the
overlap of copies with compute is a GPU property.

:func:`install` hooks transformers' checkpointing (``GradientCheckpointingLayer._gradient_checkpointing_func``),
for the checkpointing enabled now and for any enabled later (``gradient_checkpointing_enable``, as HF Trainer does
with ``gradient_checkpointing=True``). Inputs under :data:`MIN_BYTES` stay on the device with the checkpoint
function that was there (counted in the report).

Usage::

    report = fastlora.patch(model, offload_checkpoints=True)
    model.gradient_checkpointing_enable()           # before or after patch
"""

from __future__ import annotations

import functools
import weakref
from collections import Counter, defaultdict
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastlora.training.host_copies import SideStreams, host_buffer
from fastlora.training.replay import ForwardState, gradients

#: Inputs smaller than this stay on the device. A copy each way costs a launch, an event and a pool lookup (~10-20 us
#: of fixed cost per layer on a GPU) whatever its size, while 1 MiB per layer is 32 MiB over a 32-layer model: below
#: it (128 tokens at hidden 4096 in bf16) the saving is noise and the fixed cost is not.
MIN_BYTES = 1 << 20


class HostCopies:
    """One model's offloaded layer inputs: a pool of host buffers reused across steps (pinning is slow), the side
    stream the copies run on (CUDA), and the last stash made, so backward can prefetch the one before it."""

    def __init__(self) -> None:
        self._pool: dict[tuple, list[Tensor]] = defaultdict(list)
        self._stream = SideStreams()
        self._last: Optional[weakref.ref] = None
        self.host_bytes = 0  # host memory held by buffers (in use or pooled): what the host must have

    def stash(self, x: Tensor) -> "Stash":
        """Start copying ``x`` to host memory; the returned stash gives it back in backward."""
        key = (tuple(x.shape), x.dtype)
        host = self._pool[key].pop() if self._pool[key] else self._new_host_buffer(x)
        stream = self._stream(x.device)
        stash = Stash(x, host, stream, self._last)
        weakref.finalize(stash, self._pool[key].append, host)  # back to the pool once its graph is freed
        self._last = weakref.ref(stash)
        return stash

    def _new_host_buffer(self, x: Tensor) -> Tensor:
        self.host_bytes += x.numel() * x.element_size()
        return host_buffer(x)


class Stash:
    """One layer input in host memory, and its way back to the device (see :class:`HostCopies`)."""

    def __init__(self, x: Tensor, host: Tensor, stream, previous: Optional[weakref.ref]):
        self.host = host
        self.device = x.device
        self.stream = stream
        self.previous = previous  # the stash made just before this one: its backward comes next
        self._on_device: Optional[Tensor] = None
        self._ready = None
        self.backward_done = False
        if stream is None:
            host.copy_(x)
            return
        stream.wait_stream(torch.cuda.current_stream(x.device))  # x is complete
        with torch.cuda.stream(stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(stream)  # the allocator must not hand x's memory out before the copy has read it

    def prefetch(self) -> None:
        """Start the copy back to the device (no-op if started)."""
        if self._on_device is not None:
            return
        if self.stream is None:
            self._on_device = self.host.to(self.device, copy=True)
            return
        with torch.cuda.stream(self.stream):
            self._on_device = self.host.to(self.device, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record(self.stream)

    def fetch(self) -> Tensor:
        """The input on the device (waiting for its copy), and the previous layer's input set on its way."""
        self.prefetch()
        x, self._on_device = self._on_device, None
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self._ready)
            x.record_stream(compute)
        previous = self.previous() if self.previous is not None else None
        if previous is not None and not previous.backward_done:
            previous.prefetch()
        return x


class OffloadedCheckpointFunction(torch.autograd.Function):
    """``run(x)`` under ``no_grad`` with ``x`` stashed in host memory; backward fetches it, runs again with
    gradients (same random draws, same autocast) and returns d/dx and d/d(params)."""

    @staticmethod
    def forward(ctx, run: Callable[[Tensor], Tensor], copies: HostCopies, x: Tensor, *params: Tensor):
        ctx.run = run
        ctx.state = ForwardState.capture(x.device)
        ctx.stash = copies.stash(x)
        ctx.params = params
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x = ctx.stash.fetch().detach().requires_grad_(ctx.needs_input_grad[2])
        wanted = [p for p, needed in zip(ctx.params, ctx.needs_input_grad[3:]) if needed]
        with torch.enable_grad(), ctx.state.replaying():
            out = ctx.run(x)
        grads = iter(gradients(out, grad_out, ([x] if x.requires_grad else []) + wanted))
        grad_x = next(grads) if x.requires_grad else None
        grad_params = [next(grads) if needed else None for needed in ctx.needs_input_grad[3:]]
        ctx.stash.backward_done = True
        return (None, None, grad_x, *grad_params)


class OffloadingCheckpoint:
    """Installed as a decoder layer's ``_gradient_checkpointing_func``: the layer's input goes to host memory
    (:class:`OffloadedCheckpointFunction`), or, when that does not apply, the checkpoint function that was there."""

    def __init__(self, inner: Callable, layer: nn.Module, copies: HostCopies, calls: Counter):
        self.inner = inner
        self.layer = layer
        self.copies = copies
        self.calls = calls

    def __call__(self, function: Callable, *args, **kwargs):
        reason = _kept_reason(function, args, kwargs)
        if reason is not None:
            self.calls[f"kept on the device ({reason})"] += 1
            return self.inner(function, *args, **kwargs)
        self.calls["offloaded"] += 1
        params = [p for p in self.layer.parameters() if p.requires_grad]
        return OffloadedCheckpointFunction.apply(function, self.copies, args[0], *params)


def _kept_reason(function: Callable, args: tuple, kwargs: dict) -> Optional[str]:
    """Why this checkpointed call keeps its input on the device, or None to offload it."""
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor) or not args[0].is_floating_point():
        return "the layer's input is not one floating-point tensor"
    x = args[0]
    if x.numel() * x.element_size() < MIN_BYTES:
        return f"input under {MIN_BYTES >> 20} MiB"
    captured = function.keywords.values() if isinstance(function, functools.partial) else ()
    if any(isinstance(v, Tensor) and v.requires_grad for v in captured):
        return "a keyword tensor of the layer needs a gradient"
    return None


def install(model: nn.Module, calls: Counter) -> tuple[Optional[Callable[[], None]], str]:
    """Offload the checkpointed decoder layers' inputs of a (PEFT-wrapped) transformers model, now and whenever
    checkpointing is enabled later. ``calls`` counts, per outcome, the checkpointed calls from then on.

    Returns ``(undo, description)``; ``undo`` is None when nothing was installed (``description`` says why).

    Usage::

        undo, description = install(peft_model, report.offload_calls)
    """
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GradientCheckpointingLayer

    from fastlora.training.cross_entropy import unwrap_peft

    lm = unwrap_peft(model)
    if not isinstance(lm, PreTrainedModel):
        return None, f"{type(lm).__name__} is not a transformers PreTrainedModel (its checkpointing is not known)"
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        return None, f"{type(lm).__name__} has no checkpointed decoder layers (GradientCheckpointingLayer)"
    if "_set_gradient_checkpointing" in lm.__dict__:
        return None, "already installed"
    copies = HostCopies()

    def wrap_layers() -> None:
        for layer in layers:
            current = layer.__dict__.get("_gradient_checkpointing_func")
            if current is not None and not isinstance(current, OffloadingCheckpoint):
                layer._gradient_checkpointing_func = OffloadingCheckpoint(current, layer, copies, calls)

    set_checkpointing = lm._set_gradient_checkpointing

    @functools.wraps(set_checkpointing)  # transformers reads its signature
    def set_and_wrap(*args, **kwargs):
        set_checkpointing(*args, **kwargs)
        wrap_layers()

    wrap_layers()
    lm._set_gradient_checkpointing = set_and_wrap

    def undo() -> None:
        lm.__dict__.pop("_set_gradient_checkpointing", None)
        for layer in layers:
            current = layer.__dict__.get("_gradient_checkpointing_func")
            if isinstance(current, OffloadingCheckpoint):
                layer._gradient_checkpointing_func = current.inner

    state = "on now" if any(layer.gradient_checkpointing for layer in layers) else "off now: it applies once enabled"
    description = (
        f"checkpointed inputs of {len(layers)} decoder layers offloaded to host memory when >= {MIN_BYTES >> 20} MiB "
        f"(side stream, prefetched one layer ahead in backward; gradient checkpointing {state})"
    )
    _COPIES[lm] = copies
    return undo, description


# Per model: its offloaded inputs' buffers (weak keys: a freed model frees its entry).
_COPIES: "weakref.WeakKeyDictionary[nn.Module, HostCopies]" = weakref.WeakKeyDictionary()


def host_bytes(model: nn.Module) -> int:
    """Host memory the offloaded checkpoints of ``model`` hold now (buffers in use or pooled for the next step).

    Usage: ``fastlora.training.offload.host_bytes(model)`` after a training step
    """
    from fastlora.training.cross_entropy import unwrap_peft

    copies = _COPIES.get(unwrap_peft(model))
    return 0 if copies is None else copies.host_bytes
