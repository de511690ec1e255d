"""Measure the run-time path choices for the GPU benchmark's layer shapes on this GPU, and ship them.

Runs :func:`fastlora.tuning.tune` (every candidate of every tuned op, per layer shape, M bucket and base) on the
Triton backend, then writes this GPU's choices into ``kernels/dispatch_table.json``, the shipped table that seeds
every user's cache: commit it so users on the same GPU start from measured choices.

Usage::

    python -m fastlora.bench.dispatch_shapes            # default GPU layer models, bf16, M buckets of the benchmark
"""

from __future__ import annotations

import json
import sys

import torch

from fastlora.bench.models import layer_shapes
from fastlora.bench.settings import default_settings


def benchmark_shapes(models: tuple[str, ...]) -> list[tuple[int, int]]:
    """Distinct (N, K) of the models' linear layers, in first-seen order."""
    shapes: dict[tuple[int, int], None] = {}
    for model in models:
        for shape in layer_shapes(model):
            shapes[(shape.out_features, shape.in_features)] = None
    return list(shapes)


def ship(decisions, device: str) -> int:
    """Merge ``decisions`` into the shipped table under ``device``; returns how many entries it now has there."""
    from fastlora import tuning

    path = tuning.shipped_table_path()
    table = json.loads(path.read_text()) if path.exists() else {"devices": {}}
    entries = table.setdefault("devices", {}).setdefault(device, {})
    for d in decisions:
        entries[d.key.text] = {"path": d.path, "times_us": d.times_us, "source": d.source}
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return len(entries)


def main() -> int:
    from fastlora import tuning

    settings = default_settings("cuda")
    shapes = benchmark_shapes(settings.layer_models)
    device = torch.device("cuda")
    name = tuning.device_name(device)
    print(f"tuning {len(shapes)} (N, K) shapes x {len(settings.tokens)} M on {name}", flush=True)
    # Shape by shape, shipped after each: a run cut short by a time limit keeps what it measured.
    for shape in shapes:
        for base in settings.bases:
            decisions = tuning.tune("triton", device, [shape], list(settings.tokens), base=base, dtype=settings.dtype)
            total = ship([d for d in decisions if d.key.device == name], name)
        print(f"  {shape}: {total} choices shipped so far ({tuning.measurement_seconds():.1f} s of timing)", flush=True)
    for decision in tuning.decisions():
        print(f"  {decision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
