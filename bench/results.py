"""The results schema: every raw figure a benchmark run produces, as flat records, saved as ``results.json``.

One record per (case, contender), so that tables, plots and later comparisons are simple filters. A
contender's ``status`` says whether its figures are valid: "ok" (checked, then measured), "mismatch" (its
outputs differ from the fp32 reference beyond ``tolerance``: not timed), "fallback" (fastlora ran PEFT's
forward instead of the fused path: not timed under fastlora's name), "skipped" (cannot run here, ``detail``
says why), "oom" (out of memory), "error" (raised; ``detail`` has the message).

Usage::

    results = Results(environment=describe_environment(), settings=asdict(settings))
    results.layers.append(LayerRecord(...))
    results.save("out/results.json"); Results.load("out/results.json")
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

SCHEMA_VERSION = 1
STATUSES = ("ok", "mismatch", "fallback", "skipped", "oom", "error")


@dataclass
class LayerRecord:
    """One contender on one LoRA layer case (shape, M tokens, base, mode, rank, dtype)."""

    model: str
    projections: str
    in_features: int
    out_features: int
    bias: bool
    tokens: int
    base: str  # "dense" | "nf4"
    mode: str  # "fwd" | "fwd+bwd"
    rank: int
    dtype: str
    contender: str
    status: str
    detail: str = ""
    check_error: Optional[float] = None  # max |out - ref| / max |ref| over all outputs and gradients
    tolerance: Optional[float] = None
    median_s: Optional[float] = None
    speedup_vs_peft: Optional[float] = None
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    gemm_peak_fraction: Optional[float] = None
    copy_peak_fraction: Optional[float] = None
    path: Optional[str] = None  # the Triton backend's fused/split choice, where it says
    host_s: Optional[float] = None  # GPU only: host time to issue one call (timing.host_seconds)


@dataclass
class TrainRecord:
    """One contender training one model configuration for ``warmup + steps`` optimizer steps."""

    model: str
    method: str  # "lora" | "qlora"
    checkpointing: bool
    contender: str
    status: str
    seq_len: int
    batch: int
    steps: int
    warmup: int
    dtype: str
    detail: str = ""
    tokens_per_s: Optional[float] = None
    median_step_s: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    start_memory_bytes: Optional[int] = None
    memory_kind: str = ""  # "cuda max allocated" | "process RSS"
    losses: list[float] = field(default_factory=list)  # warm-up steps included
    loss_max_abs_diff_vs_peft: Optional[float] = None
    loss_tolerance: Optional[float] = None


@dataclass
class MemoryRecord:
    """Peak memory of one training step (forward, backward, optimizer) at one sequence length."""

    model: str
    method: str
    checkpointing: bool
    contender: str
    status: str
    seq_len: int
    batch: int
    dtype: str
    detail: str = ""
    peak_memory_bytes: Optional[int] = None
    start_memory_bytes: Optional[int] = None
    memory_kind: str = ""
    step_s: Optional[float] = None


@dataclass
class Results:
    """A whole run: environment, settings, measured device peaks and the records of each suite."""

    environment: dict[str, Any]
    settings: dict[str, Any]
    peaks: Optional[dict[str, Any]] = None
    layers: list[LayerRecord] = field(default_factory=list)
    train: list[TrainRecord] = field(default_factory=list)
    memory: list[MemoryRecord] = field(default_factory=list)
    wall_time_s: Optional[float] = None
    # What the run's time budget left out, one line per suite it cut short.
    not_run: list[str] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False, default=str) + "\n")

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "Results":
        problems = validate(payload)
        if problems:
            raise ValueError("not a fastlora results file: " + "; ".join(problems))
        fields = {k: v for k, v in payload.items() if k not in _RECORD_TYPES}
        return cls(**fields, **{key: [kind(**r) for r in payload.get(key, [])] for key, kind in _RECORD_TYPES.items()})

    @classmethod
    def load(cls, path: str | Path) -> "Results":
        return cls.from_dict(json.loads(Path(path).read_text()))


_RECORD_TYPES = {"layers": LayerRecord, "train": TrainRecord, "memory": MemoryRecord}


def validate(payload: dict[str, Any]) -> list[str]:
    """Problems with a results payload (empty when it follows the schema): keys, record fields, statuses,
    and that every "ok" record carries its measurement."""
    problems = []
    if payload.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {payload.get('schema_version')!r} != {SCHEMA_VERSION}")
    for key in ("environment", "settings"):
        if not isinstance(payload.get(key), dict):
            problems.append(f"{key} missing or not an object")
    measured = {"layers": "median_s", "train": "tokens_per_s", "memory": "peak_memory_bytes"}
    for key, kind in _RECORD_TYPES.items():
        expected = {f.name for f in dataclasses.fields(kind)}
        required = {f.name for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        for i, record in enumerate(payload.get(key, [])):
            unknown, missing = set(record) - expected, required - set(record)
            if unknown or missing:
                problems.append(f"{key}[{i}]: unknown fields {sorted(unknown)}, missing {sorted(missing)}")
            if record.get("status") not in STATUSES:
                problems.append(f"{key}[{i}]: status {record.get('status')!r} not in {STATUSES}")
            elif record["status"] == "ok" and record.get(measured[key]) is None:
                problems.append(f"{key}[{i}]: status ok without {measured[key]}")
    return problems
