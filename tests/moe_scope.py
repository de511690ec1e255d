"""Which MoE test cases run: the CI set by default, the whole sweep with ``FASTLORA_FULL_MOE=1``.

On the CPU backends (torch, cpp) every tiny model runs every check (about 15 s for all of tests/test_moe*.py).
Under ``TRITON_INTERPRET=1`` (its own process, tests marked "interpreter") the same checks run on the Triton kernels,
where one tiny-model forward+backward takes seconds. There CI keeps the models that give the kernels a different
input: Qwen3-MoE (W stored [E, N, K]) and gpt-oss (stored transposed [E, K, N], expert biases, interleaved and
clamped gating); the other three differ only in code that is the same on every backend (routing, shared experts),
checked on torch and cpp. The 10 training steps run the kernels of the gradient test again: interpreter only with
``FASTLORA_FULL_MOE=1``.

Usage::

    @pytest.mark.parametrize("backend", BACKENDS)
    @pytest.mark.parametrize("kind", model_kinds())
"""

from __future__ import annotations

import os

import pytest

from tests.moe_models import MODELS

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
FULL_SWEEP = os.environ.get("FASTLORA_FULL_MOE") == "1"
BACKENDS = ["torch", "cpp"] if not INTERPRETING else [pytest.param("triton", marks=pytest.mark.interpreter)]
INTERPRETER_KINDS = ("qwen3_moe", "gpt_oss")
SWEEP_ONLY = "under the Triton interpreter in the full sweep only (FASTLORA_FULL_MOE=1; tests/moe_scope.py says why)"


def model_kinds(interpreter_kinds=INTERPRETER_KINDS) -> list:
    """Every tiny MoE model kind, those outside ``interpreter_kinds`` skipped under the interpreter unless the full
    sweep is asked for."""
    trimmed = INTERPRETING and not FULL_SWEEP
    return [
        pytest.param(kind, marks=pytest.mark.skip(reason=SWEEP_ONLY)) if trimmed and kind not in interpreter_kinds else kind
        for kind in MODELS
    ]
