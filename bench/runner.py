"""Run the suites a :class:`BenchSettings` asks for and write report.md, results.json and the plots.

Usage::

    results = run_benchmarks(default_settings("cpu"), out_dir="bench-out")
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastlora.bench import layers, memory_accounting, plots, report, training
from fastlora.bench.environment import backend_status, describe_environment
from fastlora.bench.results import Results
from fastlora.bench.settings import BenchSettings
from fastlora.bench.timing import RunBudget, measure_peaks


def auto_threads() -> int:
    """CPU threads for torch: the cores not already busy (1-minute load average), at least 1. OpenMP threads
    that share a core with another busy process wait on each other at every barrier: on a loaded 2-core
    machine one thread runs a training step several times faster than two."""
    cores = torch.get_num_threads()
    try:
        busy = round(os.getloadavg()[0])
    except OSError:
        busy = 0
    return max(1, min(cores, (os.cpu_count() or cores) - busy))


def run_benchmarks(settings: BenchSettings, out_dir: str | Path, show_progress: bool = True) -> Results:
    """Run the suites of ``settings`` on its device, write the outputs into ``out_dir``, return the results."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available here")
    started = time.perf_counter()
    budget = RunBudget(settings.time_budget_s)
    environment = describe_environment()
    environment["backends"] = backend_status((device.type,))
    results = Results(environment=environment, settings=settings.to_dict())

    peaks = measure_peaks(device, settings.dtype, settings.timing) if "layers" in settings.suites else None
    results.peaks = None if peaks is None else asdict(peaks)
    cache = training.ModelCache()  # the train and memory suites share a build of the same model
    train_runs, memory_steps = training.count_runs(settings)
    # Per suite: how many cases/runs it has, how to run it, and how many of them its records cover.
    suites = {
        "layers": (
            layers.count_cases(settings),
            lambda bar: layers.run_layer_suite(settings, device, peaks, bar, budget, _Checkpoint(results, "layers", out, started)),
            layers.cases_done,
        ),
        "train": (
            train_runs,
            lambda bar: training.run_train_suite(settings, device, bar, cache, budget, _Checkpoint(results, "train", out, started)),
            len,
        ),
        "memory": (memory_steps, lambda bar: _memory_suite(settings, device, bar, cache, budget, results, out, show_progress), len),
    }
    for name in settings.suites:
        total, run, done = suites[name]
        with tqdm(total=total, desc=name, unit="case" if name == "layers" else "run", disable=not show_progress) as bar:
            setattr(results, name, run(bar))
        if done(getattr(results, name)) < total and budget.spent():
            results.not_run.append(
                f"{name}: {total - done(getattr(results, name))} of {total} not run: the time budget of "
                f"{settings.time_budget_s:g} s was spent"
            )
        results.wall_time_s = time.perf_counter() - started
        results.environment["tuning"] = _tuning_summary()
        write_outputs(results, out)  # after each suite: a run stopped later keeps a report of what it measured
    cache.clear()
    return results


def _memory_suite(settings: BenchSettings, device, bar, cache, budget: RunBudget, results: Results, out: Path, show_progress: bool):
    """Peak memory measured on the device, and alongside it the accounting of real sizes on meta tensors (kept as
    ``results.accounting`` for the report, and in accounting.json)."""
    records = training.run_memory_suite(settings, device, bar, cache, budget)
    if (settings.accounting_models or settings.accounting_longest_context) and not budget.spent():
        results.accounting = memory_accounting.run_suite(settings, out, show_progress)
    return records


def _tuning_summary() -> dict:
    """What run-time path choice cost this run: keys measured, seconds spent timing candidates, where the cache is."""
    from fastlora import tuning

    decisions = tuning.decisions()
    return {
        "measurement_s": tuning.measurement_seconds(),
        "measured": sum(d.source.startswith("measured") for d in decisions),
        "decisions": len(decisions),
        "cache": str(tuning.cache_path()),
    }


#: Least seconds between two checkpoint writes inside a suite (each renders the report).
CHECKPOINT_INTERVAL_S = 30.0


class _Checkpoint:
    """Called by a suite with its records so far: writes results.json and report.md (no plots, which are slow)
    at most every CHECKPOINT_INTERVAL_S, so a run killed mid-suite keeps most of what it measured."""

    def __init__(self, results: Results, suite: str, out: Path, started: float):
        self.results, self.suite, self.out, self.started = results, suite, out, started
        self.last = time.perf_counter()

    def __call__(self, records: list) -> None:
        now = time.perf_counter()
        if now - self.last < CHECKPOINT_INTERVAL_S:
            return
        self.last = now
        setattr(self.results, self.suite, list(records))
        self.results.wall_time_s = now - self.started
        # Said in the report in case nothing replaces it: the process may be killed before the suite ends.
        note = f"{self.suite}: still running when this report was written; it holds the {len(records)} records measured by then"
        self.results.not_run.append(note)
        try:
            write_outputs(self.results, self.out, with_plots=False)
        finally:
            self.results.not_run.remove(note)


def write_outputs(results: Results, out: Path, with_plots: bool = True) -> None:
    """results.json, the plots and report.md (which links the plots) into ``out``."""
    results.save(out / "results.json")
    written_plots = plots.write_plots(results, out) if with_plots else []
    (out / "report.md").write_text(report.render_report(results, [p.name for p in written_plots]))
