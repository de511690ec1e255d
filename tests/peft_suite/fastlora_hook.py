"""A pytest plugin that runs PEFT's own test suite with fastlora patched into every PEFT model with LoRA layers.

PEFT's tests build their models in many ways (``get_peft_model``, ``PeftModel(...)``, ``LoraModel(...)``,
``inject_adapter_in_model``, ``add_adapter``/``load_adapter``). The plugin wraps the four places they all go
through: ``get_peft_model``, ``PeftModel.__init__``, ``BaseTuner.__init__`` and ``BaseTuner.inject_adapter``. When
the outermost of these returns, the model it built is passed to ``fastlora.patch`` if it holds LoRA layers that are
neither patched yet nor already reported as left on PEFT.

Every report is kept; at the end each process writes the totals (layers patched and left on PEFT with reasons,
fused calls, calls run by PEFT with reasons, the tests that saw an ``internal error`` fallback, the failed tests)
to ``$FASTLORA_PEFT_SUMMARY.<worker>.json``; ``run.py`` adds them up and prints them. ``FASTLORA_PEFT_BACKEND``
names the backend; without it the plugin patches nothing (the unpatched reference run). Its options select the
LoRA tests (``selection.py``), drop listed ones and sample the rest with a fixed seed.

Usage::

    FASTLORA_PEFT_BACKEND=cpp python -m pytest -p fastlora_hook --fastlora-lora-only tests/test_custom_models.py
"""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import threading
import weakref
from collections import Counter

import pytest

import fastlora
from fastlora.wiring.patch import PatchReport, is_patched

BACKEND = os.environ.get("FASTLORA_PEFT_BACKEND", "")
SUMMARY_PATH = os.environ.get("FASTLORA_PEFT_SUMMARY", "")
INTERNAL_ERROR = "internal error"


class Tally:
    """The reports of every ``fastlora.patch`` call the hook made, and which test made them."""

    def __init__(self):
        self.reports: dict[str, list] = {}  # test id -> the PatchReports of the models it built
        self.current_test = "<collection>"
        self.patch_errors: dict[str, str] = {}  # test id -> exception fastlora.patch raised
        self.failed: dict[str, str] = {}  # test id -> phase and exception line
        self.ran = 0  # tests that reached their call phase
        self.durations: dict[str, float] = {}  # test id -> seconds (set-up, call and tear-down)
        # LoRA layers a report already listed as left on PEFT: not offered to patch again (and not counted twice).
        self.skipped_layers: "weakref.WeakSet" = weakref.WeakSet()

    def internal_errors(self) -> dict[str, list[str]]:
        """Test id -> the ``internal error`` fallback reasons its models counted."""
        found: dict[str, list[str]] = {}
        for test in self.reports:
            reasons = self.internal_errors_of(test)
            if reasons:
                found[test] = reasons
        return found

    def internal_errors_of(self, test: str) -> list[str]:
        return [reason for report in self.reports.get(test, ()) for reason in report.fallback_calls if reason.startswith(INTERNAL_ERROR)]

    def all_reports(self):
        return [report for reports in self.reports.values() for report in reports]

    def totals(self) -> dict:
        patched, skipped, fallbacks = Counter(), Counter(), Counter()
        fused = 0
        for report in self.all_reports():
            patched.update(report.patched.values())
            skipped.update(report.skipped.values())
            fallbacks.update(report.fallback_calls)
            fused += report.fused_calls
        return {
            "backend": BACKEND,
            "patch_calls": len(self.all_reports()),
            "layers_patched": dict(patched),
            "layers_left_on_peft": dict(skipped.most_common()),
            "fused_calls": fused,
            "calls_run_by_peft": dict(fallbacks.most_common()),
            "internal_errors": self.internal_errors(),
            "patch_errors": self.patch_errors,
            "ran": self.ran,
            "failed": self.failed,
            "durations": self.durations,
        }


TALLY = Tally()
_depth = threading.local()


def _unpatched_lora_layers(model) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(
        isinstance(module, LoraLayer) and not is_patched(module) and module not in TALLY.skipped_layers
        for module in model.modules()
    )


def _patch(model) -> None:
    if not BACKEND or not _unpatched_lora_layers(model):
        return
    try:
        report = fastlora.patch(model, backend=BACKEND)
    except Exception as err:
        # A PEFT model that fastlora.patch refuses is a fastlora bug: the test fails as the user's code would.
        TALLY.patch_errors[TALLY.current_test] = f"{type(err).__name__}: {err}"
        raise
    TALLY.reports.setdefault(TALLY.current_test, []).append(report)
    modules = dict(model.named_modules())
    TALLY.skipped_layers.update(modules[name] for name in report.skipped if name in modules)


def _after(target_of):
    """Wrap a PEFT entry point: when the outermost wrapped call returns, patch the model ``target_of`` names."""

    def wrap(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            _depth.value = getattr(_depth, "value", 0) + 1
            try:
                result = function(*args, **kwargs)
            finally:
                _depth.value -= 1
            if _depth.value == 0:
                _patch(target_of(result, *args, **kwargs))
            return result

        wrapper.__fastlora_hook__ = function
        return wrapper

    return wrap


def _instance(result, self, *args, **kwargs):
    return self


def _returned(result, *args, **kwargs):
    return result


def _injected_model(result, tuner, *args, **kwargs):
    # inject_adapter(model, adapter_name, ...): the tuner when it injects into its own model (its watch then
    # catches later adapters, as after a user's patch call), else the model it was given.
    model = args[0] if args else kwargs["model"]
    return tuner if model is getattr(tuner, "model", None) else model


def _entry_points():
    """(owner, attribute, which model to patch after it) for each PEFT entry point the hook wraps."""
    import peft
    import peft.mapping_func
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    # get_peft_model: every module that holds the name (tests import it from several places).
    holders = [m for m in (peft, peft.mapping_func, getattr(peft, "mapping", None)) if m is not None and hasattr(m, "get_peft_model")]
    return [(PeftModel, "__init__", _instance), (BaseTuner, "__init__", _instance), (BaseTuner, "inject_adapter", _injected_model)] + [
        (module, "get_peft_model", _returned) for module in holders
    ]


def _tracked_deepcopy(report: PatchReport, memo: dict) -> PatchReport:
    """A deep copy of a patched model carries a copy of its report (PEFT's tests copy models often): count it too."""
    clone = object.__new__(type(report))
    memo[id(report)] = clone
    for key, value in report.__dict__.items():
        setattr(clone, key, copy.deepcopy(value, memo))
    TALLY.reports.setdefault(TALLY.current_test, []).append(clone)
    return clone


def install() -> None:
    """Wrap PEFT's entry points (idempotent), and count the reports of deep-copied models."""
    PatchReport.__deepcopy__ = _tracked_deepcopy
    for owner, name, target_of in _entry_points():
        current = getattr(owner, name)
        if not hasattr(current, "__fastlora_hook__"):
            setattr(owner, name, _after(target_of)(current))


def uninstall() -> None:
    """Put PEFT's entry points back."""
    if PatchReport.__dict__.get("__deepcopy__") is _tracked_deepcopy:
        del PatchReport.__deepcopy__
    for owner, name, _ in _entry_points():
        current = getattr(owner, name)
        if hasattr(current, "__fastlora_hook__"):
            setattr(owner, name, current.__fastlora_hook__)


def pytest_addoption(parser):
    group = parser.getgroup("fastlora", "fastlora in PEFT's tests")
    group.addoption("--fastlora-lora-only", action="store_true", help="run only the LoRA tests (selection.py)")
    group.addoption("--fastlora-skip", action="append", default=[], help="a file of test ids not to run (repeatable)")
    group.addoption("--fastlora-sample", type=int, default=0, help="run a random sample of this many tests")
    group.addoption("--fastlora-seed", type=int, default=0, help="the sample's seed")


def pytest_configure(config):
    install()


def pytest_collection_modifyitems(config, items):
    """Keep the LoRA tests, minus the listed ones, then (if asked) a fixed-seed sample of what is left."""
    from selection import is_lora_test

    skip = set()
    for path in config.getoption("--fastlora-skip"):
        with open(path) as f:
            # One test id a line, optionally followed by "  # comment"; lines starting with "#" are comments.
            skip.update(line.split("  #", 1)[0].strip() for line in f if line.strip() and not line.startswith("#"))
    lora_only = config.getoption("--fastlora-lora-only")
    kept = [item for item in items if (not lora_only or is_lora_test(item.nodeid)) and item.nodeid not in skip]
    sample = config.getoption("--fastlora-sample")
    if sample and sample < len(kept):
        chosen = set(random.Random(config.getoption("--fastlora-seed")).sample(range(len(kept)), sample))
        kept = [item for i, item in enumerate(kept) if i in chosen]
    kept_ids = {id(item) for item in kept}
    config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept_ids])
    items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    TALLY.current_test = item.nodeid
    yield
    TALLY.current_test = "<between tests>"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test whose models counted an ``internal error`` fallback fails, even if PEFT's forward saved the result."""
    outcome = yield
    report = outcome.get_result()
    if call.when == "call" and report.passed:
        errors = TALLY.internal_errors_of(item.nodeid)
        if errors:
            report.outcome = "failed"
            report.longrepr = f"fastlora fell back on an internal error: {errors}"


def pytest_runtest_logreport(report):
    # Under xdist the controller sees every worker's reports too: only it (or a lone process) counts outcomes.
    if "PYTEST_XDIST_WORKER" in os.environ:
        return
    TALLY.durations[report.nodeid] = TALLY.durations.get(report.nodeid, 0.0) + report.duration
    if report.when == "call":
        TALLY.ran += 1
    if report.failed:
        TALLY.failed.setdefault(report.nodeid, f"{report.when}: {_last_line(report)}")


def _last_line(report) -> str:
    """The failure's exception message (pytest's crash line), on one line, for the summary."""
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return " ".join(text.split())[:300]


def pytest_sessionfinish(session):
    """Each process (each xdist worker) writes its own summary: ``FASTLORA_PEFT_SUMMARY`` + worker id + ``.json``."""
    if SUMMARY_PATH:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(f"{SUMMARY_PATH}.{worker}.json", "w") as f:
            json.dump(TALLY.totals(), f, indent=1)
