"""A pytest plugin, test-only: every autotuned Triton kernel runs its first fitting config, nothing is benchmarked.

The GPU tests check results, not speed; autotuning each kernel key (compile and time every config) would spend most
of a short GPU step. With ``FASTLORA_TEST_SINGLE_CONFIG=1`` this plugin wraps each autotuner's pruner so that it keeps
the first config its own pruning left (the configs that fit the device). ``bench/gpu_check.sh`` step 1 loads it.

Usage: ``FASTLORA_TEST_SINGLE_CONFIG=1 python -m pytest -p tests.single_config -m gpu tests``
"""

from __future__ import annotations

import importlib
import os
import pkgutil

ENV_VAR = "FASTLORA_TEST_SINGLE_CONFIG"


def first_config_only(prune):
    """A pruner keeping the first config that ``prune`` (or, without one, the config list) keeps."""

    def pruned(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs) if prune is not None else configs
        return list(kept)[:1]

    return pruned


def single_config_everywhere() -> int:
    """Wrap the pruner of every autotuned kernel of :mod:`fastlora.kernels`; returns how many were wrapped."""
    from triton.runtime.autotuner import Autotuner

    import fastlora.kernels as package

    wrapped = 0
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, Autotuner) and not getattr(value, "_single_config", False):
                value.early_config_prune = first_config_only(getattr(value, "early_config_prune", None))
                value._single_config = True
                wrapped += 1
    return wrapped


def pytest_configure(config) -> None:
    if os.environ.get(ENV_VAR) == "1":
        count = single_config_everywhere()
        config.stash_single_config = count  # shown in the report header


def pytest_report_header(config):
    count = getattr(config, "stash_single_config", None)
    return None if count is None else f"{ENV_VAR}=1: {count} autotuned kernels on their first fitting config"
