"""The long-context options of :func:`fastlora.patch`, installed and described in its report: offloaded
checkpoints (:mod:`fastlora.training.offload`), the tiled MLP (:mod:`fastlora.training.tiled_mlp`) and chunked RMSNorms
(:mod:`fastlora.training.rms_norm`).

Usage::

    report = fastlora.patch(model, offload_checkpoints=True, tiled_mlp=True, chunked_norms=True)
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable

from torch import nn

logger = logging.getLogger("fastlora")


def install(model: nn.Module, report: Any, offload_checkpoints: bool, tiled_mlp: bool | int, chunked_norms: bool) -> list[Callable[[], None]]:
    """Install the options asked for on ``model``, fill ``report`` (a :class:`fastlora.wiring.report.PatchReport`) and
    return the undo functions. Anything left as it was is in the report with its reason, and logged.

    Usage: ``undos = install(model, report, True, 4096, False)``
    """
    undos: list[Callable[[], None]] = []
    try:
        _install(model, report, offload_checkpoints, tiled_mlp, chunked_norms, undos)
    except BaseException:
        for undo in undos:  # never half-installed
            undo()
        raise
    return undos


def _install(model, report, offload_checkpoints, tiled_mlp, chunked_norms, undos: list) -> None:
    if offload_checkpoints:
        from fastlora.training import offload

        undo, report.offload = offload.install(model, report.offload_calls)
        if undo is None:
            report.offload = f"not offloaded: {report.offload}"
            logger.warning("fastlora: checkpoints stay on the device: %s", report.offload)
        else:
            undos.append(undo)
    if tiled_mlp is not False:
        from fastlora.training import tiled_mlp as tiling

        shard_tokens = None if tiled_mlp is True else int(tiled_mlp)
        undo, report.tiled_mlp, report.untiled_mlps = tiling.install(model, shard_tokens)
        undos.append(undo)
        if report.untiled_mlps:
            logger.warning("fastlora: MLPs left untiled: %s", _counts(report.untiled_mlps))
    if chunked_norms:
        from fastlora.training import rms_norm

        undo, report.chunked_norms, report.unchunked_norms = rms_norm.install(model)
        undos.append(undo)
        if report.unchunked_norms:
            logger.warning("fastlora: norms left unchunked: %s", _counts(report.unchunked_norms))


def report_parts(report: Any) -> list[str]:
    """The report's long-context lines (for ``str(report)``)."""
    calls = "".join(f"; {key}: {n}" for key, n in report.offload_calls.most_common())
    parts = [
        report.offload and f"offload: {report.offload}{calls}",
        report.tiled_mlp and f"tiled MLP: {report.tiled_mlp}",
        report.untiled_mlps and f"untiled MLPs: {_counts(report.untiled_mlps)}",
        report.chunked_norms and f"norms: {report.chunked_norms}",
        report.unchunked_norms and f"unchunked norms: {_counts(report.unchunked_norms)}",
    ]
    return [part for part in parts if part]


def _counts(reasons: dict[str, str]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in Counter(reasons.values()).most_common())
