"""Which of PEFT's tests exercise LoRA layers: the files and, per file, the rule that picks their LoRA tests.

Usage::

    from selection import is_lora_test
    is_lora_test("tests/test_custom_models.py::TestPeftCustomModel::test_forward[Vanilla MLP 1 LoRA-MLP-LoraConfig-config_kwargs6]")
"""

from __future__ import annotations

import re

#: The files of PEFT's tests/ that exercise LoRA (issue 20): all of each, but for the rules below.
FILES = (
    "test_custom_models.py",
    "test_mixed.py",
    "test_initialization.py",
    "test_other.py",
    "test_lora_variants.py",
    "test_bdlora.py",
    "test_tuners_utils.py",
    "test_low_level_api.py",
    "test_target_parameters.py",
)

# test_custom_models.py parametrizes most tests by (name, model, config class, kwargs) over ~40 PEFT methods: keep
# the LoraConfig ones, and the tests parametrized by no config class (LoRA-specific classes such as
# TestMixedAdapterBatches, or tests that build their own LoRA model; a non-LoRA one just patches nothing).
_CONFIG_CLASS = re.compile(r"[A-Za-z0-9]*Config")
_LORA_CONFIG = "LoraConfig"

#: test_initialization.py has a class per PEFT method; these classes test methods other than LoRA (LoRA's own
#: initialisations such as CorDA, EVA, KaSA and LoRA-GA stay).
_OTHER_METHOD_CLASSES = re.compile(
    r"::Test(AdaLora|Adamss|Beft|C3A|DeLoRA|Frod|GraLoRA|Hira|Hra|Lily|Lokr|Miss|Peanut|PromptTuning|Psoft|Road|"
    r"Shadow|Supertuning|TinyLora|VBLora|Velora|Vera|WaveFT)Initialization::"
)


def is_lora_test(nodeid: str) -> bool:
    """Whether the test (a pytest node id under PEFT's tests/) is one of the LoRA tests the suite runs."""
    path = nodeid.split("::", 1)[0]
    name = path.rsplit("/", 1)[-1]
    if name not in FILES:
        return False
    if name == "test_custom_models.py":
        configs = set(_CONFIG_CLASS.findall(nodeid.partition("[")[2]))
        return not configs or _LORA_CONFIG in configs
    return not _OTHER_METHOD_CLASSES.search(nodeid)
