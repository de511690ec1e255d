"""PEFT's sdist ships its tests without ``tests/conftest.py``; scripts/peft_tests.sh installs this file there.

It provides what PEFT's own conftest does that the LoRA tests need: the ``--regression`` option and marker
(regression tests are skipped without it). It does not require ``HF_TOKEN``: the run is offline (run.py).
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--regression", action="store_true", default=False, help="run regression tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "regression: regression tests (need --regression)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--regression"):
        skip = pytest.mark.skip(reason="regression test: needs --regression")
        for item in items:
            if "regression" in item.keywords:
                item.add_marker(skip)
