"""Live tensor bytes of one training step, op by op, from a ``TorchDispatchMode``: the accounting's meter.

Every tensor an op returns is looked up by its storage; a storage not seen before adds its bytes to a category,
and a ``weakref.finalize`` on the storage takes them off again when the last tensor using it dies. The peak is
kept with the categories that made it up. It works the same on meta tensors (nothing allocated: the accounting)
and on real CPU tensors (the tests' check that the accounting equals what really runs).

Categories (what each live storage is, decided when it appears and updated when its role becomes known):

- ``weights``: frozen parameters and buffers, bitsandbytes' quantization state;
- ``adapters``: trainable parameters, their gradients, optimizer state (and what the optimizer step allocates);
- ``activations``: tensors autograd saved for backward (pack hook of ``saved_tensors_hooks``);
- ``logits``: tensors whose last dimension is the vocabulary size (logits, their fp32 copies, their gradients);
- ``transient``: everything else (outputs, temporary buffers, gradients of activations, dequantized weights).

Usage::

    tracker = LiveBytes(vocab_size=128256)
    with tracker.tracking(model):
        loss = model(**batch).loss; loss.backward()
        with tracker.category("adapters"):
            optimizer.step()
    tracker.peak, tracker.peak_breakdown
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastlora.memory.meta_ops import MetaOpCache

CATEGORIES = ("weights", "adapters", "activations", "logits", "transient")
#: Shared by every accounting of the process: the planner accounts one model at many sequence lengths.
_META_OPS = MetaOpCache()


class LiveBytes(TorchDispatchMode):
    """Bytes of the live tensor storages, per category, with the peak and its breakdown (see the module doc)."""

    def __init__(self, vocab_size: Optional[int] = None, scratch: Optional[Callable[..., int]] = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        # scratch(func, args) -> bytes an op allocates and frees inside itself, beside its outputs (a kernel's
        # per-call buffer that its fake implementation does not make): counted at the peak while the op runs.
        self.scratch = scratch
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak = 0
        self.peak_breakdown = dict(self.by_category)
        self.peak_phase = ""
        self.phase = ""
        self._live: dict[int, list] = {}  # id(storage) -> [nbytes, category]
        self._host: set[int] = set()  # storages standing for pinned host memory (checkpoint offload): not counted
        self.host_current = 0  # bytes of host memory held by offloaded checkpoints, counted apart from the device
        self.host_peak = 0
        self._host_next = False  # the storages allocated now are host buffers (see host_allocations)
        self._new_category: Optional[str] = None
        # The peak of each segment of the step, (phase, segment) -> (bytes, breakdown): ``segment`` is set by the
        # caller (the decoder layer running now, see fastlora.memory.layers), so that peaks can be extrapolated.
        self.segment: Optional[str] = None
        self.segment_peaks: dict[tuple[str, Optional[str]], tuple[int, dict[str, int]]] = {}

    # -- recording --------------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("pin_memory") and func is torch.ops.aten.empty.memory_format:
            # save_on_cpu's pinned host buffer (offloaded checkpoints): host memory, not the device's. A CPU scalar
            # expanded to the shape stands in for it; copying back to the device allocates a counted copy.
            host = torch.empty((), dtype=kwargs.get("dtype")).expand(args[0])
            self._add_host(host)
            return host
        if func is torch.ops.aten.copy_.default and self.is_host(args[0]) and args[1].device.type == "meta":
            return args[0]  # the device-to-host copy of a meta tensor: nothing on the device changes
        out = _META_OPS.run(func, args, kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        scratch = self.scratch(func, args) if self.scratch is not None else 0
        if scratch:
            self._record_peak(scratch)
        return out

    def add(self, tensor: torch.Tensor, category: Optional[str] = None, nbytes: Optional[int] = None) -> None:
        """Count ``tensor``'s storage if it is new (``category`` overrides the guess from its shape and phase;
        ``nbytes`` its size, for a tensor standing for another format, e.g. NF4 experts kept dense on meta)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live or key in self._host:
            return
        if self._host_next:
            self._add_host(tensor)
            return
        nbytes = storage.nbytes() if nbytes is None else nbytes
        category = category or self._new_category or self._guess(tensor)
        self._live[key] = [nbytes, category]
        weakref.finalize(storage, self._free, key)
        self.by_category[category] += nbytes
        self.current += nbytes
        self._record_peak()

    def _record_peak(self, scratch: int = 0) -> None:
        """Update the step's peak and the current segment's with the live bytes (plus an op's ``scratch``)."""
        total = self.current + scratch
        key = (self.phase, self.segment)
        known = self.segment_peaks.get(key)
        if known is not None and total <= known[0] and total <= self.peak:
            return
        breakdown = dict(self.by_category, transient=self.by_category["transient"] + scratch)
        if known is None or total > known[0]:
            self.segment_peaks[key] = (total, breakdown)
        if total > self.peak:
            self.peak, self.peak_breakdown, self.peak_phase = total, breakdown, self.phase

    def _guess(self, tensor: torch.Tensor) -> str:
        if self.vocab_size and tensor.dim() >= 1 and tensor.shape[-1] == self.vocab_size:
            return "logits"
        return "transient"

    def _add_host(self, tensor: torch.Tensor) -> None:
        # Its logical size: a meta run's stand-in is one element expanded to the shape.
        storage, nbytes = tensor.untyped_storage(), tensor.numel() * tensor.element_size()
        key = id(storage)
        self._host.add(key)
        self.host_current += nbytes
        self.host_peak = max(self.host_peak, self.host_current)
        weakref.finalize(storage, self._free_host, key, nbytes)  # ids are reused once it dies

    def _free_host(self, key: int, nbytes: int) -> None:
        self._host.discard(key)
        self.host_current -= nbytes

    def _free(self, key: int) -> None:
        nbytes, category = self._live.pop(key)
        self.by_category[category] -= nbytes
        self.current -= nbytes

    def recategorize(self, tensor: torch.Tensor, category: str) -> None:
        """Move ``tensor``'s storage to ``category`` if it is counted as transient now (counting it if unseen)."""
        storage = tensor.untyped_storage()
        entry = self._live.get(id(storage))
        if entry is None:
            self.add(tensor, category)
            return
        if entry[1] == "transient":
            self.by_category[entry[1]] -= entry[0]
            self.by_category[category] += entry[0]
            entry[1] = category

    def is_host(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` stands for pinned host memory (an offloaded checkpoint)."""
        return id(tensor.untyped_storage()) in self._host

    # -- one step ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def host_allocations(self) -> Iterator[None]:
        """Count every storage allocated inside the block as host memory (fastlora's offload buffers, which are
        plain CPU tensors when the device is the CPU, pinned host memory on a GPU)."""
        previous, self._host_next = self._host_next, True
        try:
            yield
        finally:
            self._host_next = previous

    @contextlib.contextmanager
    def category(self, name: str) -> Iterator[None]:
        """Count every storage allocated inside the block as ``name`` (e.g. the optimizer step)."""
        previous, self._new_category = self._new_category, name
        try:
            yield
        finally:
            self._new_category = previous

    @contextlib.contextmanager
    def tracking(self, model: torch.nn.Module) -> Iterator[None]:
        """Count ``model``'s parameters and buffers, then everything the block allocates; saved tensors become
        activations, gradients of trainable parameters become adapters (run the optimizer step under
        ``category("adapters")`` to count its state and temporaries there)."""
        for p in model.parameters():
            self.add(p, "adapters" if p.requires_grad else "weights")
            quant_state = getattr(p, "quant_state", None)
            if quant_state is not None:
                for t in quant_state_tensors(quant_state):
                    self.add(t, "weights")
        for b in model.buffers():
            self.add(b, "weights")
        def gradient(p: torch.Tensor) -> None:
            if p.grad is not None:  # None: an optimizer hook before this one consumed it (fastlora.training.optimizer_in_backward)
                self.recategorize(p.grad, "adapters")

        handles = [p.register_post_accumulate_grad_hook(gradient) for p in model.parameters() if p.requires_grad]

        def pack(t: torch.Tensor) -> torch.Tensor:
            self.recategorize(t, "activations")
            return t

        try:
            with self, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                yield
        finally:
            for h in handles:
                h.remove()


def quant_state_tensors(quant_state) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes ``QuantState`` (absmax and code, and the nested ones with double quantization).

    Usage: ``quant_state_tensors(layer.weight.quant_state)``
    """
    tensors = [quant_state.absmax, quant_state.code]
    if getattr(quant_state, "nested", False):
        tensors += [quant_state.state2.absmax, quant_state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]
