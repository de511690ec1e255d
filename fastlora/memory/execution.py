"""Run a training step on meta tensors as a GPU would run it.

- **Attention.** On meta (and CPU) ``scaled_dot_product_attention`` decomposes into the math path, whose
  [seq, seq] scores a GPU's flash kernel never holds. The accounting builds models with an attention function
  registered in transformers' ``AttentionInterface`` ("fastlora-accounting-cuda"): for calls without a mask
  it runs ``aten._scaled_dot_product_flash_attention`` (CUDA's flash kernel, which saves q, k, v, the output and
  an fp32 logsumexp; grouped-query k/v are not expanded), and transformers' SDPA otherwise. No mask tensor is
  built (:func:`_no_mask`): sliding-window layers (gpt-oss, Mistral) hold what flash holds; attention sinks
  (gpt-oss) add one logit per head, not counted. The
  "fastlora-accounting-cpu" variant runs the CPU's flash kernel (grouped k/v as they are, like the CPU's SDPA): the
  tests use it to check the accounting against a real CPU step. Registered functions stay active in backward,
  where gradient checkpointing recomputes attention (a ``TorchFunctionMode`` would not).
- **Autocast.** ``torch.autocast(device_type="meta")`` raises; PEFT opens one (disabled) around its
  ``ParamWrapper`` delta. :func:`meta_autocast` lets it open as the CPU's.
- **Data-dependent checks.** transformers asks ``bool(tensor)`` of a few all-true checks (packed sequences,
  skippable causal masks) before the decoder layers, which meta tensors cannot answer. The synthetic batch has one
  unpadded sequence per row, so those checks are true: :class:`MetaTruth` answers a meta tensor's truth value True.

Usage::

    name = attention_implementation("cuda-flash")    # pass as attn_implementation= when building the model
    with MetaTruth(): loss = model(**batch).loss
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode

ATTENTION_KERNELS = ("cuda-flash", "cpu-flash")


def attention_implementation(kernel: str) -> str:
    """Register (once) and name the accounting attention for ``kernel`` ("cuda-flash" or "cpu-flash")."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"attention kernel {kernel!r}: choose one of {ATTENTION_KERNELS}")
    name = f"fastlora-accounting-{kernel.split('-')[0]}"  # a name with "flash" in it would load flash-attn
    flash = _cuda_flash if kernel == "cuda-flash" else _cpu_flash

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if attention_mask is not None or kwargs.get("softcap") is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        out = flash(query, key, value, dropout, query.shape[2] > 1 and causal, scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask if kernel == "cpu-flash" else _no_mask)
    return name


def _no_mask(*args, **kwargs) -> None:
    """The accounting batch is unpadded: CUDA's flash kernels apply causal and sliding-window masks themselves,
    building no [seq, seq] tensor (a windowed layer holds what a full one holds)."""
    return None


def _cuda_flash(query, key, value, dropout_p, is_causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False, scale=scale)[0]


def _cpu_flash(query, key, value, dropout_p, is_causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal, scale=scale)[0]


class MetaTruth(TorchFunctionMode):
    """Answer ``bool(meta_tensor)`` True (see the module doc); everything else runs unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__bool__ and args[0].device.type == "meta":
            return True
        return func(*args, **(kwargs or {}))


class _MetaAutocast(torch.autocast):
    def __init__(self, device_type: str, *args, **kwargs):
        super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)


@contextlib.contextmanager
def meta_autocast() -> Iterator[None]:
    """``torch.autocast(device_type="meta", ...)`` opens as the CPU's inside the block (see the module doc)."""
    original, torch.autocast = torch.autocast, _MetaAutocast
    try:
        yield
    finally:
        torch.autocast = original
