"""Triton kernels for LoRA/QLoRA and their launchers: tensors in, tensors out (no autograd, no PEFT).

One operation per module; :mod:`~fastlora.kernels.dispatch` chooses between the fused kernels and the split
path (dequantize + cuBLAS + epilogue) and says why. Importing this module needs Triton; the kernels run on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before Triton is imported).

Usage::

    from fastlora import kernels
    s = kernels.lora_down(x, a, [16], seeds, [0.1], [2.0])
    y = kernels.lora_linear(x, packed, absmax, 64, bias, s, b)
"""

from fastlora.kernels import dispatch
from fastlora.kernels.lora_down import lora_down
from fastlora.kernels.lora_down_grad import lora_down_grad
from fastlora.kernels.lora_linear import lora_linear
from fastlora.kernels.lora_linear_grad_input import lora_linear_grad_input
from fastlora.kernels.lora_up_grad import lora_up_grad
from fastlora.kernels.nf4_absmax import nf4_resolve_absmax
from fastlora.kernels.nf4_dequantize import nf4_dequantize

__all__ = [
    "dispatch",
    "lora_down",
    "lora_down_grad",
    "lora_linear",
    "lora_linear_grad_input",
    "lora_up_grad",
    "nf4_dequantize",
    "nf4_resolve_absmax",
]
