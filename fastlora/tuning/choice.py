"""The run-time choice itself: per op and shape key, the candidate timed fastest here (see :mod:`fastlora.tuning`).

Usage::

    impl = implementation("cpp", "cpu")              # a TunedOps: each op routed to its chosen candidate
    y = impl.lora_linear(x, w, None, 0, None, s, b)  # first call per shape key times the candidates
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from typing import Callable, Iterator, NamedTuple

import torch

from fastlora import backends
from fastlora.backends import Candidate
from fastlora.tuning import guard
from fastlora.tuning.store import Decision, ShapeKey, Store, cache_path, device_name

PATH_ENV = "FASTLORA_PATH"
#: Read when FASTLORA_PATH is unset: the Triton-only variable of earlier versions, which scripts and tests still set.
LEGACY_PATH_ENV = "FASTLORA_TRITON_PATH"
#: Timed calls per candidate and key after the warm-up call: at least MIN_ROUNDS (a call stalled by other load on
#: the machine must not decide alone), more up to ROUNDS while the key's timing has taken less than BUDGET_S.
MIN_ROUNDS = 3
ROUNDS = 8
BUDGET_S = 0.02
#: Another candidate replaces the backend's first-listed one only when faster by more than this fraction.
TIE_MARGIN = 0.03
#: Largest M bucket: every larger M shares it.
MAX_M_BUCKET = 16384
TUNED_OPS = ("lora_down", "lora_linear", "lora_up_grad", "lora_down_grad", "lora_linear_grad_input")
#: What FASTLORA_PATH can name per op: the tuned ops and the autograd graph of a layer call (fastlora.functions.graph).
FORCEABLE = TUNED_OPS + ("lora_layer", "lora_layer_inference")
#: A kernel backend's ops without candidates, served by its module with the first launch guarded.
UNTUNED_OPS = ("nf4_resolve_absmax", "nf4_dequantize", "lora_linear_scaled")


def m_bucket(m: int) -> int:
    """The M bucket of ``m`` tokens: the next power of 4 (1, 4, 16, ...), at most :data:`MAX_M_BUCKET`."""
    return min(1 << (((m - 1).bit_length() + 1) & ~1) if m > 1 else 1, MAX_M_BUCKET)


# ---- raw keys: computed on every op call, so only what the arguments hold, no arithmetic -------------------------
# Each op's memo maps its raw key (exact shapes, dtypes, base kind, dropout) to the chosen candidate; a raw key seen
# for the first time is turned into a ShapeKey (M bucketed) and decided once per bucket.

#: Per op: its parameters, its raw key as an expression of them, and that key read back as
#: (M, N, K, rank, dtype, weight dtype or None, dense W?, dropout?).
_KEYS = {
    "lora_down": (
        "x, lora_a, ranks, seeds, dropout_p, scales",
        "x.shape, lora_a.shape, x.dtype, any(dropout_p)",
        lambda r: (r[0][0], 0, r[0][1], r[1][0], r[2], None, True, r[3]),
    ),
    "lora_linear": (
        "x, weight, absmax, blocksize, bias, lora_s, lora_b",
        "x.shape, lora_b.shape, x.dtype, weight.dtype, absmax is None",
        lambda r: (r[0][0], r[1][0], r[0][1], r[1][1], r[2], r[3], r[4], False),
    ),
    "lora_up_grad": (
        "grad_out, lora_b, lora_s, ranks, scales",
        "grad_out.shape, lora_b.shape, grad_out.dtype",
        lambda r: (r[0][0], r[0][1], 0, r[1][1], r[2], None, True, False),
    ),
    "lora_down_grad": (
        "grad_s, x, ranks, seeds, dropout_p",
        "x.shape, grad_s.shape, x.dtype, any(dropout_p)",
        lambda r: (r[0][0], 0, r[0][1], r[1][1], r[2], None, True, r[3]),
    ),
    "lora_linear_grad_input": (
        "grad_out, weight, absmax, blocksize, grad_s, lora_a, ranks, seeds, dropout_p",
        "grad_out.shape, lora_a.shape, grad_out.dtype, weight.dtype, absmax is None, any(dropout_p)",
        lambda r: (r[0][0], r[0][1], r[1][1], r[1][0], r[2], r[3], r[4], r[5]),
    ),
}
_RAW_KEYS = {op: eval(f"lambda {params}: ({key})") for op, (params, key, _) in _KEYS.items()}  # noqa: S307

# The router of one op, written out with the op's own parameters: no *args packing and no key function call on the
# hot path (each would add a few hundred ns to every op of every layer call).
_ROUTER = """
def {op}({params}):
    fn = holder[0].get(({key}))
    if fn is None:
        return first_call(({params}))
    return fn({params})
"""


def _router(op: str, holder: list[dict], first_call: Callable[[tuple], object]) -> Callable:
    params, key, _ = _KEYS[op]
    namespace = {"holder": holder, "first_call": first_call}
    exec(_ROUTER.format(op=op, params=params, key=key), namespace)  # noqa: S102 - fixed templates above
    return namespace[op]


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as keys name it: "float32", "bfloat16", ..."""
    return str(dtype).removeprefix("torch.")


def base_kind(weight_dtype: torch.dtype, dense: bool) -> str:
    """A frozen W's kind as keys name it: its dtype when dense, else "int8" (bitsandbytes 8-bit) or "nf4"."""
    if dense:
        return dtype_name(weight_dtype)
    return "int8" if weight_dtype == torch.int8 else "nf4"


def shape_key(backend: str, op: str, args: tuple, device: str) -> ShapeKey:
    """The key a call of ``op`` with ``args`` is decided under. Usage: ``shape_key("cpp", "lora_linear", args, "cpu")``"""
    m, n, k, rank, dtype, weight_dtype, dense, dropout = _KEYS[op][2](_RAW_KEYS[op](*args))
    base = "-" if weight_dtype is None else base_kind(weight_dtype, dense)
    return ShapeKey(backend, op, m_bucket(m), n, k, rank, dtype_name(dtype), base, bool(dropout), device)


# ---- state: forcing, this process's decisions, the cache --------------------------------------------------------

class _State:
    def __init__(self) -> None:
        self.forced: dict[str, str] | None = None
        self.forced_text = ""
        self.forced_source = ""
        self.op_seconds: list[float] | None = None  # while timing_ops() runs: seconds spent inside tuned ops
        # Every tuned op's live memo sits in a one-element holder; each op keeps one memo per (forced, timing)
        # state, and switch() points the holders at the current state's memos (reset() empties them).
        self.memos: list[tuple[list[dict], dict[tuple, dict]]] = []
        self.decisions: dict[tuple[str, str], Decision] = {}
        self.decided: dict[tuple[ShapeKey, str], list] = {}  # per bucketed key and forced state: see _choose
        self.cache: Store | None = None
        self.measure_seconds = 0.0
        self.measured_keys = 0  # keys timed in this process (see first_contact)
        self.timed_calls = 0  # candidate calls made while timing them

    def load_env(self) -> None:
        name = PATH_ENV if os.environ.get(PATH_ENV) else LEGACY_PATH_ENV
        text = os.environ.get(name, "")
        self.forced, self.forced_source = (_parse_forced(text), f"forced by {name}") if text else (None, "")
        self.forced_text = text

    def switch(self) -> None:
        state = (self.forced_text, self.op_seconds is not None)
        for holder, per_state in self.memos:
            holder[0] = per_state.setdefault(state, {})


def _parse_forced(text: str) -> dict[str, str]:
    """``"panels"`` -> {"*": "panels"}; ``"lora_linear=whole,..."`` -> {"lora_linear": "whole", ...}."""
    forced = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        op, _, path = item.rpartition("=")
        if op and op not in FORCEABLE:
            raise ValueError(f"{PATH_ENV}: unknown op {op!r} in {text!r} (ops: {', '.join(FORCEABLE)})")
        forced[op or "*"] = path
    return forced


_STATE = _State()
_STATE.load_env()


def reset() -> None:
    """Forget this process's choices, re-read ``FASTLORA_PATH`` and the cache location (tests, benchmarks)."""
    _STATE.load_env()
    _STATE.decisions.clear()
    _STATE.decided.clear()
    _STATE.cache = None
    _STATE.measure_seconds = _STATE.measured_keys = _STATE.timed_calls = 0
    guard.reset()
    for _, per_state in _STATE.memos:
        per_state.clear()
    _STATE.switch()


@contextlib.contextmanager
def forced(path: str) -> Iterator[None]:
    """Force ``path`` (as ``FASTLORA_PATH`` would) inside the block. Usage: ``with tuning.forced("whole"): ...``"""
    previous = _STATE.forced, _STATE.forced_source, _STATE.forced_text
    _STATE.forced, _STATE.forced_source, _STATE.forced_text = _parse_forced(path), "forced", path
    _STATE.switch()
    try:
        yield
    finally:
        _STATE.forced, _STATE.forced_source, _STATE.forced_text = previous
        _STATE.switch()


@contextlib.contextmanager
def timing_ops() -> Iterator[list[float]]:
    """Add up the wall seconds spent inside tuned ops during the block (into the yielded one-element list): the
    rest of a layer call's time is its host overhead (Python, autograd, argument handling).

    Usage: ``with tuning.timing_ops() as inside: layer(x)``; then ``inside[0]`` seconds were kernel work.
    """
    previous = _STATE.op_seconds
    _STATE.op_seconds = [0.0]
    _STATE.switch()
    try:
        yield _STATE.op_seconds
    finally:
        _STATE.op_seconds = previous
        _STATE.switch()


def memo_holder() -> list[dict]:
    """A one-element list holding a memo (raw key -> choice) for the current forced/timing state; :func:`reset`
    empties it and :func:`forced` swaps it. Usage: ``holder = tuning.memo_holder(); holder[0].get(raw)``"""
    holder: list[dict] = [{}]
    _STATE.memos.append((holder, {}))
    _STATE.switch()
    return holder


def decisions() -> list[Decision]:
    """Every choice this process made, in the order made. Usage: ``for d in tuning.decisions(): print(d)``"""
    return list(_STATE.decisions.values())


def measurement_seconds() -> float:
    """Wall seconds this process has spent timing candidates (the cost of run-time measurement)."""
    return _STATE.measure_seconds


def _cache() -> Store:
    if _STATE.cache is None:
        _STATE.cache = Store()
    return _STATE.cache


def stored_decisions(device: str) -> list[Decision]:
    """The cache's and the shipped table's choices for ``device`` (a name as :func:`device_name` gives)."""
    cache = _cache()
    found = []
    for table, source in ((cache.devices, "cache"), (cache.shipped, "shipped table")):
        for text, entry in sorted(table.get(device, {}).items()):
            fields = text.split("|")
            if len(fields) != 9 or not isinstance(entry, dict):
                continue
            backend, op, m, n, k, r, dtype, base, drop = fields
            key = ShapeKey(backend, op, int(m[1:]), int(n[1:]), int(k[1:]), int(r[1:]), dtype, base, drop != "-", device)
            found.append(Decision(key, entry.get("path", "?"), source, entry.get("times_us", {})))
    return found


# ---- the tuned implementation of one backend on one device ------------------------------------------------------

class TunedOps:
    """A backend's ops on one device type, each routed per shape key to its chosen candidate. Ops without
    candidates (the NF4 absmax resolve and dequantize, ...) are the backend module's own functions.

    Usage: ``TunedOps("cpp", "cpu", cpp_module, cpp_module.candidates()).lora_linear(x, w, None, 0, None, s, b)``
    """

    def __init__(self, backend: str, device_type: str, module, candidates: dict[str, dict[str, Candidate]]):
        self.backend, self.device_type, self.candidates, self.module = backend, device_type, candidates, module
        for op in candidates:
            setattr(self, op, self._routed(op))

    def __getattr__(self, name: str):
        # Only reached for names not set in __init__: the backend's untuned ops, looked up once (their first launch
        # per argument key guarded, see fastlora.tuning.guard), and its other functions.
        fn = getattr(self.__dict__["module"], name)
        if name in UNTUNED_OPS:
            fn = guard.guarded(self.backend, name, fn)
        setattr(self, name, fn)
        return fn

    def _routed(self, op: str) -> Callable:
        holder = memo_holder()
        return _router(op, holder, lambda args: self._first_call(op, holder[0], args))

    def _first_call(self, op: str, memo: dict, args: tuple):
        """Decide the candidate for a raw key not seen in the current state, remember it, and run the call."""
        raw = _RAW_KEYS[op](*args)
        device = _first_tensor(args).device
        key = shape_key(self.backend, op, args, device_name(device))
        applicable = {name: c.fn for name, c in self.candidates[op].items() if c.applies(key)}
        if not applicable:
            raise RuntimeError(f"fastlora: no {self.backend} implementation of {op} applies to {key.text}")
        decided = _STATE.decided.get((key, _STATE.forced_text))
        if decided is None:
            decided = _STATE.decided[(key, _STATE.forced_text)] = _choose(op, key, applicable, args, device)
            if decided[0] == guard.REFERENCE:  # every candidate failed while timed (each warned)
                guard.record(guard.LaunchFallback(self.backend, op, key.text, "every candidate", guard.REFERENCE, "failed while timed"))
            _STATE.decisions[(key.device, key.text)] = Decision(key, *decided)
        # The first launch of this exact key, guarded (the timing, if any, kept no output: see _measure).
        fallbacks = guard.fallbacks(op, applicable, decided[0])
        chosen = guard.path_function(op, decided[0], applicable)
        output, used, chosen = guard.first_launch(self.backend, op, key.text, decided[0], chosen, args, fallbacks)
        if used != decided[0]:  # the whole bucket takes the fallback: its other shapes need not fail again
            decided[:] = used, guard.source(self.backend, op, key.text), {}
            _STATE.decisions[(key.device, key.text)] = Decision(key, *decided)
        if len(memo) >= _MEMO_LIMIT:
            memo.clear()  # many distinct M (varying sequence lengths): start over rather than grow without bound
        memo[raw] = _timed(chosen) if _STATE.op_seconds is not None else chosen
        return output


_served: dict[tuple[str, str], object] = {}


def implementation(name: str, device_type: str):
    """The ops of backend ``name`` on ``device_type`` (raises BackendUnavailable if it cannot serve it): the torch
    reference (and the Triton interpreter) as they are; a kernel backend as a :class:`TunedOps`, which routes each op
    per shape to the candidate measured fastest here (the backend module's ``candidates()``). Called on every op in
    eager mode, so the answer is remembered; Triton on CPU depends on ``TRITON_INTERPRET`` and is checked each time.

    Usage: ``implementation("cpp", "cpu").lora_linear(x, w, None, 0, None, s, b)``
    """
    served = _served.get((name, device_type))
    if served is not None and not backends.varies_per_call(name, device_type):
        return served
    module = backends.module(name, device_type)
    if served is None:
        # Triton on CPU is the test interpreter, whose timings mean nothing: its launchers choose their own path
        # (fastlora.kernels.dispatch.choice, FASTLORA_PATH read on every call).
        if hasattr(module, "candidates") and not backends.varies_per_call(name, device_type):
            served = TunedOps(name, device_type, module, module.candidates(device_type))
        else:
            served = module
        _served[(name, device_type)] = served
    return served


def choose(key: ShapeKey, runs: dict[str, Callable[[], object]], device: torch.device, margin: float = TIE_MARGIN) -> str:
    """The path for ``key`` among ``runs`` (name -> a call without arguments, timed as a whole), decided once per
    key and forced state like the ops' paths: forced, else cache or shipped table, else measured now. The first run
    listed keeps the key unless another is faster by more than ``margin``.

    Usage: ``tuning.choose(key, {"function": run_a, "autograd": run_b}, x.device)``
    """
    decided = _STATE.decided.get((key, _STATE.forced_text))
    if decided is None:
        decided = _STATE.decided[(key, _STATE.forced_text)] = _choose(key.op, key, dict(runs), (), device, margin)
        if decided[0] not in runs:
            del _STATE.decided[(key, _STATE.forced_text)]
            raise RuntimeError(f"fastlora: every candidate of {key.text} failed ({', '.join(runs)})")
        _STATE.decisions[(key.device, key.text)] = Decision(key, *decided)
    return decided[0]


def _choose(op, key, applicable, args, device, margin: float = TIE_MARGIN) -> list:
    """[path, source, times in µs]."""
    forced = _STATE.forced
    note = ""
    if forced:
        wanted = forced.get(op) or forced.get("*")
        if wanted in applicable:
            return [wanted, _STATE.forced_source, {}]
        if op in forced:
            raise ValueError(f"fastlora: {_STATE.forced_source} {op}={wanted}, but {key.text} has only {sorted(applicable)}")
        if wanted is not None:
            note = f"; {wanted!r} does not apply here"
    if len(applicable) == 1:
        return [next(iter(applicable)), "only candidate" + note, {}]
    stored = _cache().lookup(key)
    if stored is not None and _still_valid(stored[0], applicable):
        return [stored[0]["path"], stored[1] + note, stored[0].get("times_us", {})]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return [next(iter(applicable)), "default (not timed while capturing a CUDA graph)" + note, {}]
    chosen, times = _measure(applicable, args, device, margin)
    if chosen is None:  # every candidate failed while timed: an op's key runs the reference op (see _first_call)
        return [guard.REFERENCE, "fallback: every candidate failed while timed", {}]
    _cache().store(key, chosen, times)
    return [chosen, "measured here" + note, times]


def _still_valid(entry: dict, applicable: dict) -> bool:
    """Whether a stored choice still answers: its path is a candidate now, and it was measured against every
    candidate there is now (a candidate added since, e.g. by a newer build, is timed rather than never tried)."""
    timed = entry.get("times_us") or {}
    return entry["path"] in applicable and (not timed or set(applicable) <= set(timed))


#: Most raw keys (exact shapes) an op remembers per state before starting over.
_MEMO_LIMIT = 4096


def _timed(fn: Callable) -> Callable:
    """``fn`` adding its wall time to the running :func:`timing_ops` total."""

    def timed(*args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            _STATE.op_seconds[0] += time.perf_counter() - started

    return timed


def _first_tensor(args: tuple) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


def _measure(
    applicable: dict[str, Callable], args: tuple, device: torch.device, margin: float = TIE_MARGIN
) -> tuple[str | None, dict[str, float]]:
    """Time every candidate on ``args``: one warm-up call (first-call compilation, autotuning, allocations), then
    :data:`MIN_ROUNDS` to :data:`ROUNDS` interleaved timed rounds (see the module docstring). Returns the winner and
    each candidate's fastest call in µs. Each output is dropped as soon as its call is timed, so the timing holds one
    candidate's output at a time (the caller runs the winner once more for the call's own output). A candidate that
    raises is dropped with a warning (logged, and a :class:`LaunchFallbackWarning`); when every one does, the
    winner is None."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    samples = {}
    _STATE.measured_keys += 1
    for round_index in range(ROUNDS + 1):
        for name, fn in list(applicable.items()):
            sync()
            t0 = time.perf_counter()
            _STATE.timed_calls += 1
            try:
                out = fn(*args)
            except guard.NOT_LAUNCH_ERRORS:
                raise
            except Exception as err:  # noqa: BLE001 - a failing candidate loses; the others still compete
                message = f"fastlora: candidate {name!r} failed while being timed ({guard.reason_of(err)}); left out"
                guard.logger.warning(message)
                warnings.warn(message, guard.LaunchFallbackWarning, stacklevel=6)
                del applicable[name]
                samples.pop(name, None)
                continue
            sync()
            elapsed = time.perf_counter() - t0
            del out  # before the next candidate runs: one output alive at a time
            if round_index > 0:
                samples.setdefault(name, []).append(elapsed)
        if not applicable:
            _STATE.measure_seconds += time.perf_counter() - started
            return None, {}
        if round_index >= MIN_ROUNDS and time.perf_counter() - started > BUDGET_S:
            break
    best_times = {name: min(times) for name, times in samples.items()}
    fastest = min(best_times, key=best_times.get)
    default = next(iter(applicable))
    chosen = default if best_times[default] <= (1 + margin) * best_times[fastest] else fastest
    _STATE.measure_seconds += time.perf_counter() - started
    return chosen, {name: round(t * 1e6, 2) for name, t in best_times.items()}


class FirstContact(NamedTuple):
    """What the run-time choice has cost this process so far (:func:`first_contact`)."""

    #: Shape keys timed here (each key is timed once per process, then read from memory or the cache).
    measured_keys: int
    #: Candidate calls made while timing: per key at most (1 + :data:`ROUNDS`) per candidate.
    timed_calls: int
    #: Wall seconds of that timing (compiles and Triton autotuning inside the warm-up calls included).
    seconds: float
    #: Triton autotuner runs (each compiles, where not cached, and benchmarks the pruned configs of one kernel key;
    #: the interpreter prunes to one config and times nothing). Counted since the kernels were imported.
    autotune_runs: int


def first_contact() -> FirstContact:
    """The cost of first contact so far: keys and calls timed, seconds, Triton autotuner runs. Take differences
    around a training step to count what it cost. Usage: ``before = tuning.first_contact(); step(); ...``"""
    common = sys.modules.get("fastlora.kernels.common")
    autotune_runs = len(common._TUNED) if common is not None else 0
    return FirstContact(_STATE.measured_keys, _STATE.timed_calls, _STATE.measure_seconds, autotune_runs)

