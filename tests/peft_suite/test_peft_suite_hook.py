"""The PEFT-suite hook (fastlora_hook.py) patches models built through each PEFT entry point, leaves them computing
what PEFT computes, and flags ``internal error`` fallbacks; the LoRA selection keeps LoRA tests only."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fastlora_hook  # noqa: E402
from selection import is_lora_test  # noqa: E402

from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora import LoraLayer, LoraModel  # noqa: E402

import fastlora  # noqa: E402
from fastlora.wiring.patch import PatchReport, is_patched  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(11, 13)
        self.lin1 = nn.Linear(13, 7)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


@pytest.fixture
def hook(monkeypatch):
    monkeypatch.setattr(fastlora_hook, "BACKEND", "torch")
    monkeypatch.setattr(fastlora_hook, "TALLY", fastlora_hook.Tally())
    fastlora_hook.install()
    yield fastlora_hook
    fastlora_hook.uninstall()


def config():
    return LoraConfig(r=3, target_modules=["lin0", "lin1"], init_lora_weights=False)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


BUILDERS = {
    "get_peft_model": lambda base: get_peft_model(base, config()),
    "PeftModel": lambda base: PeftModel(base, config()),
    "LoraModel": lambda base: LoraModel(base, config(), "default"),
    "inject_adapter_in_model": lambda base: inject_adapter_in_model(config(), base),
}


@pytest.mark.parametrize("entry", BUILDERS)
def test_hook_patches_each_entry_point_and_keeps_peft_results(hook, entry):
    torch.manual_seed(0)
    base = MLP()
    model = BUILDERS[entry](base)
    assert len(lora_layers(model)) == 2 and all(is_patched(m) for m in lora_layers(model))
    copied = copy.deepcopy(model)  # its report is a copy, counted too
    reference = copy.deepcopy(model)
    assert fastlora.unpatch(reference) == 2  # PEFT's own forward, same weights
    x = torch.randn(5, 11)
    # float32 through the reference backend: PEFT's result up to summation order (default float32 tolerances).
    torch.testing.assert_close(model(x), reference(x))
    torch.testing.assert_close(copied(x), reference(x))
    assert sum(r.fused_calls for rs in hook.TALLY.reports.values() for r in rs) == 4


def test_hook_patches_adapters_added_later(hook):
    model = get_peft_model(MLP(), config())
    model.add_adapter("other", config())
    assert len(lora_layers(model)) == 2 and all(is_patched(m) for m in lora_layers(model))
    model.set_adapter("other")
    model(torch.randn(3, 11))
    reports = [r for rs in hook.TALLY.reports.values() for r in rs]
    assert sum(r.fused_calls for r in reports) == 2


def test_uninstall_restores_peft():
    import peft

    original = (PeftModel.__init__, peft.get_peft_model)
    fastlora_hook.install()
    assert PeftModel.__init__ is not original[0] and peft.get_peft_model is not original[1]
    fastlora_hook.uninstall()
    assert (PeftModel.__init__, peft.get_peft_model) == original


def test_internal_error_fallbacks_are_found_per_test():
    tally = fastlora_hook.Tally()
    clean, broken = PatchReport("cpp"), PatchReport("cpp")
    clean.fallback_calls["adapters disabled"] += 3
    broken.fallback_calls["internal error: KeyError('x') in lin0"] += 1
    tally.reports = {"t::clean": [clean], "t::broken": [clean, broken]}
    assert tally.internal_errors() == {"t::broken": ["internal error: KeyError('x') in lin0"]}
    assert tally.internal_errors_of("t::clean") == []


@pytest.mark.parametrize(
    "nodeid, expected",
    [
        ("tests/test_custom_models.py::TestPeftCustomModel::test_forward[Vanilla MLP 1 LoRA-MLP-LoraConfig-config_kwargs6]", True),
        ("tests/test_custom_models.py::TestPeftCustomModel::test_forward[Vanilla MLP 1 GLoRA-MLP-GloraConfig-config_kwargs0]", False),
        ("tests/test_custom_models.py::TestPeftCustomModel::test_forward[Vanilla MLP 1 AdaLoRA-MLP-AdaLoraConfig-config_kwargs0]", False),
        ("tests/test_custom_models.py::TestMixedAdapterBatches::test_mixed_adapter_batches_mlp[mlp]", True),
        ("tests/test_initialization.py::TestLoraInitialization::test_lora_use_dora_linear", True),
        ("tests/test_initialization.py::TestVeraInitialization::test_vera_mixing_save_projection_raises", False),
        ("tests/test_vera.py::TestVera::test_something", False),
    ],
)
def test_selection_keeps_lora_tests(nodeid, expected):
    assert is_lora_test(nodeid) is expected
