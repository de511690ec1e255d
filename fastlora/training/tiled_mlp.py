"""Tiled MLP: a decoder layer's gated MLP (``down(act(gate(x)) * up(x))``: SwiGLU, GeGLU) run over the sequence in
shards, keeping only its input for backward.

Untiled, one MLP call at S tokens holds [S, intermediate] tensors (the gate and up outputs, the activation, their
product, and in backward their gradients): at 300k tokens on Llama-3-8B, 8.6 GiB each in bf16, several at once.
Tiled, :class:`TiledMLPFunction` saves x alone, runs the shards under ``no_grad`` in forward, and in backward runs
each shard again with gradients and differentiates it at once, writing its slice of dx and summing the
parameters' gradients: one shard's intermediates live at a time. The projections are whatever the MLP holds:
fastlora's fused LoRA layers (an NF4 base re-reads 4-bit weights per shard, 4x fewer bytes than bf16) or PEFT's.
Dropout is replayed exactly: the random generators are set back to their forward state before the recompute
(:mod:`fastlora.training.replay`), so fastlora's counter-based masks (and PEFT's ``nn.Dropout``) repeat bit for bit.

Cost: one more forward of the MLP per step (about a third of its time), plus per-shard launch overhead.

Usage::

    report = fastlora.patch(model, tiled_mlp=True)    # shards of hidden_size tokens (or an int: tokens per shard)
    report.untiled_mlps                               # {"model.layers.0.mlp": "why not"} where it does not apply
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastlora.training.replay import ForwardState, gradients

#: On a GPU, a shard's intermediates take at most this fraction of the free memory when the shard size is automatic.
FREE_MEMORY_FRACTION = 0.25
#: Floor of an automatic shard: below a few hundred rows a GEMM no longer fills a GPU.
MIN_SHARD_TOKENS = 256


def _shards(tokens: int, shard: int) -> list[slice]:
    return [slice(start, min(start + shard, tokens)) for start in range(0, tokens, shard)]


def _sharded(run: Callable[[Tensor], Tensor], x: Tensor, shard: int) -> Tensor:
    """``run`` over row shards of ``x``, written into one output (a list of shards and their cat would hold it twice)."""
    out = None
    for s in _shards(x.shape[0], shard):
        y = run(x[s])
        if out is None:
            out = y.new_empty((x.shape[0], *y.shape[1:]))
        out[s] = y
        del y
    return out


class TiledMLPFunction(torch.autograd.Function):
    """``run`` over row shards of ``x`` [tokens, hidden] (see the module doc); params: the trainable tensors ``run``
    reads, so that their gradients come back through autograd."""

    @staticmethod
    def forward(ctx, run: Callable[[Tensor], Tensor], shard: int, x: Tensor, *params: Tensor):
        ctx.run = run
        ctx.shard = shard
        ctx.params = params
        ctx.state = ForwardState.capture(x.device)
        ctx.save_for_backward(x)
        with torch.no_grad():
            return _sharded(run, x, shard)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        params = [p for p, needed in zip(ctx.params, ctx.needs_input_grad[3:]) if needed]
        grad_x = torch.empty_like(x) if need_x else None
        grad_params: list[Optional[Tensor]] = [None] * len(params)
        with ctx.state.replaying():  # shards in forward order: the same random draws
            for s in _shards(x.shape[0], ctx.shard):
                xs = x[s].detach().requires_grad_(need_x)
                with torch.enable_grad():
                    ys = ctx.run(xs)
                grads = gradients(ys, grad_out[s], ([xs] if need_x else []) + params)
                if need_x:
                    grad_x[s] = grads.pop(0)
                for i, g in enumerate(grads):
                    if g is not None:
                        grad_params[i] = g.float() if grad_params[i] is None else grad_params[i].add_(g)
        grads = iter(grad_params)
        per_param = [next(grads) if needed else None for needed in ctx.needs_input_grad[3:]]
        per_param = [g if g is None else g.to(p.dtype) for g, p in zip(per_param, ctx.params)]
        return (None, None, grad_x, *per_param)


class TiledForward:
    """Installed as a gated MLP's ``forward``: the tiled computation when the call has more than one shard of tokens,
    the MLP's own forward otherwise."""

    def __init__(self, mlp: nn.Module, shard_tokens: Optional[int]):
        self.mlp = mlp
        self.shard_tokens = shard_tokens  # None: automatic (see shard_size)

    def original(self, x: Tensor) -> Tensor:
        return type(self.mlp).forward(self.mlp, x)

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        shard = self.shard_tokens or shard_size(self.mlp, flat)
        if flat.shape[0] <= shard:
            return self.original(x)
        if not torch.is_grad_enabled():
            return _sharded(self.original, flat, shard).view(*x.shape[:-1], -1)
        params = [p for p in self.mlp.parameters() if p.requires_grad]
        y = TiledMLPFunction.apply(self.original, shard, flat, *params)
        return y.view(*x.shape[:-1], y.shape[-1])


def shard_size(mlp: nn.Module, flat: Tensor) -> int:
    """The automatic shard: ``hidden_size`` tokens (a shard's [tokens, intermediate] tensors are then the size of one
    projection weight in the compute dtype), fewer on a GPU whose free memory would not hold 1/FREE_MEMORY_FRACTION
    times a shard's intermediates (about 8 x intermediate x element size bytes per token, backward included).

    Usage: ``shard_size(model.model.layers[0].mlp, x.reshape(-1, x.shape[-1]))``
    """
    hidden = flat.shape[-1]
    if flat.device.type != "cuda":
        return hidden
    per_token = 8 * _intermediate_size(mlp) * flat.element_size()
    free, _ = torch.cuda.mem_get_info(flat.device)
    return max(MIN_SHARD_TOKENS, min(hidden, int(free * FREE_MEMORY_FRACTION) // per_token))


def _intermediate_size(mlp: nn.Module) -> int:
    gate = mlp.gate_proj
    return getattr(gate, "out_features", None) or gate.base_layer.out_features


def refusal(mlp: nn.Module) -> Optional[str]:
    """Why ``mlp`` cannot be tiled, or None: it must be a gated MLP by structure (gate_proj, up_proj, down_proj
    modules and an ``act_fn``), whose tokens are independent of each other.

    Usage: ``refusal(model.model.layers[0].mlp)``
    """
    missing = [a for a in ("gate_proj", "up_proj", "down_proj") if not isinstance(getattr(mlp, a, None), nn.Module)]
    if missing or not callable(getattr(mlp, "act_fn", None)):
        what = ", ".join(missing) if missing else "act_fn"
        return f"{type(mlp).__name__} is not a gated MLP (no {what}: a mixture of experts or a fused gate_up_proj)"
    if isinstance(mlp.__dict__.get("forward"), TiledForward):
        return "already tiled"
    if "forward" in mlp.__dict__:
        return f"{type(mlp).__name__} has a forward set on the instance by someone else"
    return None


def install(model: nn.Module, shard_tokens: Optional[int]) -> tuple[Callable[[], None], str, dict[str, str]]:
    """Tile the MLP of every decoder layer of ``model`` (any module held as a layer's ``mlp``); ``shard_tokens``:
    tokens per shard, or None for :func:`shard_size`. Returns ``(undo, description, untiled)`` with ``untiled``
    {MLP name: reason} for the MLPs left as they are.

    Usage::

        undo, description, untiled = install(peft_model, None)
    """
    if shard_tokens is not None and shard_tokens < 1:
        raise ValueError(f"tiled_mlp: tokens per shard must be >= 1, got {shard_tokens}")
    mlps = [(f"{name}.mlp" if name else "mlp", m.mlp) for name, m in model.named_modules()
            if isinstance(getattr(m, "mlp", None), nn.Module)]  # fmt: skip
    untiled: dict[str, str] = {}
    tiled = []
    for name, mlp in mlps:
        reason = refusal(mlp)
        if reason is not None:
            untiled[name] = reason
            continue
        mlp.forward = TiledForward(mlp, shard_tokens)
        tiled.append(mlp)

    def undo() -> None:
        for mlp in tiled:
            if isinstance(mlp.__dict__.get("forward"), TiledForward):
                del mlp.forward

    size = f"{shard_tokens} tokens" if shard_tokens else "hidden_size tokens (fewer if GPU memory is short)"
    description = f"{len(tiled)} MLPs tiled in shards of {size}" + (f", {len(untiled)} left untiled" if untiled else "")
    return undo, description, untiled
