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

from fastlora.bench import layers, plots, report, training
from fastlora.bench.environment import backend_status, describe_environment
from fastlora.bench.results import Results
from fastlora.bench.settings import BenchSettings
from fastlora.bench.timing import measure_peaks


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
    environment = describe_environment()
    environment["backends"] = backend_status((device.type,))
    results = Results(environment=environment, settings=settings.to_dict())

    peaks = measure_peaks(device, settings.dtype, settings.timing) if "layers" in settings.suites else None
    results.peaks = None if peaks is None else asdict(peaks)
    cache = training.ModelCache()  # the train and memory suites share a build of the same model
    train_runs, memory_steps = training.count_runs(settings)
    suites = {
        "layers": (layers.count_cases(settings), lambda bar: layers.run_layer_suite(settings, device, peaks, bar)),
        "train": (train_runs, lambda bar: training.run_train_suite(settings, device, bar, cache)),
        "memory": (memory_steps, lambda bar: training.run_memory_suite(settings, device, bar, cache)),
    }
    for name in settings.suites:
        total, run = suites[name]
        with tqdm(total=total, desc=name, unit="case" if name == "layers" else "run", disable=not show_progress) as bar:
            setattr(results, name, run(bar))
        results.wall_time_s = time.perf_counter() - started
        write_outputs(results, out)  # after each suite: a run stopped later keeps a report of what it measured
    cache.clear()
    return results


def write_outputs(results: Results, out: Path) -> None:
    """results.json, the plots and report.md (which links the plots) into ``out``."""
    results.save(out / "results.json")
    written_plots = plots.write_plots(results, out)
    (out / "report.md").write_text(report.render_report(results, [p.name for p in written_plots]))
