"""Measure the Triton backend's fused-vs-split dispatch table on this GPU for the GPU benchmark's layer shapes.

Writes ``kernels/dispatch_table.json`` (see :mod:`fastlora.kernels.dispatch`); commit it so later runs and
users on the same GPU dispatch by measurement instead of the shipped guess.

Usage::

    python -m fastlora.bench.dispatch_shapes            # default GPU layer models, bf16
"""

from __future__ import annotations

import sys

from fastlora.bench.models import layer_shapes
from fastlora.bench.settings import default_settings


def benchmark_shapes(models: tuple[str, ...]) -> list[tuple[int, int]]:
    """Distinct (N, K) of the models' linear layers, in first-seen order."""
    shapes: dict[tuple[int, int], None] = {}
    for model in models:
        for shape in layer_shapes(model):
            shapes[(shape.out_features, shape.in_features)] = None
    return list(shapes)


def main() -> int:
    from fastlora.kernels import dispatch

    settings = default_settings("cuda")
    shapes = benchmark_shapes(settings.layer_models)
    print(f"measuring fused vs split for {len(shapes)} (N, K) shapes on the GPU", flush=True)
    entries = dispatch.measure(shapes, dtypes=(settings.dtype,))
    split = sum(v["path"] == "split" for row in entries.values() for v in row.values())
    total = sum(len(row) for row in entries.values())
    print(f"dispatch table written: split chosen for {split} of {total} (op, base, shape, M) cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
