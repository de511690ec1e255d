"""Run-time path choice by measurement: each op of a backend, per shape, runs the candidate timed fastest here.

Like ``torch.compile``'s max-autotune timing Triton templates against cuBLAS: a backend lists several
implementations (candidates) of an op, e.g. the C++ backend's fused few-token NF4 kernels, the whole-W buffer,
the panels and the ATen composite of the split practice. The first call of an op for a shape key (op, M bucket,
N, K, rank, dtype, base kind, dropout or not, device) times every candidate that applies, on that call's own
inputs, and keeps the fastest; later calls of the key go straight to it (one dict lookup).

- Bounded cost: M is bucketed by powers of 4 (1, 4, 16, ..., 16384: 8 buckets), so a run with varying sequence
  lengths tunes a handful of keys. Per key each candidate gets one warm-up call plus :data:`MIN_ROUNDS` (3) timed
  calls, and more, up to :data:`ROUNDS` (8), while the key's timing has taken less than :data:`BUDGET_S` (20 ms).
  The statistic is each candidate's fastest call; the backend's first-listed candidate keeps a key unless another
  is faster by more than :data:`TIE_MARGIN`, so noise does not flip choices.
- Persistence: choices are written to an on-disk cache (``$FASTLORA_TUNING_CACHE``, default
  ``~/.cache/fastlora/tuning.json``; ``off`` disables it) keyed by device name and the fastlora/torch/triton
  versions, so a second process does not time again. ``kernels/dispatch_table.json`` (shipped) seeds keys the
  cache lacks. A corrupt cache, or one from other versions, is ignored with a warning (and rewritten). See
  :mod:`fastlora.tuning.store`.
- Forcing: ``FASTLORA_PATH=<path>`` (read at first use and by :func:`reset`; ``FASTLORA_TRITON_PATH`` when it is
  unset) forces that candidate for every op that has it; ``FASTLORA_PATH=lora_linear=whole,lora_linear_grad_input=
  panels`` forces per op (an op named there must have the candidate). :func:`forced` does the same for a block.
- Not timed: the Triton interpreter (CPU tensors under ``TRITON_INTERPRET=1``, tests) keeps its launchers' own
  choice per call (:func:`fastlora.kernels.dispatch.choice`); calls made while a CUDA graph is captured take the
  first candidate.
- Guarded first launch: the first call of every key runs under :mod:`fastlora.tuning.guard`; a kernel that cannot
  compile or launch there falls back to the composite or the reference op, reported (:func:`launch_fallbacks`).
- Memory while timing: each candidate's output is dropped before the next runs (one alive at a time); the winner
  runs once more for the call's own output.
- Where: :mod:`fastlora.tuning.choice` (the choice and its state), :mod:`fastlora.tuning.store` (keys, the cache
  and the shipped table), :mod:`fastlora.tuning.guard` (first launches), :mod:`fastlora.tuning.ahead` (``tune``).
- Visibility: :func:`decisions` lists this process's choices with their source ("measured here", "cache",
  "shipped table", "forced by FASTLORA_PATH", "only candidate", "fallback: ..."); :func:`stored_decisions` lists
  the cache and the shipped table for this device (``fastlora info``); :func:`first_contact` counts keys and calls
  timed and Triton autotuner runs; :func:`tune` tunes ahead of time (``fastlora tune``,
  :mod:`fastlora.tuning.ahead`), so that a training process started afterwards times nothing.

Usage::

    impl = tuning.implementation("cpp", "cpu")       # a TunedOps: each op routed to its chosen candidate
    y = impl.lora_linear(x, w, None, 0, None, s, b)  # first call per shape key times the candidates
    for d in tuning.decisions(): print(d)
    with tuning.forced("panels"): ...
"""

from fastlora.tuning import guard, store  # noqa: F401 - submodules of the interface
from fastlora.tuning.ahead import tune  # noqa: F401
from fastlora.tuning.choice import (  # noqa: F401 - the interface
    BUDGET_S, FORCEABLE, LEGACY_PATH_ENV, MAX_M_BUCKET, MIN_ROUNDS, PATH_ENV, ROUNDS, TIE_MARGIN, TUNED_OPS,
    UNTUNED_OPS, Candidate, FirstContact, TunedOps, base_kind, choose, decisions, dtype_name, first_contact, forced,
    implementation, m_bucket, measurement_seconds, memo_holder, reset, shape_key, stored_decisions, timing_ops,
)
from fastlora.tuning.guard import LaunchFallback, LaunchFallbackWarning, launch_fallbacks  # noqa: F401
from fastlora.tuning.store import (  # noqa: F401
    CACHE_ENV, Decision, ShapeKey, Store, cache_path, device_name, shipped_table_path, versions,
)  # fmt: skip
