"""RMSNorm in row chunks, saving only its input and one fp32 scalar per row.

transformers' Llama-form RMSNorm (``weight * (x.float() * rsqrt(mean(x.float()²) + eps)).to(x.dtype)``) run by
autograd keeps fp32 copies of the whole input for backward and makes several more in backward: at 300k tokens
and hidden 4096, 4.6 GiB each. The final norm sits outside the checkpointed layers, so its saved copies live
through the whole backward; the layers' norms make theirs during each layer's recompute.
:class:`RMSNormFunction` computes the same formula chunk by chunk (fp32 inside a chunk, the same roundings to
the input dtype), saves x (a tensor the model holds anyway: the residual stream) and rstd [tokens] fp32, and
recomputes the normalised rows per chunk in backward.

Usage::

    y = rms_norm(x, weight, eps)                      # == LlamaRMSNorm's forward, to fp32 rounding in backward
    undo, description, unchunked = install(model)     # every Llama-form RMSNorm of the model (patch(chunked_norms=True))
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

#: fp32 elements per chunk: 2^24 (64 MiB per fp32 temporary; 4096 tokens at hidden 4096).
CHUNK_ELEMENTS = 1 << 24

#: The norms whose forward is the Llama form above (by class name: their code is known).
LLAMA_FORM = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Olmo2RMSNorm", "Phi3RMSNorm")


def _chunks(rows: int, width: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // width)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class RMSNormFunction(torch.autograd.Function):
    """y = weight · (x · rstd).to(x.dtype), rstd = rsqrt(mean(x²) + eps) in fp32, on 2-D x [tokens, hidden]."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float):
        out = torch.empty(x.shape, dtype=torch.result_type(weight, x), device=x.device)
        rstd = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for c in _chunks(*x.shape):
            xf = x[c].float()
            rstd[c] = torch.rsqrt(xf.pow(2).mean(-1) + eps)
            torch.mul(weight, (xf * rstd[c, None]).to(x.dtype), out=out[c])
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, rstd = ctx.saved_tensors
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if ctx.needs_input_grad[1] else None
        for c in _chunks(*x.shape):
            r = rstd[c, None]
            normed = x[c].float() * r
            g = grad_out[c]
            if grad_w is not None:
                grad_w += (g * normed.to(x.dtype)).float().sum(0)  # the product in the output dtype, as autograd's
            if grad_x is not None:
                grad_normed = (g * weight).float()  # d/d(normed) rounded to the output dtype, as autograd's
                mean = (grad_normed * normed).mean(-1, keepdim=True)
                grad_x[c] = (r * (grad_normed - normed * mean)).to(x.dtype)
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama-form RMSNorm over the last dimension of ``x`` in chunks (see the module doc).

    Usage: ``y = rms_norm(hidden_states, norm.weight, norm.variance_epsilon)``
    """
    y = RMSNormFunction.apply(x.reshape(-1, x.shape[-1]), weight, float(eps))
    return y.view(x.shape)


class ChunkedNormForward:
    """Installed as an RMSNorm module's ``forward``: :func:`rms_norm` with the module's weight and epsilon."""

    def __init__(self, norm: nn.Module):
        self.norm = norm

    def __call__(self, hidden_states: Tensor) -> Tensor:
        return rms_norm(hidden_states, self.norm.weight, self.norm.variance_epsilon)


def refusal(norm: nn.Module) -> Optional[str]:
    """Why ``norm`` (a module whose class name ends in RMSNorm) is left as it is, or None.

    Usage: ``refusal(model.model.norm)``
    """
    name = type(norm).__name__
    if name not in LLAMA_FORM:
        return f"{name}: not one of the Llama-form RMSNorms whose formula is known ({', '.join(LLAMA_FORM)})"
    if not isinstance(getattr(norm, "weight", None), Tensor) or not hasattr(norm, "variance_epsilon"):
        return f"{name} has no weight or variance_epsilon"
    if "forward" in norm.__dict__:
        return "already chunked" if isinstance(norm.__dict__["forward"], ChunkedNormForward) else "forward set on the instance by someone else"
    return None


def install(model: nn.Module) -> tuple[Callable[[], None], str, dict[str, str]]:
    """Chunk every RMSNorm of ``model`` (modules whose class name ends in "RMSNorm"). Returns ``(undo, description,
    unchunked)``, ``unchunked`` {name: reason} for the norms left as they are.

    Usage::

        undo, description, unchunked = install(peft_model)
    """
    unchunked: dict[str, str] = {}
    chunked = []
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        reason = refusal(module)
        if reason is not None:
            unchunked[name] = reason
            continue
        module.forward = ChunkedNormForward(module)
        chunked.append(module)

    def undo() -> None:
        for module in chunked:
            if isinstance(module.__dict__.get("forward"), ChunkedNormForward):
                del module.forward

    description = f"{len(chunked)} RMSNorms chunked, saving x and rstd only" + (f", {len(unchunked)} left as they are" if unchunked else "")
    return undo, description, unchunked
