"""What ``fastlora.patch`` did to a model: the :class:`PatchReport` it returns and keeps up to date.

Usage::

    report = fastlora.patch(model)
    print(report)                      # patched layers per backend, fallbacks with reasons, calls since
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from fastlora.training import long_context


@dataclass
class PatchReport:
    """What :func:`patch` did: fused layers with their backend, layers left on PEFT with the reason, and
    (updated live) how many calls of fused layers fell back to PEFT's forward, by reason.

    Usage::

        report = fastlora.patch(model); print(report); report.skipped   # {"name": "reason"}
    """

    requested_backend: str
    patched: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    already_patched: dict[str, str] = field(default_factory=dict)
    fallback_calls: Counter = field(default_factory=Counter)
    fused_calls: int = 0
    #: Why there was nothing to fuse in a PEFT model of another method (prompt tuning, IA³, ...), else None.
    nothing_to_fuse: Optional[str] = None
    #: Layers patched later, when ``add_adapter``/``load_adapter`` created them (also listed in ``patched``).
    patched_after: list[str] = field(default_factory=list)
    #: Verify mode: whether it is on, how many call signatures each layer verified, and the layers that failed
    #: (with what differed); a failed layer runs PEFT's forward from then on.
    verify: bool = False
    verified: Counter = field(default_factory=Counter)
    verify_failures: dict[str, str] = field(default_factory=dict)
    #: Layers whose fastlora code raised unexpectedly (``internal error: <type>: <message>``): the call ran PEFT's
    #: forward, and so does every later call of the layer. A bug in fastlora: please report it.
    internal_errors: dict[str, str] = field(default_factory=dict)
    #: The fused linear cross-entropy (``fused_cross_entropy=True``): what was installed, or "PEFT's loss (not
    #: fused: <why>)"; None when not asked for.
    fused_loss: Optional[str] = None
    #: Offloaded checkpoints (``offload_checkpoints=True``, :mod:`fastlora.training.offload`): what was installed, or "not
    #: offloaded: <why>"; None when not asked for. ``offload_calls`` counts checkpointed calls since, per outcome.
    offload: Optional[str] = None
    offload_calls: Counter = field(default_factory=Counter)
    #: Tiled MLP (``tiled_mlp=``, :mod:`fastlora.training.tiled_mlp`): what was installed (None when not asked for), and the
    #: MLPs left untiled with the reason.
    tiled_mlp: Optional[str] = None
    untiled_mlps: dict[str, str] = field(default_factory=dict)
    #: Chunked RMSNorms (``chunked_norms=True``, :mod:`fastlora.training.rms_norm`): what was installed (None when not asked
    #: for), and the norms left as they are with the reason.
    chunked_norms: Optional[str] = None
    unchunked_norms: dict[str, str] = field(default_factory=dict)
    #: ``quantize_experts=``: per expert weight put in NF4 (``"<experts module>.<name>"``), its bytes dense and in NF4.
    quantized_experts: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def paths(self) -> list:
        """The run-time path choices made so far in this process, per op and shape, each with where it came from
        (measured here, cache, shipped table, forced): :func:`fastlora.tuning.decisions`."""
        from fastlora import tuning

        return tuning.decisions()

    @property
    def launch_fallbacks(self) -> list:
        """Op keys whose kernel failed at its first launch and that run a fallback path since, each with the reason
        (:func:`fastlora.tuning.launch_fallbacks`): a kernel that cannot launch never crashes a step."""
        from fastlora import tuning

        return tuning.launch_fallbacks()

    @property
    def changed(self) -> bool:
        """Whether this call patched anything (False for a repeated ``patch``)."""
        return bool(self.patched)

    def __str__(self) -> str:
        parts = []
        if self.patched:
            per_backend = Counter(self.patched.values())
            parts.append(f"{len(self.patched)} LoRA layers fused ({_counts(per_backend)})")
        if self.already_patched:
            parts.append(f"{len(self.already_patched)} already patched, left as they were (nothing changed)")
        if self.skipped:
            parts.append(f"{len(self.skipped)} left on PEFT ({_counts(Counter(self.skipped.values()))})")
        if self.nothing_to_fuse:
            parts.append(self.nothing_to_fuse)
        if self.patched_after:
            parts.append(f"{len(self.patched_after)} of them patched when added after patch()")
        if self.verify:
            parts.append(f"verify: {sum(self.verified.values())} call signatures agreed with PEFT, {len(self.verify_failures)} layers failed")
        if self.fused_loss:
            parts.append(f"loss: {self.fused_loss}")
        if self.quantized_experts:
            before, after = (sum(sizes) for sizes in zip(*self.quantized_experts.values()))
            parts.append(f"{len(self.quantized_experts)} expert weights in NF4 ({before / 2**30:.3g} GiB -> {after / 2**30:.3g} GiB)")
        if self.internal_errors:
            parts.append(f"{len(self.internal_errors)} layers hit an internal error (run by PEFT since)")
        parts.extend(long_context.report_parts(self))
        if self.fallback_calls:
            parts.append(f"calls run by PEFT since: {_counts(self.fallback_calls)}")
        if self.launch_fallbacks:
            parts.append(f"kernels that failed to launch, on a fallback path: {'; '.join(map(str, self.launch_fallbacks))}")
        return "fastlora: " + ("; ".join(parts) if parts else "no LoRA layers")


def _counts(counter: Counter) -> str:
    return ", ".join(f"{key}: {n}" for key, n in counter.most_common())
