"""fastlora: fused-kernel compute for PEFT LoRA and QLoRA layers.

Usage::

    import fastlora
    model = get_peft_model(model, lora_config)
    report = fastlora.patch(model)
"""

from fastlora.backends import BackendUnavailable
from fastlora.wiring.patch import is_patched, patch, unpatch
from fastlora.wiring.report import PatchReport

from fastlora.version import __version__

__all__ = ["patch", "unpatch", "is_patched", "PatchReport", "BackendUnavailable", "__version__"]
