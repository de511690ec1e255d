"""fastlora: fused-kernel compute for PEFT LoRA and QLoRA layers.

Usage::

    import fastlora
    model = get_peft_model(model, lora_config)
    report = fastlora.patch(model)
"""

from fastlora.backends import BackendUnavailable
from fastlora.wiring.patch import PatchReport, is_patched, patch, unpatch

__version__ = "0.1.0"
__all__ = ["patch", "unpatch", "is_patched", "PatchReport", "BackendUnavailable", "__version__"]
