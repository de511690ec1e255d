"""Will this training step fit? Per contender: the accounted peak with its breakdown, the longest sequence that fits
a memory budget, and which option would make it fit. Behind ``fastlora plan``; downloads nothing.

Usage::

    answer = plan(StepSpec("llama-3-8b", method="qlora", seq=8192), budget_gib=24)
    print(render(answer))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Optional

from fastlora.memory.step import CONTENDERS, Accounting, StepSpec, account
from fastlora.memory.tracker import CATEGORIES

GIB = 2**30
#: Sequence lengths are searched in multiples of this many tokens.
SEQ_STEP = 256
LABELS = {
    "weights": "weights",
    "adapters": "adapters + grads + optimizer state",
    "activations": "saved activations",
    "logits": "logits and loss",
    "transient": "transient buffers",
}


@dataclass
class ContenderPlan:
    """One contender's answer: its accounting at the asked sequence, the longest sequence that fits, and the
    options (each a description) whose accounted peak fits the budget when this one does not."""

    accounting: Optional[Accounting]
    fits: bool
    longest_seq: int
    fixes: list[str] = field(default_factory=list)
    error: Optional[str] = None  # why this contender could not be accounted


def longest_fitting_seq(spec: StepSpec, contender: str, budget: int, limit: int = 1 << 20,
                        accounted: Optional[Callable[[int], int]] = None, known: Optional[dict[int, int]] = None) -> int:  # fmt: skip
    """The longest sequence (a multiple of :data:`SEQ_STEP`, up to ``limit``) whose accounted peak is within
    ``budget`` bytes; 0 if none. The peak grows about linearly in tokens (flash attention), so a line through the
    two longest accounted sequences predicts it and a few more accountings settle it exactly. ``known``: peaks
    already accounted (sequence -> bytes), used and filled."""
    peak = accounted or (lambda seq: account(spec.with_seq(seq), contender).peak)
    cache = known if known is not None else {}

    def fits(seq: int) -> bool:
        if seq not in cache:
            cache[seq] = peak(seq)
        return cache[seq] <= budget

    if not fits(SEQ_STEP):
        return 0
    fits(4 * SEQ_STEP)
    a, b = sorted(cache)[-2:]
    slope = max(1.0, (cache[b] - cache[a]) / (b - a))
    guess = max(SEQ_STEP, min(limit, int(b + (budget - cache[b]) / slope) // SEQ_STEP * SEQ_STEP))
    # Bracket the answer around the guess, then bisect.
    if fits(guess):
        lo, step = guess, SEQ_STEP
        while lo + step <= limit and fits(lo + step):
            lo, step = lo + step, step * 2
        hi = min(limit + SEQ_STEP, lo + step)
    else:
        hi, step = guess, SEQ_STEP
        while hi - step > SEQ_STEP and not fits(hi - step):
            hi, step = hi - step, step * 2
        lo = max(SEQ_STEP, hi - step)
    while hi - lo > SEQ_STEP:
        mid = (lo + hi) // 2 // SEQ_STEP * SEQ_STEP
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo if fits(lo) else 0


def _options(spec: StepSpec, contender: str) -> list[tuple[str, StepSpec, str]]:
    """Other ways to run the same step, each (description, spec, contender), least intrusive first."""
    options = []
    if spec.checkpointing == "off":
        options.append(("gradient checkpointing (non-reentrant)", dataclasses.replace(spec, checkpointing="non-reentrant"), contender))
    if contender != "fastlora+loss":
        options.append(("fastlora with the fused cross-entropy (fastlora.patch(model, fused_cross_entropy=True))", spec, "fastlora+loss"))
    if spec.checkpointing != "offload":
        options.append((
            "checkpoints offloaded to host memory (transformers: activation_checkpointing_enable(offload=True))",
            dataclasses.replace(spec, checkpointing="offload"), contender,
        ))  # fmt: skip
    if spec.method == "lora":
        options.append(("QLoRA (NF4 base weights)", dataclasses.replace(spec, method="qlora"), contender))
    if spec.batch > 1:
        options.append((f"batch 1 with {spec.batch} gradient-accumulation steps", dataclasses.replace(spec, batch=1), contender))
    return options


def plan(spec: StepSpec, budget_gib: float, contenders: tuple[str, ...] = CONTENDERS, longest: bool = True) -> dict[str, ContenderPlan]:
    """Per contender: does ``spec`` fit ``budget_gib``, the longest sequence that does, and what would make it fit."""
    budget = int(budget_gib * GIB)
    answer = {}
    for contender in contenders:
        try:
            accounting = account(spec, contender)
        except ValueError as err:
            answer[contender] = ContenderPlan(None, False, 0, error=str(err))
            continue
        fits = accounting.peak <= budget
        longest_seq = longest_fitting_seq(spec, contender, budget, known={spec.seq: accounting.peak}) if longest else 0
        fixes = []
        if not fits:
            for description, other, who in _options(spec, contender):
                try:
                    if account(other, who).peak <= budget:
                        fixes.append(description)
                except ValueError:  # an option this contender cannot be accounted with (see account)
                    continue
        answer[contender] = ContenderPlan(accounting, fits, longest_seq, fixes)
    return answer


def render(spec: StepSpec, budget_gib: float, answer: dict[str, ContenderPlan]) -> str:
    """The plan as text: one block per contender."""
    lines = [
        f"{spec.model}, {spec.method} r={spec.rank} on all linear layers, {spec.dtype}, batch {spec.batch}, seq {spec.seq}, "
        f"checkpointing {spec.checkpointing}; budget {budget_gib:g} GiB (accounted, not measured on a device)"
    ]
    for contender, p in answer.items():
        a = p.accounting
        if a is None:
            lines.append(f"\n{contender}: not accounted: {p.error}")
            continue
        verdict = "fits" if p.fits else "does NOT fit"
        lines.append(f"\n{contender}: {verdict}: peak {a.peak / GIB:.2f} GiB (in {a.phase})")
        for category in CATEGORIES:
            lines.append(f"  {LABELS[category]:<36} {a.breakdown[category] / GIB:8.2f} GiB")
        if p.longest_seq:
            lines.append(f"  longest sequence that fits: {p.longest_seq} tokens at batch {spec.batch} (multiples of {SEQ_STEP})")
        for fix in p.fixes:
            lines.append(f"  would fit with: {fix}")
        if not p.fits and not p.fixes:
            lines.append("  no single option tried makes it fit (shorter sequences: see above)")
        for note in a.notes:
            lines.append(f"  note: {note}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    """The ``fastlora plan`` subcommand's arguments."""
    from fastlora.memory.step import CHECKPOINTING, METHODS

    p = subparsers.add_parser(
        "plan", help="will a LoRA/QLoRA training step fit in a memory budget? (accounted on meta tensors, no download)"
    )
    p.add_argument("--model", default="llama-3-8b", help="preset (llama-3-8b, llama-3.2-1b, qwen2.5-7b, ...) or a config.json path")
    p.add_argument("--method", choices=METHODS, default="qlora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--checkpointing", choices=CHECKPOINTING, default="non-reentrant")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--budget", type=float, default=24.0, help="device memory budget in GiB")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}")
    p.add_argument("--no-longest", action="store_true", help="skip the longest-sequence search (faster)")


def cmd_plan(args) -> int:
    """Run ``fastlora plan``: print the answer; exit status 0 if some contender fits, 1 if none does."""
    spec = StepSpec(args.model, method=args.method, rank=args.rank, seq=args.seq, batch=args.batch,
                    checkpointing=args.checkpointing, dtype=args.dtype)  # fmt: skip
    contenders = tuple(c for c in args.contenders.split(",") if c)
    answer = plan(spec, args.budget, contenders, longest=not args.no_longest)
    print(render(spec, args.budget, answer))
    return 0 if any(p.fits for p in answer.values()) else 1
