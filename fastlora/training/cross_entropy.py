"""Fused linear cross-entropy: the loss of a causal LM from its last hidden states and ``lm_head``, computed in
chunks of tokens so the [tokens, vocab] logits never exist whole, forward or backward.

Each chunk computes its logits in the compute dtype (as ``lm_head`` would), upcasts them to fp32 (as
transformers' ``ForCausalLMLoss`` does), applies the architecture's logit scaling or softcapping, and takes the loss
and, in the same pass, the gradient of the hidden states (and of the head's weight if it is trainable). Backward only
scales those stored gradients by the incoming one. Peak extra memory: one chunk's logits (fp32 and the compute
dtype) plus a [tokens, hidden] gradient, instead of the full logits, their fp32 copy and their gradient.

:func:`install` puts it into a (PEFT-wrapped) Hugging Face causal LM: the model's forward computes the loss this
way when ``labels`` are given and gradients are enabled, and then returns ``logits=None`` (training does not read
them; that is the memory saved). Without labels, or under ``no_grad`` (evaluation, generation), the model's own
forward runs and returns logits as before.

Usage::

    loss = linear_cross_entropy(hidden, lm_head.weight, labels)           # == F.cross_entropy(lm_head(hidden)...)
    undo, description = install(peft_model)                               # opt-in; undo() restores the model
"""

from __future__ import annotations

import inspect
import logging
from typing import Callable, Optional

import torch
from torch import Tensor, nn

logger = logging.getLogger("fastlora")

#: Logits per chunk (tokens x vocab): 2^25 fp32 logits are 128 MiB; ~260 tokens of a 128k vocabulary.
CHUNK_LOGITS = 1 << 25


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary of ``vocab_size`` (at least 1)."""
    return max(1, CHUNK_LOGITS // vocab_size)


def _chunk_starts(rows: int, chunk: int) -> range:
    return range(0, rows, chunk)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Sum over valid tokens of ``-log softmax(f(h·Wᵀ + b))[y]``, divided by ``denominator``; f is the logit
    scaling and softcapping. Gradients are computed during forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, denominator, scale, softcap, ignore_index, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        inv_denominator = 1.0 / denominator
        weight_low = weight.to(hidden.dtype)  # for dh = g·W in the compute dtype, as lm_head's own backward
        for start in _chunk_starts(hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            logits = nn.functional.linear(h, weight, bias).float()
            if scale != 1.0:
                logits.mul_(scale)
            if softcap is not None:
                logits.div_(softcap).tanh_()  # tanh(z / cap); times cap below, keeping tanh for the derivative
                capped_tanh = logits.clone() if (need_h or need_w or need_b) else None
                logits.mul_(softcap)
            valid = y != ignore_index
            safe_y = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_y[:, None]).squeeze(1)
            total += ((lse - target_logit) * valid).sum()
            if not (need_h or need_w or need_b):
                continue
            # d loss / d logits = (softmax - onehot) / denominator on valid rows, reusing the logits' memory.
            grad = logits.sub_(lse[:, None]).exp_()
            grad.scatter_add_(1, safe_y[:, None], -torch.ones_like(lse)[:, None])
            grad.mul_((valid * inv_denominator)[:, None])
            if softcap is not None:
                grad.mul_(1.0 - capped_tanh.square_())
            if scale != 1.0:
                grad.mul_(scale)
            grad_low = grad.to(hidden.dtype)  # the rounding the unfused path's bf16 logits' gradient gets
            del grad
            if need_h:
                torch.matmul(grad_low, weight_low, out=grad_h[start : start + chunk])
            if need_w:
                grad_w.addmm_(grad_low.t().float(), h.float())
            if need_b:
                grad_b += grad_low.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total * inv_denominator

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        grad_w = None if grad_w is None else (grad_w * grad_loss).to(ctx.dtypes[0])
        grad_b = None if grad_b is None else (grad_b * grad_loss).to(ctx.dtypes[1])
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    *,
    num_items_in_batch: Optional[Tensor | int] = None,
    ignore_index: int = -100,
    shift_labels: Optional[Tensor] = None,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk: Optional[int] = None,
) -> Tensor:
    """transformers' ``ForCausalLMLoss(lm_head(hidden) ...)`` without materializing the logits.

    ``hidden`` [..., H] in the compute dtype, ``weight`` [V, H]; ``labels`` [...] are shifted left by one (the last
    position gets ``ignore_index``) unless ``shift_labels`` is given. Mean over valid tokens, or sum divided by
    ``num_items_in_batch`` when given (gradient accumulation). ``logit_scale`` multiplies the logits (Cohere;
    Granite's ``1/logits_scaling``), ``softcap`` is ``cap·tanh(z/cap)`` (Gemma-2), both applied in fp32.

    Usage: ``loss = linear_cross_entropy(h, model.lm_head.weight, labels)``
    """
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum().float()  # mean over valid tokens, as F.cross_entropy
    elif torch.is_tensor(num_items_in_batch) and num_items_in_batch.device.type != "cpu":
        denominator = num_items_in_batch.to(hidden.device).float()
    else:  # a number, or a CPU tensor: read on the host for free, never copied to the GPU and waited for
        denominator = float(num_items_in_batch)
    chunk = chunk or chunk_tokens(weight.shape[0])
    return LinearCrossEntropyFunction.apply(
        flat, weight, bias, targets, denominator, float(logit_scale), softcap, ignore_index, chunk
    )


# ---- installing it on a Hugging Face causal LM --------------------------------------------------------------

# The causal LMs whose forward is "hidden = self.model(...); logits = f(lm_head(hidden)); loss_function(logits)",
# with f read from the config: (logit_scale, softcap) for a config.
_HEADS: dict[str, Callable[[object], tuple[float, Optional[float]]]] = {
    **{
        name: (lambda config: (1.0, None))
        for name in (
            "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
            "Phi3ForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
            # Mixture-of-experts heads: the same loss while the router's auxiliary loss is off (refused otherwise).
            "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM", "OlmoeForCausalLM", "GptOssForCausalLM",
        )
    },  # fmt: skip
    "Gemma2ForCausalLM": lambda config: (1.0, getattr(config, "final_logit_softcapping", None)),
    "CohereForCausalLM": lambda config: (float(config.logit_scale), None),
    "GraniteForCausalLM": lambda config: (1.0 / float(config.logits_scaling), None),
}


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The Hugging Face model under PEFT's wrappers (PeftModel or LoraModel), or ``model`` itself.

    Usage: ``lm = unwrap_peft(peft_model)``
    """
    from peft.tuners.tuners_utils import BaseTuner

    if hasattr(model, "get_base_model"):  # PeftModel
        return model.get_base_model()
    if isinstance(model, BaseTuner):
        return model.model
    return model


def _refusal(lm: nn.Module) -> Optional[str]:
    name = type(lm).__name__
    if name not in _HEADS:
        return f"unknown head: {name} is not one of the causal LMs whose loss fastlora knows"
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if head is None:
        return f"{name} has no output embeddings (lm_head)"
    if hasattr(head, "lora_A"):
        return "lm_head has a LoRA adapter"
    if type(head) is not nn.Linear:
        return f"lm_head is a {type(head).__name__}, not a plain nn.Linear"
    if getattr(lm.config, "output_router_logits", False):
        return "the router's auxiliary loss is on (output_router_logits): the fused loss does not add it"
    if "_loss_function" in lm.__dict__:
        return "the model has a custom loss_function"
    if not isinstance(getattr(lm, "model", None), nn.Module):
        return f"{name} has no .model decoder"
    if isinstance(lm.__dict__.get("forward"), _FusedLossForward):
        return "already installed"
    return None


class _FusedLossForward:
    """The forward installed on the causal LM instance: the decoder, then the fused loss (see the module doc)."""

    def __init__(self, lm: nn.Module, previous: Optional[Callable]):
        self.lm = lm
        self.previous = previous
        self.original = previous or type(lm).forward.__get__(lm)
        self.signature = inspect.signature(type(lm).forward)
        # What inspect.signature(lm.forward) answers: the model's own parameters. HF Trainer reads them to drop the
        # dataset columns forward does not take (a bare (*args, **kwargs) would drop input_ids) and, from **kwargs,
        # to pass num_items_in_batch.
        self.__signature__ = inspect.signature(self.original)
        self.scale, self.softcap = _HEADS[type(lm).__name__](lm.config)
        self.chunk = chunk_tokens(lm.config.vocab_size)

    def __call__(self, *args, **kwargs):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        bound = self.signature.bind(self.lm, *args, **kwargs).arguments
        bound.pop("self", None)
        labels = bound.pop("labels", None)
        logits_to_keep = bound.pop("logits_to_keep", 0)
        if labels is None or not torch.is_grad_enabled() or not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            return self.original(*args, **kwargs)
        extra = dict(bound.pop("kwargs", {}))
        return_dict = extra.pop("return_dict", None)  # the decoder's output is read by name below
        outputs = self.lm.model(**bound, **extra)
        head = self.lm.get_output_embeddings()
        loss = linear_cross_entropy(
            outputs.last_hidden_state, head.weight, labels, head.bias,
            num_items_in_batch=extra.get("num_items_in_batch"), ignore_index=extra.get("ignore_index", -100),
            shift_labels=extra.get("shift_labels"), logit_scale=self.scale, softcap=self.softcap, chunk=self.chunk,
        )  # fmt: skip
        result = CausalLMOutputWithPast(loss=loss, logits=None)
        for key in ("cache", "past_key_values", "hidden_states", "attentions"):
            value = getattr(outputs, key, None)
            if value is not None and key in CausalLMOutputWithPast.__dataclass_fields__:
                result[key] = value
        return result.to_tuple() if return_dict is False else result


def install(model: nn.Module) -> tuple[Optional[Callable[[], None]], str]:
    """Install the fused linear cross-entropy on a (PEFT-wrapped) Hugging Face causal LM, in place.

    Returns ``(undo, description)``: ``undo()`` restores the model's forward exactly (None when nothing was
    installed, and then ``description`` says why). Nothing is registered on the model (no parameter, buffer or
    submodule): only the causal LM instance's ``forward`` attribute is set. With labels and gradients enabled the
    forward returns ``logits=None``; otherwise it is the model's own.

    Usage::

        undo, description = install(peft_model); ...; undo()
    """
    lm = unwrap_peft(model)
    reason = _refusal(lm)
    if reason is not None:
        return None, reason
    previous = lm.__dict__.get("forward")
    fused = _FusedLossForward(lm, previous)
    lm.forward = fused

    def undo() -> None:
        if lm.__dict__.get("forward") is not fused:
            return
        if previous is not None:
            lm.forward = previous
        else:
            del lm.forward

    head = lm.get_output_embeddings()
    description = (
        f"fused linear cross-entropy on {type(lm).__name__} (chunks of {fused.chunk} tokens x {head.out_features} "
        f"vocab; logits not returned when training with labels)"
    )
    return undo, description
