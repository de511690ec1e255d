"""bench/gpu_check.sh as steps of at most 8 minutes, and its test-only single-config switch (no GPU needed).

The GPU machine runs one command for at most 10 minutes; each step must end within 8 by its own limits: the
time limits a step sets (its stages' hard ``timeout`` values), plus 60 s for setup (pip installs from local wheels
and ``fastlora info``), must stay within 480 s.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
STEP_SECONDS = 480
SETUP_SECONDS = 60


def _defaults() -> dict[str, int]:
    text = SCRIPT.read_text()
    found = {name: int(value) for name, value in re.findall(r"\$\{(FASTLORA_\w+):-(\d+)\}", text)}
    found["margin"] = int(re.search(r"^margin=(\d+)$", text, re.M).group(1))
    return found


def test_each_step_fits_in_eight_minutes():
    d = _defaults()
    step1 = d["FASTLORA_TEST_TIMEOUT"] + d["FASTLORA_CORE_BUDGET"] + d["margin"]
    step2 = d["FASTLORA_DISPATCH_TIMEOUT"] + d["FASTLORA_BENCH_BUDGET"] + d["margin"]
    assert SETUP_SECONDS + step1 <= STEP_SECONDS and SETUP_SECONDS + step2 <= STEP_SECONDS, (step1, step2)
    assert d["FASTLORA_TEST_TIMEOUT_EACH"] < d["FASTLORA_TEST_TIMEOUT"]


def test_script_parses_and_asks_for_a_step(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 2 and "usage" in run.stderr
    text = SCRIPT.read_text()
    assert "kernel_report" not in text.split("set -uo pipefail", 1)[1]  # the static stage runs off the GPU
    assert "--junitxml" in text and " -x " in text


def test_single_config_switch_keeps_the_first_fitting_config():
    triton = pytest.importorskip("triton")
    from tests.single_config import first_config_only

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    fits = lambda configs, named_args, **kw: [c for c in configs if c.kwargs["BLOCK"] >= 32]  # noqa: E731
    assert [c.kwargs["BLOCK"] for c in first_config_only(fits)(configs, {})] == [32]
    assert [c.kwargs["BLOCK"] for c in first_config_only(None)(configs, {})] == [16]


def test_single_config_switch_reaches_every_autotuned_kernel():
    pytest.importorskip("triton")
    import importlib

    from triton.runtime.autotuner import Autotuner

    from tests.single_config import single_config_everywhere

    import fastlora.kernels  # noqa: F401 - the package exports functions named like its modules: look modules up

    modules = [importlib.import_module(f"fastlora.kernels.{name}") for name in ("lora_down", "lora_linear", "lora_linear_grad_input")]
    kernels = [v for m in modules for v in vars(m).values() if isinstance(v, Autotuner)]
    originals = [(k, k.early_config_prune) for k in kernels]
    try:
        assert single_config_everywhere() >= len(kernels) >= 3
        assert all(k._single_config for k in kernels)
    finally:
        for kernel, prune in originals:
            kernel.early_config_prune = prune
            kernel._single_config = False
