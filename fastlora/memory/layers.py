"""Account a model with a few decoder layers and extrapolate to all of them: what makes ``fastlora plan`` answer in
seconds for an 8B model.

Every decoder layer of a uniform model runs the same ops on the same shapes, so the live bytes of a step at any
moment are a constant plus a whole number of per-layer amounts (weights, adapters, checkpoints, gradients). The
tracker keeps the peak of each *segment* of the step, (phase, the decoder layer running: first, a middle one, the
last, or none yet), with :func:`marking_layers`. Within one segment every moment holds the same number of
per-layer amounts as a function of the layer count L, so each segment's peak is affine in L:

- the first and the last layer's segments, and those outside the layers, hold fixed layers and L-scaled totals;
- the middle layers' peak is the larger of the second layer's and the second-to-last's; with 3 layers they are the
  same layer, and from then on one of them stays the larger (they differ by (L - 3) times one layer's change of
  the baseline), so the line through 3 and 4 layers is exact too.

:func:`extrapolated` takes the peaks of each segment at 3 and 4 layers to L and returns the largest; the host
memory (offloaded checkpoints, one per layer) the same way. Models whose layers differ (``layer_types`` mixing
sliding and full attention, dense layers among MoE layers) are accounted in full: :func:`uniform_reason` says why.

Usage::

    with marking_layers(model, tracker):   # inside tracker.tracking(model)
        ...
    segment_peaks, host_peak = extrapolated(three_layers, four_layers, 32)
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Optional

from torch import Tensor, nn

#: The layer counts accounted for an extrapolation (see the module doc: 3 is the fewest with a middle layer).
FEW_LAYERS = (3, 4)


def uniform_reason(config) -> Optional[str]:
    """Why the decoder layers of ``config`` are not all alike (then a model is accounted in full), or None."""
    layers = config.num_hidden_layers
    if layers <= FEW_LAYERS[-1]:
        return f"{layers} decoder layers: accounted in full"
    for name, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == layers and len(set(map(str, value))) > 1:
            return f"the decoder layers differ ({name})"
    if getattr(config, "mlp_only_layers", None):
        return "the decoder layers differ (mlp_only_layers)"
    if (getattr(config, "decoder_sparse_step", 1) or 1) != 1 or getattr(config, "first_k_dense_replace", 0):
        return "the decoder layers differ (dense layers among the MoE layers)"
    return None


def with_layers(config, layers: int):
    """``config`` with ``layers`` decoder layers (per-layer lists cut to that length; they are uniform)."""
    for name, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == config.num_hidden_layers:
            setattr(config, name, type(value)(value[:layers]))
    config.num_hidden_layers = layers
    return config


def decoder_layers(model: nn.Module, count: int) -> nn.ModuleList:
    """The ``nn.ModuleList`` of ``model``'s ``count`` decoder layers (the first one named ``...layers``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name.endswith("layers"):
            return module
    raise ValueError(f"no ModuleList of {count} decoder layers in {type(model).__name__}")


@contextlib.contextmanager
def marking_layers(layers: nn.ModuleList, tracker) -> Iterator[None]:
    """Set ``tracker.segment`` to the position ("first", "middle", "last") of the decoder layer running: from its
    forward pre-hook (forward, and a checkpoint's recompute) and from the gradient of its output (its backward)."""
    count = len(layers)

    def position(index: int) -> str:
        return "first" if index == 0 else "last" if index == count - 1 else "middle"

    def entering(index: int):
        def hook(*_):
            tracker.segment = position(index)

        return hook

    def leaving(index: int):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, Tensor) and out.requires_grad:
                out.register_hook(entering(index))

        return hook

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(entering(index)))
        handles.append(layer.register_forward_hook(leaving(index)))
    try:
        yield
    finally:
        tracker.segment = None
        for handle in handles:
            handle.remove()


def extrapolated(few: tuple, more: tuple, layers: int) -> tuple[dict, int]:
    """(segment peaks, host peak) at ``layers`` decoder layers from two accountings with FEW_LAYERS[0] and
    FEW_LAYERS[1] layers, each given as (segment peaks, host peak): every segment's peak and breakdown, and the
    host peak, continued on the line through the two."""
    (segments_few, host_few), (segments_more, host_more) = few, more
    if set(segments_few) != set(segments_more):
        raise ValueError(f"segments differ between {FEW_LAYERS} layers: {set(segments_few) ^ set(segments_more)}")
    steps = layers - FEW_LAYERS[1]

    def line(a: int, b: int) -> int:
        return b + steps * (b - a)

    segments = {}
    for key, (peak_more, breakdown_more) in segments_more.items():
        peak_few, breakdown_few = segments_few[key]
        segments[key] = (line(peak_few, peak_more), {c: line(breakdown_few[c], n) for c, n in breakdown_more.items()})
    return segments, line(host_few, host_more)


def extrapolated_note(few: str, more: str, layers: int) -> str:
    """A note of the accountings with FEW_LAYERS layers at ``layers``: the counts that differ between the two
    (e.g. "4 MLPs tiled" and "3 MLPs tiled") continued on their line."""
    parts_few, parts_more = re.split(r"(\d+)", few), re.split(r"(\d+)", more)
    if len(parts_few) != len(parts_more):
        return more
    steps = layers - FEW_LAYERS[1]
    return "".join(b if a == b or not b.isdigit() else str(int(b) + steps * (int(b) - int(a)))
                   for a, b in zip(parts_few, parts_more))  # fmt: skip
