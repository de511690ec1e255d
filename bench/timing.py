"""Timing and memory measurement: interleaved medians on CPU, CUDA events on GPU, device peaks, peak memory.

CPU: every contender of a case is called in turn, round after round, in one process, and each one's median
over the rounds is kept: a burst of load from elsewhere on the machine hits all contenders alike, so their
ratios hold. Each round calls them in a fresh random order (seeded: runs repeat), so every contender runs about
equally often after each of the others: a call finds the caches, and the C library's heap, as the previous call left
them (at a few tokens that moves a call's time by 10% and more on the 2-core CPUs measured; after a call that freed
multi-MB buffers, glibc may have returned the pages to the system, and the next call's allocations fault them in
again), and a fixed cyclic order (even rotated each round, which keeps who follows whom) favours or burdens
whoever always follows the same contender.
GPU: ``triton.testing.do_bench`` (CUDA events, median; it also flushes L2 before every call), with inputs rotating
through a pool larger than L2 so no call finds its activations cached.

Usage::

    medians = time_interleaved({"a": fn_a, "b": fn_b}, device, budget_s=0.5)     # seconds per call
    peaks = measure_peaks(torch.device("cpu"), torch.float32)
    with PeakMemory(device) as mem: step()
    mem.peak_bytes
"""

from __future__ import annotations

import ctypes
import gc
import math
import random
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RunBudget:
    """The wall-clock allowance of a whole run, from its creation: suites check :meth:`spent` before starting each
    case or run, so one in flight always finishes. ``None`` seconds never runs out.

    Usage: ``budget = RunBudget(settings.time_budget_s); ...; if budget.spent(): break``
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._deadline = None if seconds is None else time.monotonic() + seconds

    def spent(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline


#: The budget of a run without a time limit (the suites' default).
UNLIMITED = RunBudget(None)


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time each case: ``budget_s`` per contender, between ``min_rounds`` and ``max_rounds`` calls
    on CPU; ``warmup_ms``/``rep_ms`` are do_bench's on GPU."""

    budget_s: float = 0.3
    min_rounds: int = 5
    max_rounds: int = 400
    warmup_ms: float = 10.0
    rep_ms: float = 40.0


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, policy: TimingPolicy = TimingPolicy()
) -> dict[str, float]:
    """Median seconds per call of each function, all measured in this process on ``device``."""
    if not fns:
        return {}
    if device.type == "cuda":
        return {name: _do_bench(fn, policy) for name, fn in fns.items()}
    return _interleaved_cpu(fns, policy)


def _do_bench(fn: Callable[[], object], policy: TimingPolicy) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=policy.warmup_ms, rep=policy.rep_ms, return_mode="median") * 1e-3


def host_seconds(fn: Callable[[], object], device: torch.device, calls: int = 10) -> float | None:
    """Host seconds to issue one call without waiting for the GPU (None on CPU, where host time is the time).

    After a synchronize, ``calls`` calls run back to back with no synchronize in between, so the clock stops when
    the host has queued the last launch. Set against the GPU median, it says whether a case is bound by host
    overhead (Python, autograd and kernel launches): where host time nears the GPU time, the GPU waits on the host.
    """
    if device.type != "cuda":
        return None
    fn()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - started) / calls
    synchronize(device)
    return host


def _interleaved_cpu(fns: dict[str, Callable[[], object]], policy: TimingPolicy) -> dict[str, float]:
    for fn in fns.values():  # one warm-up call each: first-call allocations and lazy initialisation
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    started = time.perf_counter()
    rounds = 0
    contenders, shuffled = list(fns.items()), random.Random(0)
    while rounds < policy.max_rounds:
        for name, fn in shuffled.sample(contenders, len(contenders)):
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
        if rounds >= policy.min_rounds and time.perf_counter() - started > policy.budget_s * len(fns):
            break
    return {name: statistics.median(times) for name, times in samples.items()}


class RotatingInputs:
    """A pool of input sets cycled through call after call, together larger than ``cache_bytes`` when that
    takes at most ``max_items`` sets (so GPU timings never read activations from L2).

    ``make(i)`` builds the i-th set (a tuple of tensors); ``next()`` returns the sets in turn.
    """

    def __init__(self, make: Callable[[int], tuple], item_bytes: int, cache_bytes: int, max_items: int = 64):
        count = 1 if cache_bytes <= 0 else min(max_items, max(2, math.ceil(2 * cache_bytes / max(item_bytes, 1))))
        self.items = [make(i) for i in range(count)]
        self._index = 0

    def first(self) -> tuple:
        return self.items[0]

    def next(self) -> tuple:
        item = self.items[self._index]
        self._index = (self._index + 1) % len(self.items)
        return item


def cache_bytes(device: torch.device) -> int:
    """The last-level cache the GPU timings must defeat (L2 on CUDA); 0 on CPU, where inputs are not rotated."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


@dataclass(frozen=True)
class Peaks:
    """Measured device peaks: dense GEMM throughput in the compute dtype and device-memory copy bandwidth."""

    gemm_tflops: float
    gemm_shape: tuple[int, int, int]
    copy_gbps: float
    copy_bytes: int
    dtype: str


def measure_peaks(device: torch.device, dtype: torch.dtype, policy: TimingPolicy = TimingPolicy()) -> Peaks:
    """The GEMM and copy peaks of ``device``, measured now, so every fraction of peak in a report refers to the
    same machine state as its timings."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    copy_elems = (2**30 if device.type == "cuda" else 2**27) // 4  # 1 GiB on GPU, 128 MiB on CPU, fp32
    src = torch.empty(copy_elems, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    times = time_interleaved({"gemm": lambda: torch.mm(a, b), "copy": lambda: dst.copy_(src)}, device, policy)
    copy_bytes = 2 * src.numel() * src.element_size()  # read + write
    return Peaks(
        gemm_tflops=2 * size**3 / times["gemm"] / 1e12,
        gemm_shape=(size, size, size),
        copy_gbps=copy_bytes / times["copy"] / 1e9,
        copy_bytes=copy_bytes,
        dtype=str(dtype).removeprefix("torch."),
    )


class PeakMemory:
    """Peak memory over a ``with`` block: CUDA max allocated bytes, or on CPU the process's peak resident set
    sampled every 5 ms (``ru_maxrss`` cannot be reset, so it cannot tell one run from the previous). On CPU the
    block starts with ``malloc_trim``, so memory freed by earlier runs but kept by the C allocator does not
    count as in use, and the growth over ``start_bytes`` is what the block itself needed.

    ``peak_bytes`` is absolute (the model included); ``start_bytes`` is what was in use when the block began.
    """

    SAMPLE_S = 0.005

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            self.start_bytes = self.peak_bytes = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.SAMPLE_S):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())


def _release_free_heap() -> None:
    """Return the C allocator's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss
