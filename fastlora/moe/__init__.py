"""LoRA on mixture-of-experts weights: PEFT's ``lora.ParamWrapper`` on transformers' 3-D expert parameters, fused
into grouped GEMMs with the LoRA term in their epilogue (no [E, N, K] delta is ever built).

- :mod:`fastlora.grouped_ops`: the op schema (``grouped_lora_forward`` / ``grouped_lora_backward``);
  implementations in :mod:`fastlora.backends.grouped_reference` (torch), :mod:`fastlora.backends.grouped_cpp`
  (C++ CPU) and :mod:`fastlora.backends.grouped_triton` (``fastlora.kernels.grouped_lora*``).
- :mod:`fastlora.moe.autograd`: the autograd function; :mod:`fastlora.moe.experts`: the experts forward;
  :mod:`fastlora.moe.structure`: experts modules and ParamWrapper chains in a model.
- :mod:`fastlora.moe.nf4_experts`: NF4 expert storage; :mod:`fastlora.moe.nf4_grouped`: the grouped linear over it;
  :mod:`fastlora.moe.nf4_quantize`: quantizing a model's experts.
- :mod:`fastlora.wiring.experts`: what ``fastlora.patch`` installs on the ParamWrappers.

See docs/moe.md. Usage: ``fastlora.patch(peft_model)`` fuses the expert ParamWrappers along with the other layers.
"""

from fastlora.moe.nf4_experts import nf4_nbytes
from fastlora.moe.nf4_quantize import dequantize_experts, quantize_experts

__all__ = ["dequantize_experts", "nf4_nbytes", "quantize_experts"]
