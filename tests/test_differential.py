"""Differential test matrix (the way PEFT tests itself): small models x PEFT configurations x operations, each run
on an unpatched PEFT model and on a fastlora-patched copy of it, step by step.

Every case asserts, after every operation, that the patched model's outputs (and, in training, its loss and every
trainable gradient) equal the unpatched model's within the dtype's tolerance. A fallback runs PEFT's own forward,
so it passes by construction; a *silent* difference (a fused path computing something else, as LoRA over a LoHa
layer once did) fails. Each case also checks the report's bookkeeping: every call of a patched layer is counted as
fused or as a fallback with a reason, and layers LoRA cannot fuse (another adapter below it) are reported.

CI runs a fixed-seed sample of the matrix; ``-m full_matrix`` runs all of it.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import fastlora
from fastlora.wiring.fused_forward import FusedForward
from peft import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig, PeftModel, get_peft_model
from tests.conftest import TINY_LLAMA, nf4_linear
from tests.moe_models import EXPERT_PARAMETERS, VOCAB, moe_model
from tests.moe_models import MODELS as MOE_KINDS

BACKEND = "cpp"
#: fp32 throughout: fastlora and PEFT differ only by summation order (fastlora adds the base and LoRA products
#: in one fp32 accumulator), ~1e-6 relative; a dropped or wrong term is off by far more than 1e-4.
RTOL, ATOL = 1e-4, 1e-5
SAMPLE = 80  # cases of the matrix in the default run (fixed seed): about 20 s on 2 cores
SGD_LR = 0.05


# ---- models ----------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Two linear layers with odd widths; ``lin0`` optionally NF4 (bitsandbytes 4-bit)."""

    def __init__(self, nf4: bool = False):
        super().__init__()
        self.lin0 = nf4_linear(13, 24, bias=True, compute_dtype=torch.float32) if nf4 else nn.Linear(13, 24)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(24, 7)
        self.is_loaded_in_4bit = nf4  # PEFT wraps bnb layers in lora.bnb.Linear4bit only on such models

    def forward(self, x):
        return self.lin1(self.act(self.lin0(x)))


class EmbeddingLinear(nn.Module):
    """An embedding (LoRA on it is never fused: reported) feeding a linear layer."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(31, 12)
        self.lin0 = nn.Linear(12, 9)

    def forward(self, x):
        return self.lin0(self.emb(x))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    targets: tuple[str, ...]

    def output(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=x) if self.name == "llama" else model(x)
        return out.logits if hasattr(out, "logits") else out


def _llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    return AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA))


MODELS = {
    "mlp": ModelSpec("mlp", MLP, lambda: torch.randn(3, 5, 13), ("lin0", "lin1")),
    "mlp-nf4": ModelSpec("mlp-nf4", lambda: MLP(nf4=True), lambda: torch.randn(3, 5, 13), ("lin0", "lin1")),
    "emb-linear": ModelSpec("emb-linear", EmbeddingLinear, lambda: torch.randint(0, 31, (2, 7)), ("emb", "lin0")),
    "llama": ModelSpec("llama", _llama, lambda: torch.randint(0, 128, (2, 9)), ("q_proj", "v_proj", "down_proj")),
}


# ---- configurations ----------------------------------------------------------------------------------------------


def lora(targets, **kwargs) -> LoraConfig:
    return LoraConfig(target_modules=list(targets), init_lora_weights=False, **kwargs)


#: name -> (list of (adapter name, config factory from targets), mixed model?, dropout?). The first adapter is the
#: PEFT model's; the others are added; all are active.
CONFIGS = {
    "r4": ([("default", lambda t: lora(t, r=4, lora_alpha=8))], False),
    "r8-rslora": ([("default", lambda t: lora(t, r=8, lora_alpha=4, use_rslora=True))], False),
    "bias-lora_only": ([("default", lambda t: lora(t, r=4, lora_alpha=8, bias="lora_only"))], False),
    "bias-all": ([("default", lambda t: lora(t, r=4, lora_alpha=8, bias="all"))], False),
    "dropout": ([("default", lambda t: lora(t, r=4, lora_alpha=8, lora_dropout=0.2))], False),
    "two-adapters": ([("default", lambda t: lora(t, r=4, lora_alpha=8)), ("second", lambda t: lora(t[:1], r=2, lora_alpha=3))], False),
    "dora": ([("default", lambda t: lora(t, r=4, lora_alpha=8, use_dora=True))], False),
    "lora_bias": ([("default", lambda t: lora(t, r=4, lora_alpha=8, lora_bias=True))], False),
    "mixed-loha-under-lora": ([("inner", lambda t: LoHaConfig(target_modules=list(t[:1]), init_weights=False)),
                               ("default", lambda t: lora(t[:1], r=4, lora_alpha=8))], True),
    "mixed-lokr-under-lora": ([("inner", lambda t: LoKrConfig(target_modules=list(t[:1]), init_weights=False)),
                               ("default", lambda t: lora(t[:1], r=4, lora_alpha=8))], True),
    "mixed-adalora-under-lora": ([("inner", lambda t: AdaLoraConfig(target_modules=list(t[:1]), init_lora_weights=False, total_step=10)),
                                  ("default", lambda t: lora(t[:1], r=4, lora_alpha=8))], True),
    "mixed-lora-beside-loha": ([("default", lambda t: lora(t[:1], r=4, lora_alpha=8)),
                                ("other", lambda t: LoHaConfig(target_modules=list(t[1:2]), init_weights=False))], True),
}  # fmt: skip

#: Configs whose masks differ from PEFT's by design: compared in eval mode only (training parity with dropout is
#: covered statistically by the layer and model parity suites).
DROPOUT_CONFIGS = {"dropout"}
OPERATIONS = ("forward", "train", "merge", "disable", "set_adapter", "add_adapter", "delete_adapter", "save_load", "hotswap")


def build(spec: ModelSpec, config_name: str) -> nn.Module:
    adapters, mixed = CONFIGS[config_name]
    model = None
    for name, make in adapters:
        config = make(spec.targets)
        if model is None:
            model = get_peft_model(spec.build(), config, adapter_name=name, mixed=mixed)
        else:
            model.add_adapter(name, config)
    names = [name for name, _ in adapters]
    if mixed:
        model.set_adapter(names)
    else:
        model.base_model.set_adapter(names)
    with torch.no_grad():  # random adapters: every term and gradient is non-trivial
        for name, p in model.named_parameters():
            if "lora_" in name or "hada_" in name or "lokr_" in name:
                p.normal_(0.0, 0.2)
    return model


# ---- comparing ---------------------------------------------------------------------------------------------------


class Pair:
    """An unpatched PEFT model and a patched deep copy, driven in lockstep."""

    def __init__(self, spec: ModelSpec, config_name: str, backend: str = BACKEND):
        self.spec, self.config = spec, config_name
        self.ref = build(spec, config_name)
        self.ours = copy.deepcopy(self.ref)
        self.report = fastlora.patch(self.ours, backend=backend)

    def both(self, fn: Callable[[nn.Module], object]) -> None:
        fn(self.ref)
        fn(self.ours)

    def check_forward(self, what: str) -> None:
        x = self.spec.inputs()
        calls_before = self._calls()
        with torch.no_grad():
            expected, got = self.spec.output(self.ref, x), self.spec.output(self.ours, x)
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}\n{self.report}")
        self._check_bookkeeping(calls_before)

    def check_training_step(self) -> None:
        x = self.spec.inputs()
        self.both(lambda m: m.train())
        losses, grads = [], []
        for model in (self.ref, self.ours):
            out = self.spec.output(model, x)
            loss = (out.float() ** 2).mean()
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p -= SGD_LR * p.grad
                        p.grad = None
        torch.testing.assert_close(losses[1], losses[0], rtol=RTOL, atol=ATOL)
        assert grads[0].keys() == grads[1].keys(), "different parameters received gradients"
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=RTOL, atol=ATOL, msg=lambda m: f"grad {name}: {m}")
        self.both(lambda m: m.eval())

    def _calls(self) -> int:
        return self.report.fused_calls + sum(self.report.fallback_calls.values())

    def _check_bookkeeping(self, calls_before: int) -> None:
        patched_layers = [m for m in self.ours.modules() if isinstance(m.__dict__.get("forward"), FusedForward)]
        # One forward calls each patched layer once: every one of those calls is counted, fused or fallback.
        assert self._calls() - calls_before == len(patched_layers), str(self.report)


def check_reported(pair: Pair) -> None:
    """LoRA over another adapter's layer is never fused: it is skipped, with a reason naming the adapter."""
    adapters, mixed = CONFIGS[pair.config]
    if pair.config.endswith("-under-lora"):
        inner = {"loha": "LoHa", "lokr": "LoKr", "adalora": "AdaLoRA"}[pair.config.split("-")[1]]
        reasons = [r for r in pair.report.skipped.values() if inner in r]
        assert reasons, f"LoRA over {inner} not reported: {pair.report}"
    if pair.spec.name == "emb-linear" and not mixed:
        assert any("emb" in name for name in pair.report.skipped), str(pair.report)


# ---- operations ----------------------------------------------------------------------------------------------------


def run_operation(pair: Pair, operation: str, tmp_path) -> None:
    pair.both(lambda m: m.eval())
    pair.check_forward("forward after patch")
    check_reported(pair)
    _, mixed = CONFIGS[pair.config]
    if operation == "forward":
        return
    if operation == "train":
        if pair.config in DROPOUT_CONFIGS:
            pytest.skip("dropout masks differ from PEFT's by design (covered statistically elsewhere)")
        pair.check_training_step()
        pair.check_forward("eval after a training step")
    elif operation == "merge":
        if mixed:
            pytest.skip("PEFT's mixed models merge through merge_and_unload only")
        if pair.config == "lora_bias" and pair.spec.name == "llama":
            pytest.skip("PEFT cannot merge lora_bias into a base layer without bias (the tiny Llama's)")
        pair.both(lambda m: m.base_model.merge_adapter())
        pair.check_forward("merged")
        pair.both(lambda m: m.base_model.unmerge_adapter())
        pair.check_forward("unmerged")
    elif operation == "disable":
        with pair.ref.disable_adapter(), pair.ours.disable_adapter():
            pair.check_forward("adapters disabled")
        pair.check_forward("adapters enabled again")
    elif operation == "set_adapter":
        names = [name for name, _ in CONFIGS[pair.config][0]]
        pair.both(lambda m: m.set_adapter(names[-1]) if mixed else m.base_model.set_adapter(names[-1]))
        pair.check_forward(f"only {names[-1]} active")
    elif operation == "add_adapter":
        config = lora(pair.spec.targets[-1:], r=3, lora_alpha=5)
        before = len(pair.report.patched)
        pair.both(lambda m: m.add_adapter("late", copy.deepcopy(config)))
        _randomize_like(pair, "late")
        names = [name for name, _ in CONFIGS[pair.config][0]] + ["late"]
        pair.both(lambda m: m.set_adapter(names) if mixed else m.base_model.set_adapter(names))
        pair.check_forward("adapter added after patch")
        # A layer the new adapter created is patched on creation (never silently left on PEFT's path).
        for name, module in pair.ours.named_modules():
            if hasattr(module, "lora_A") and "late" in module.lora_A:
                assert name in pair.report.patched or name in pair.report.skipped, f"{name} neither patched nor reported"
        assert len(pair.report.patched) >= before
    elif operation == "delete_adapter":
        names = [name for name, _ in CONFIGS[pair.config][0]]
        if len(names) < 2:
            pytest.skip("needs two adapters")
        pair.both(lambda m: m.set_adapter(names[:1]) if mixed else m.base_model.set_adapter(names[:1]))
        pair.both(lambda m: m.delete_adapter(names[-1]))
        pair.check_forward("adapter deleted after patch")
    elif operation in ("save_load", "hotswap"):
        if mixed:
            pytest.skip("PEFT's mixed models are not saved as one adapter")
        if operation == "hotswap" and pair.config.startswith("bias-"):
            pytest.skip("PEFT's hotswap_adapter raises on trained base biases (KeyError), patched or not")
        if operation == "hotswap" and pair.config == "dora":
            pytest.skip("PEFT's hotswap_adapter does not swap DoRA magnitudes (KeyError), patched or not")
        if operation == "hotswap" and pair.spec.name == "emb-linear":
            pytest.skip("PEFT's hotswap_adapter raises on a LoRA Embedding (no 'scaling'), patched or not")
        _save_load(pair, operation, tmp_path)


def _randomize_like(pair: Pair, adapter: str) -> None:
    generator = torch.Generator().manual_seed(1)
    ref_params = dict(pair.ref.named_parameters())
    with torch.no_grad():
        for name, p in pair.ours.named_parameters():
            if f".{adapter}." in name or name.endswith(f".{adapter}"):
                value = torch.randn(p.shape, generator=generator) * 0.2
                p.copy_(value)
                ref_params[name].copy_(value)


def _save_load(pair: Pair, operation: str, tmp_path) -> None:
    if pair.config not in DROPOUT_CONFIGS:
        pair.check_training_step()  # trained adapters, so saving carries values the fresh model does not have
    pair.ref.save_pretrained(tmp_path / "ref")
    pair.ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file

    saved_ref, saved_ours = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ref", "ours"))
    assert saved_ref.keys() == saved_ours.keys()
    for key in saved_ref:
        torch.testing.assert_close(saved_ours[key], saved_ref[key], rtol=RTOL, atol=ATOL)
    if operation == "save_load":
        fresh = PeftModel.from_pretrained(pair.spec.build(), tmp_path / "ours")
        pair.ref, pair.ours = fresh, copy.deepcopy(fresh)
        pair.report = fastlora.patch(pair.ours, backend=BACKEND)
        pair.both(lambda m: m.eval())
        pair.check_forward("reloaded and patched")
    else:
        from peft.utils.hotswap import hotswap_adapter

        pair.ref.save_pretrained(tmp_path / "other")
        pair.both(lambda m: hotswap_adapter(m, str(tmp_path / "other"), adapter_name="default"))
        pair.check_forward("hotswapped")


# ---- mixture-of-experts models: LoRA on the 3-D expert weights (PEFT's ParamWrapper) besides attention ---------------
# PEFT refuses dropout, DoRA, lora_bias and mixed models on ParamWrapper, so the MoE configs are the ones it accepts.

MOE_MODELS = {
    f"moe-{kind}": ModelSpec(f"moe-{kind}", lambda kind=kind: moe_model(kind), lambda: torch.randint(0, VOCAB, (2, 7)), ("o_proj",))
    for kind in MOE_KINDS
}  # fmt: skip
MOE_CONFIGS = {
    "moe-r4": ([("default", lambda t: lora(t, r=4, lora_alpha=8, target_parameters=EXPERT_PARAMETERS))], False),
    "moe-rslora": ([("default", lambda t: lora(t, r=8, lora_alpha=4, use_rslora=True, target_parameters=EXPERT_PARAMETERS))], False),
    "moe-two-adapters": ([("default", lambda t: lora(t, r=4, lora_alpha=8, target_parameters=EXPERT_PARAMETERS)),
                          ("second", lambda t: lora(t, r=2, lora_alpha=3, target_parameters=EXPERT_PARAMETERS))], False),
}  # fmt: skip
CONFIGS.update(MOE_CONFIGS)  # MoE configs go with MoE models only (_applicable)
MOE_CASES = [(m, c, o) for m in MOE_MODELS for c in MOE_CONFIGS for o in OPERATIONS if o != "hotswap"]
MOE_SAMPLED = random.Random(22).sample(MOE_CASES, 15)


# ---- the matrix ------------------------------------------------------------------------------------------------------


def _applicable(model: str, config: str) -> bool:
    if config in MOE_CONFIGS:
        return False  # drawn separately (MOE_CASES), so the sample of the other models stays as it was
    if CONFIGS[config][1] and model in ("emb-linear", "mlp-nf4"):
        return False  # mixed models: MLP and Llama cover them; LoHa/LoKr have no 4-bit or embedding layer here
    return not (config == "lora_bias" and model == "emb-linear")  # PEFT refuses lora_bias on an Embedding


ALL_CASES = [
    (m, c, o) for m in MODELS for c in CONFIGS for o in OPERATIONS if _applicable(m, c)
]  # fmt: skip
SAMPLED = random.Random(14).sample(ALL_CASES, SAMPLE)
# The reproduction is always in the sample.
SAMPLED += [case for case in [("mlp", "mixed-loha-under-lora", "forward"), ("mlp", "mixed-adalora-under-lora", "train")] if case not in SAMPLED]
SAMPLED += MOE_SAMPLED
SPECS = {**MODELS, **MOE_MODELS}


@pytest.mark.parametrize("model,config,operation", SAMPLED)
def test_patched_equals_peft_sampled(model, config, operation, tmp_path):
    run_operation(Pair(SPECS[model], config), operation, tmp_path)


@pytest.mark.full_matrix
@pytest.mark.parametrize("model,config,operation", [c for c in ALL_CASES + MOE_CASES if c not in SAMPLED])
def test_patched_equals_peft_full(model, config, operation, tmp_path):
    run_operation(Pair(SPECS[model], config), operation, tmp_path)

