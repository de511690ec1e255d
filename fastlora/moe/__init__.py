"""LoRA on mixture-of-experts weights: PEFT's ``lora.ParamWrapper`` on transformers' 3-D expert parameters, fused
into grouped GEMMs with the LoRA term in their epilogue (no [E, N, K] delta is ever built).

- :mod:`fastlora.grouped_ops`: the op schema (``grouped_lora_forward`` / ``grouped_lora_backward``);
  implementations in :mod:`fastlora.backends.grouped_reference` (torch), :mod:`fastlora.backends.grouped_cpp` (C++ CPU) and
  ``fastlora.kernels.grouped_lora*`` (Triton).
- :mod:`fastlora.moe.autograd`: the autograd function; :mod:`fastlora.moe.experts`: the experts forward;
  :mod:`fastlora.wiring.experts`: what ``fastlora.patch`` installs on the ParamWrappers.

See docs/moe.md. Usage: ``fastlora.patch(peft_model)`` fuses the expert ParamWrappers along with the other layers.
"""

from fastlora.moe.nf4_experts import dequantize_experts, nf4_nbytes, quantize_experts  # noqa: E402

__all__ = ["dequantize_experts", "nf4_nbytes", "quantize_experts"]
