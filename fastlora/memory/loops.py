"""Run fastlora's sequence loops (the fused loss's chunks, the tiled MLP's shards, the chunked norms' chunks) over
four of their iterations on meta tensors: the same peak as all of them, in a time that does not grow with the
sequence.

Each of those loops writes its results into tensors allocated before it (the loss's gradient of the hidden states,
the MLP's output and input gradient, the norm's output and rstd) and frees what an iteration allocates by the next
one or the one after. The first two iterations differ from the rest (accumulators are created, and may be the first
iteration's own results); from the third on, every full iteration holds its predecessor's leftovers while it
allocates its own, the same bytes each time. So the first three and the last (possibly shorter) iteration reach
every peak the whole loop reaches. The tests check it: the meta step with sampled loops equals the real CPU step
with all iterations, each loop many steps long (tests/test_memory_accounting.py; two iterations were not enough).

Usage::

    with sampled_loops():
        account the step on meta tensors
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence


def _sampled(items: Sequence) -> list:
    return list(items) if len(items) <= 4 else [*items[:3], items[-1]]


@contextlib.contextmanager
def sampled_loops() -> Iterator[None]:
    """Iterate the loss's, the tiled MLP's and the chunked norms' loops over their first three and last steps."""
    from fastlora.training import cross_entropy, rms_norm, tiled_mlp

    originals = [(cross_entropy, "_chunk_starts"), (tiled_mlp, "_shards"), (rms_norm, "_chunks")]
    saved = [(module, name, getattr(module, name)) for module, name in originals]
    for module, name, function in saved:
        setattr(module, name, lambda *args, _function=function: _sampled(_function(*args)))
    try:
        yield
    finally:
        for module, name, function in saved:
            setattr(module, name, function)
