"""AdamW fused into backward: each trainable parameter is updated as soon as its gradient is complete, then its
gradient is freed, so a step never holds every gradient at once, nor the foreach step's temporaries.

Where it helps: a step whose peak is the optimizer step (many LoRA parameters, e.g. LoRA on MoE experts: the
parameters, all their gradients and the two fp32 moments at once, plus foreach's per-step temporaries). With it, the
gradients live one parameter at a time; the moments stay (they are AdamW's state).

The math is ``torch.optim.AdamW``'s own: each update runs ``AdamW.step`` on a one-parameter view of the
parameter's group (foreach off), with the state in ``self.state[param]`` in AdamW's format, so results equal
``torch.optim.AdamW(foreach=False)`` to the bit and ``state_dict()`` loads into either. LR schedulers work: they set
``param_groups[i]["lr"]``, which the next backward reads.

What the in-backward update changes, and what is refused:

- **Gradient accumulation**: ``accumulation_steps=k`` updates on every k-th gradient of a parameter (its gradient
  accumulates in ``.grad`` before that, as usual). :meth:`step` applies any gradient still held (a short last
  accumulation, e.g. the end of an epoch) and raises if a parameter was updated more than once since the last
  :meth:`step` (``accumulation_steps`` smaller than the loop's).
- **Gradient clipping** needs every gradient before the first update: not possible here. Leave it off
  (HF Trainer: ``max_grad_norm=0``; :meth:`trainer_callback` refuses otherwise). Gradient norms that a loop reads
  after backward (Trainer's logged ``grad_norm``) see no gradients: 0.
- **fp16 with a GradScaler**: the update would see scaled gradients; refused by the Trainer callback (use bf16).
- **Distributed data parallel**: the update would run before the all-reduce; refused at construction when
  ``torch.distributed`` runs more than one process.
- Each trainable parameter must receive one gradient per backward (true for LoRA adapters; a parameter shared by
  several reentrant-checkpointed segments would be updated per segment, and :meth:`step` raises).

**Moments in host memory** (``state_device="cpu"``): between updates each parameter's moments live in host memory
(pinned when the parameter is on a GPU); its update copies them to the parameter's device, runs the same AdamW step
there and copies them back, so the device holds one parameter's moments at a time (the results stay AdamW's to the
bit). Each optimizer step copies every moment in and back: 8 bytes per fp32 parameter element each way. On CUDA the copies
run on a side stream, ordered by events: the default stream waits for a parameter's moments to arrive, never the
host; the copy back of one update and the copy in of the next update of that parameter are on the same stream, so
neither a moment nor its host buffer is read before its copy finished. :meth:`state_dict` waits for the copies back.
Not prefetched: which parameter's gradient completes next is only known once it does (backward order, checkpoint
recomputation, accumulation); a wrong guess would hold moments on the device for nothing.

Usage::

    optimizer = AdamWInBackward(model.parameters(), lr=2e-4)        # plain loop (state_device="cpu": moments on the host)
    for batch in batches:
        model(**batch).loss.backward()    # every parameter is updated during this call
        optimizer.step()                  # checks, and applies gradients still held (none here)
        scheduler.step()

    trainer = Trainer(model, TrainingArguments(..., max_grad_norm=0), optimizers=(optimizer, None),
                      callbacks=[optimizer.trainer_callback()])
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from fastlora.training.host_copies import SideStreams, host_buffer

#: AdamW's per-parameter state kept in host memory with ``state_device``; "step" is a CPU scalar already.
MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


class AdamWInBackward(torch.optim.AdamW):
    """``torch.optim.AdamW`` (foreach off) whose update of each parameter runs in backward, from the parameter's
    post-accumulate-grad hook, after which its ``.grad`` is freed (see the module doc: accumulation, clipping,
    fp16, distributed). ``accumulation_steps``: gradients per update (micro-batches per optimizer step).
    ``state_device="cpu"``: the moments live in host memory between updates (module doc); None keeps them with
    their parameter. Every update then copies them, even for a parameter on the CPU (what the tests exercise).

    Usage: ``optimizer = AdamWInBackward(model.parameters(), lr=2e-4, accumulation_steps=4, state_device="cpu")``
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 accumulation_steps: int = 1, state_device: Union[str, torch.device, None] = None) -> None:  # fmt: skip
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be at least 1, got {accumulation_steps}")
        if state_device is not None and torch.device(state_device).type != "cpu":
            raise ValueError(f"state_device={state_device!r}: only 'cpu' (host memory) is supported; None keeps the "
                             "moments on their parameter's device")  # fmt: skip
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise RuntimeError("AdamWInBackward updates each parameter before a data-parallel all-reduce of its gradient "
                               "would finish: use it in single-process training")  # fmt: skip
        self.accumulation_steps = accumulation_steps
        self.state_device = None if state_device is None else torch.device(state_device)
        self._copy_stream = SideStreams()
        self._hooks: dict[Tensor, torch.utils.hooks.RemovableHandle] = {}
        self._received: dict[Tensor, int] = {}  # gradients accumulated since the parameter's last update
        self._updates: dict[Tensor, int] = {}  # updates since the last step()
        self._group_of: dict[int, dict] = {}
        self._indexed: tuple[int, int] = (0, 0)  # (id, length) of the param_groups list _group_of was built from
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=False)

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group``, hooking each new trainable parameter's gradient."""
        super().add_param_group(param_group)
        for param in self.param_groups[-1]["params"]:
            if param.requires_grad and param not in self._hooks:
                self._hooks[param] = param.register_post_accumulate_grad_hook(self._on_gradient)

    def _on_gradient(self, param: Tensor) -> None:
        received = self._received.get(param, 0) + 1
        if received < self.accumulation_steps:
            self._received[param] = received
            return
        self.apply_gradient(param)

    def apply_gradient(self, param: Tensor) -> None:
        """Update ``param`` from the gradient it holds now (AdamW's step on it alone) and free the gradient: what its
        backward hook calls on its last micro-batch."""
        group = self._group(param)
        hosts = self._moments_to_device(param) if self.state_device is not None else None
        groups, self.param_groups = self.param_groups, [{**group, "params": [param]}]
        try:
            super().step()
        except BaseException:
            if hosts:
                self.state[param].update(hosts)  # the update failed: the host moments are still the valid ones
            raise
        finally:
            self.param_groups = groups
        if hosts is not None:
            self._moments_to_host(param, hosts)
        param.grad = None
        self._received[param] = 0
        self._updates[param] = self._updates.get(param, 0) + 1

    # -- moments in host memory (state_device) --------------------------------------------------------------------

    def _moments_to_device(self, param: Tensor) -> dict[str, Tensor]:
        """Replace ``param``'s host moments in its state by device copies; returns the host buffers (none before
        its first update: AdamW then makes the moments on the device)."""
        state = self.state[param]
        hosts = {key: state[key] for key in MOMENTS if key in state}
        stream = self._copy_stream(param.device)
        if stream is not None and hosts:
            stream.wait_stream(torch.cuda.current_stream(param.device))  # the copies' device memory is free
        for key, host in hosts.items():
            state[key] = self._device_copy(host, param.device, stream)
        if stream is not None and hosts:
            torch.cuda.current_stream(param.device).wait_stream(stream)  # the update reads the arrived moments
        return hosts

    def _device_copy(self, host: Tensor, device: torch.device, stream: Optional["torch.cuda.Stream"]) -> Tensor:
        copy = torch.empty(host.shape, dtype=host.dtype, device=device)  # a new tensor even when device is the host
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            copy.copy_(host, non_blocking=stream is not None)
        return copy

    def _moments_to_host(self, param: Tensor, hosts: dict[str, Tensor]) -> None:
        """Copy ``param``'s updated moments back into their host buffers (new ones after its first update) and put
        the buffers back in its state; the device copies are freed once the copy has read them."""
        state = self.state[param]
        stream = self._copy_stream(param.device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(param.device))  # the update wrote the moments
        for key in MOMENTS:
            if key not in state:
                continue
            moment = state[key]
            host = hosts.get(key)
            if host is None:
                host = self._new_host_buffer(moment)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                host.copy_(moment, non_blocking=stream is not None)
            if stream is not None:
                moment.record_stream(stream)  # its memory is not reused before the copy read it
            state[key] = host

    def _new_host_buffer(self, like: Tensor) -> Tensor:  # one seam: the memory accounting counts host memory here
        return host_buffer(like)

    def wait_for_state(self) -> None:
        """Block the host until every copy of moments to host memory has finished (before reading ``self.state``
        directly; :meth:`state_dict` does it)."""
        self._copy_stream.synchronize()

    def state_dict(self) -> dict:
        """``torch.optim.AdamW.state_dict``, after the moments' copies to host memory finished."""
        self.wait_for_state()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.AdamW.load_state_dict``. With ``state_device``, the moments are copied into host buffers
        directly (torch's would cast them all onto the parameters' device first)."""
        if self.state_device is None:
            super().load_state_dict(state_dict)
            return
        self.wait_for_state()
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        moments = {i: {k: v for k, v in s.items() if k in MOMENTS} for i, s in state_dict["state"].items()}
        rest = {i: {k: v for k, v in s.items() if k not in MOMENTS} for i, s in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": rest})
        for saved_id, param in zip(saved_ids, params):
            for key, value in moments.get(saved_id, {}).items():
                host = self._new_host_buffer(param)
                host.copy_(value)  # casts to the parameter's dtype, as torch's load does
                self.state[param][key] = host

    def _group(self, param: Tensor) -> dict:
        # load_state_dict replaces param_groups (a new list of new dicts); add_param_group appends to it.
        if self._indexed != (id(self.param_groups), len(self.param_groups)):
            self._group_of = {id(p): group for group in self.param_groups for p in group["params"]}
            self._indexed = (id(self.param_groups), len(self.param_groups))
        return self._group_of[id(param)]

    @torch.no_grad()
    def step(self, closure: Optional[object] = None) -> None:
        """End of an optimizer step: the updates already ran in backward. Applies the gradients still held (a last
        accumulation shorter than ``accumulation_steps``, or gradients set by hand), and raises if a parameter was
        updated more than once since the previous call (``accumulation_steps`` smaller than the loop's)."""
        if closure is not None:
            raise ValueError("AdamWInBackward.step takes no closure: the updates run during backward")
        twice = [n for n in self._updates.values() if n > 1]
        self._updates.clear()
        if twice:
            raise RuntimeError(
                f"a parameter was updated {max(twice)} times in backward since the last optimizer step: "
                f"accumulation_steps={self.accumulation_steps} must equal the loop's micro-batches per step (or a "
                "parameter got several gradients per backward, e.g. shared by reentrant-checkpointed segments)"
            )  # fmt: skip
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.apply_gradient(param)
        self._updates.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad``; also forgets the micro-batches counted toward the next update."""
        super().zero_grad(set_to_none)
        self._received.clear()

    def remove_hooks(self) -> None:
        """Stop updating in backward (the parameters' hooks are removed); :meth:`step` then acts as AdamW's."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()

    def trainer_callback(self):
        """A ``transformers.TrainerCallback`` that checks, when training begins, that the Trainer's settings suit this
        optimizer: no gradient clipping (``max_grad_norm=0``), no fp16 GradScaler, one process, and
        ``gradient_accumulation_steps`` equal to ``accumulation_steps``. Raises ValueError with the setting to
        change.

        Usage: ``Trainer(..., optimizers=(optimizer, None), callbacks=[optimizer.trainer_callback()])``
        """
        from transformers import TrainerCallback

        optimizer = self

        class InBackwardChecks(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                problems = []
                if args.max_grad_norm and args.max_grad_norm > 0:
                    problems.append(f"max_grad_norm={args.max_grad_norm}: clipping needs every gradient before the "
                                    "first update; set max_grad_norm=0")  # fmt: skip
                if args.fp16:
                    problems.append("fp16: the GradScaler's scaled gradients would reach the update; use bf16")
                if args.world_size > 1:
                    problems.append(f"world_size={args.world_size}: the update would run before the all-reduce")
                if args.gradient_accumulation_steps != optimizer.accumulation_steps:
                    problems.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps} but the optimizer's "
                                    f"accumulation_steps={optimizer.accumulation_steps}: make them equal")  # fmt: skip
                if problems:
                    raise ValueError("AdamWInBackward cannot train with these TrainingArguments: " + "; ".join(problems))

        return InBackwardChecks()
