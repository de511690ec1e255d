"""Will this training step fit? Per contender: the accounted peak with its breakdown, the longest sequence that fits
a memory budget, and which option would make it fit. Behind ``fastlora plan``; downloads nothing.

Usage::

    answer = plan(StepSpec("llama-3-8b", method="qlora", seq=8192), budgets_gib=(24, 80), host_budget_gib=256)
    print(render(StepSpec("llama-3-8b", method="qlora", seq=8192), (24, 80), answer, 256))
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Callable, Optional

from tqdm import tqdm

from fastlora.memory.presets import TARGETS, moe_config
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
    longest_seq: int  # at the first budget
    fixes: list[str] = field(default_factory=list)
    error: Optional[str] = None  # why this contender could not be accounted
    longest_by_budget: dict[float, int] = field(default_factory=dict)  # GiB -> tokens (host budget applied)
    host_limited: bool = False  # the host budget, not the device's, is what the step or the longest sequence hits

    def as_dict(self) -> dict:
        """For ``fastlora plan --json``."""
        a = self.accounting
        return {
            "fits": self.fits, "error": self.error, "peak": a and a.peak, "phase": a and a.phase,
            "breakdown": a and a.breakdown, "host_peak": a and a.host_peak, "host_state": a and a.host_state, "notes": a and a.notes,
            "longest_seq": {f"{b:g}": seq for b, seq in self.longest_by_budget.items()}, "host_limited": self.host_limited,
            "would_fit_with": self.fixes,
        }  # fmt: skip


#: Sequence lengths accounted first, to fit the peak's growth (a multiple of SEQ_STEP each).
FIT_SEQS = (4096, 32768, 131072)


def longest_fitting_seq(spec: StepSpec, contender: str, budget: int, limit: int = 1 << 21,
                        accounted: Optional[Callable[[int], int]] = None, known: Optional[dict[int, int]] = None) -> int:  # fmt: skip
    """The longest sequence (a multiple of :data:`SEQ_STEP`, up to ``limit``) whose accounted peak is within
    ``budget`` bytes; 0 if none. ``known``: peaks already accounted (sequence -> bytes), used and filled.

    The peak is piecewise linear in the sequence (flash attention: every tensor that grows, grows linearly; which
    one is the peak changes at breakpoints), so: account :data:`FIT_SEQS`, predict the crossing with the budget on
    the segment of the accounted points around it (the last one extended beyond them), and confirm it with one
    accounted step on each side (the prediction and one SEQ_STEP more). A prediction that fails confirmation is
    refined from the points accounted since; a few rounds at most, then bisection between the known points."""
    peak = accounted or (lambda seq: account(spec.with_seq(seq), contender).peak)
    cache = known if known is not None else {}

    def fits(seq: int) -> bool:
        if seq not in cache:
            cache[seq] = peak(seq)
        return cache[seq] <= budget

    if not fits(SEQ_STEP):
        return 0
    for seq in FIT_SEQS:
        if seq <= limit and fits(seq) is False:
            break  # beyond the budget: the points above it would only be extrapolated past
    for _ in range(4):
        guess = _predicted(cache, budget, limit)
        if fits(guess) and (guess + SEQ_STEP > limit or not fits(guess + SEQ_STEP)):
            return guess
    lo = max(s for s in cache if cache[s] <= budget)
    hi = min((s for s in cache if cache[s] > budget), default=limit + SEQ_STEP)
    while hi - lo > SEQ_STEP:
        mid = (lo + hi) // 2 // SEQ_STEP * SEQ_STEP
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _predicted(known: dict[int, int], budget: int, limit: int) -> int:
    """Where the piecewise-linear interpolation of ``known`` (extended by its last segment) reaches ``budget``,
    rounded down to SEQ_STEP."""
    points = sorted(known.items())
    below = [p for p in points if p[1] <= budget]
    above = [p for p in points if p[1] > budget and p[0] > below[-1][0]]
    if above:
        (s0, p0), (s1, p1) = below[-1], above[0]
    else:
        (s0, p0), (s1, p1) = points[-2:] if len(points) > 1 else (points[0], points[0])
    slope = (p1 - p0) / (s1 - s0) if s1 != s0 else 0.0
    seq = limit if slope <= 0 else s0 + (budget - p0) / slope
    return int(max(SEQ_STEP, min(limit, seq)) // SEQ_STEP * SEQ_STEP)


def _host_capped_seq(seq: int, accounting: Accounting, host_budget: Optional[int]) -> Optional[int]:
    """The longest sequence whose host memory fits ``host_budget`` (None: no cap): offloaded checkpoints grow with
    the tokens, AdamW moments in host memory (``accounting.host_state``) do not."""
    per_tokens = accounting.host_peak - accounting.host_state
    if not host_budget or not accounting.host_peak:
        return None
    if host_budget < accounting.host_state:
        return 0
    return seq * (host_budget - accounting.host_state) // per_tokens if per_tokens else None


def _options(spec: StepSpec, contender: str) -> list[tuple[str, StepSpec, str]]:
    """Other ways to run the same step, each (description, spec, contender), least intrusive first."""
    options = []
    if spec.checkpointing == "off":
        options.append(("gradient checkpointing (non-reentrant)", dataclasses.replace(spec, checkpointing="non-reentrant"), contender))
    if contender in ("peft", "fastlora"):
        options.append(("fastlora with the fused cross-entropy (fastlora.patch(model, fused_cross_entropy=True))", spec, "fastlora+loss"))
    if contender != "fastlora+all":
        options.append(("offload checkpoints and tile the MLP, with the fused loss (fastlora.patch(model, "
                        "fused_cross_entropy=True, offload_checkpoints=True, tiled_mlp=True, chunked_norms=True))", spec, "fastlora+all"))
    if spec.checkpointing != "offload" and contender != "fastlora+all":
        options.append((
            "checkpoints offloaded to host memory (transformers: activation_checkpointing_enable(offload=True))",
            dataclasses.replace(spec, checkpointing="offload"), contender,
        ))  # fmt: skip
    if spec.method == "lora":
        options.append(("QLoRA (NF4 base weights)", dataclasses.replace(spec, method="qlora"), contender))
    if spec.experts == "dense" and moe_config(spec.model) is not None:
        who = contender if contender != "peft" else "fastlora+loss"
        options.append(("QLoRA with NF4 experts (fastlora.patch(model, quantize_experts='nf4'); bitsandbytes leaves 3-D "
                        "experts dense)", dataclasses.replace(spec, method="qlora", experts="nf4"), who))  # fmt: skip
    if not spec.optimizer.startswith("adamw-in-backward"):
        options.append(("AdamW in backward (fastlora.training.optimizer_in_backward.AdamWInBackward: no full set of "
                        "gradients, no foreach temporaries; no gradient clipping)", dataclasses.replace(spec, optimizer="adamw-in-backward"),
                        contender))  # fmt: skip
    if spec.optimizer != "adamw-in-backward-host-state":
        options.append(("AdamW in backward with its moments in host memory (AdamWInBackward(..., state_device='cpu'): "
                        "one parameter's moments on the device at a time, copied both ways each step)",
                        dataclasses.replace(spec, optimizer="adamw-in-backward-host-state"), contender))  # fmt: skip
    if spec.batch > 1:
        options.append((f"batch 1 with {spec.batch} gradient-accumulation steps", dataclasses.replace(spec, batch=1), contender))
    return options


def plan(spec: StepSpec, budgets_gib: tuple[float, ...], contenders: tuple[str, ...] = CONTENDERS, longest: bool = True,
         host_budget_gib: Optional[float] = None) -> dict[str, ContenderPlan]:  # fmt: skip
    """Per contender: does ``spec`` fit the first of ``budgets_gib`` (and the host budget, if given), the longest
    sequence that fits each budget, and what would make it fit, with what that saves."""
    budget = int(budgets_gib[0] * GIB)
    host_budget = None if host_budget_gib is None else int(host_budget_gib * GIB)
    answer = {}
    for contender in tqdm(contenders, desc="plan", unit="contender", leave=False):
        try:
            accounting = account(spec, contender)
        except ValueError as err:
            answer[contender] = ContenderPlan(None, False, 0, error=str(err))
            continue
        host_fits = host_budget is None or accounting.host_peak <= host_budget
        fits = accounting.peak <= budget and host_fits
        longest_by_budget, host_limited = {}, not host_fits
        if longest:
            known = {spec.seq: accounting.peak}
            # Offloaded checkpoints grow exactly with the tokens (moments kept on the host do not): the host budget
            # caps the sequence directly.
            host_cap = _host_capped_seq(spec.seq, accounting, host_budget)
            for b in budgets_gib:
                seq = longest_fitting_seq(spec, contender, int(b * GIB), known=known)
                if host_cap is not None and seq > host_cap:
                    seq, host_limited = host_cap // SEQ_STEP * SEQ_STEP, True
                longest_by_budget[b] = seq
        fixes = []
        if not fits:
            for description, other, who in _options(spec, contender):
                try:
                    other_peak = account(other, who).peak
                except ValueError:  # an option this contender cannot be accounted with (see account)
                    continue
                if other_peak <= budget:
                    fixes.append(f"{description}: saves {(accounting.peak - other_peak) / GIB:.2f} GiB")
        answer[contender] = ContenderPlan(accounting, fits, longest_by_budget.get(budgets_gib[0], 0), fixes, None,
                                          longest_by_budget, host_limited)  # fmt: skip
    return answer


def render(spec: StepSpec, budgets_gib: tuple[float, ...], answer: dict[str, ContenderPlan],
           host_budget_gib: Optional[float] = None) -> str:  # fmt: skip
    """The plan as text: one block per contender."""
    host = f", host {host_budget_gib:g} GiB" if host_budget_gib is not None else ""
    lines = [
        f"{spec.model}, {spec.method} r={spec.rank} on {spec.targets}{', NF4 experts' if spec.experts == 'nf4' else ''}, "
        f"{spec.dtype}, batch {spec.batch}, seq {spec.seq}, "
        f"checkpointing {spec.checkpointing}, {spec.optimizer} ({spec.optimizer_state} step); budget {budgets_gib[0]:g} GiB{host} (accounted, not measured on a device)"
    ]
    for contender, p in answer.items():
        a = p.accounting
        if a is None:
            lines.append(f"\n{contender}: not accounted: {p.error}")
            continue
        verdict = "fits" if p.fits else "does NOT fit" + (" (the host is the limit)" if p.host_limited else "")
        lines.append(f"\n{contender}: {verdict}: peak {a.peak / GIB:.2f} GiB (in {a.phase})")
        for category in CATEGORIES:
            lines.append(f"  {LABELS[category]:<36} {a.breakdown[category] / GIB:8.2f} GiB")
        phases = {phase: nbytes for phase, nbytes in a.phase_peaks().items() if phase}
        if phases:
            lines.append("  peak per phase: " + ", ".join(f"{phase} {nbytes / GIB:.2f} GiB" for phase, nbytes in phases.items()))
        if a.host_peak:
            lines.append(f"  {'host memory (checkpoints, moments)':<36} {a.host_peak / GIB:8.2f} GiB")
        for b, seq in p.longest_by_budget.items():
            if seq:
                lines.append(f"  longest sequence that fits {b:g} GiB: {seq} tokens at batch {spec.batch} (multiples of {SEQ_STEP})")
        if p.host_limited:
            lines.append(f"  the host budget ({host_budget_gib:g} GiB) is the limit, not the device's")
        for fix in p.fixes:
            lines.append(f"  would fit with: {fix}")
        if not p.fits and not p.fixes:
            lines.append("  no single option tried makes it fit (shorter sequences: see above)")
        for note in a.notes:
            lines.append(f"  note: {note}")
    return "\n".join(lines)


def add_parser(subparsers) -> None:
    """The ``fastlora plan`` subcommand's arguments."""
    from fastlora.memory.step import CHECKPOINTING, METHODS, OPTIMIZER_STATES, OPTIMIZERS

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
    p.add_argument("--targets", choices=tuple(TARGETS), default="all-linear",
                   help="LoRA targets; MoE presets (qwen3-30b-a3b, gpt-oss-20b): attention or attention+experts")
    p.add_argument("--experts", choices=("dense", "nf4"), default="dense",
                   help="MoE expert weights: dense, or NF4 (fastlora.patch(model, quantize_experts='nf4'); fastlora only)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=OPTIMIZERS[0],
                   help="torch AdamW with foreach (its CUDA default) or without, or fastlora's AdamW in backward "
                   "(fastlora.training.optimizer_in_backward: each parameter updated as its gradient completes), "
                   "with its moments in host memory (-host-state: state_device='cpu')")
    p.add_argument("--optimizer-state", choices=OPTIMIZER_STATES, default=OPTIMIZER_STATES[0],
                   help="steady: AdamW's moments live through the step (every step but the first); first-step: made by it")
    p.add_argument("--budget", default="24", help="device memory budget in GiB, or a comma list (longest sequence per budget; "
                   "the first decides fits)")
    p.add_argument("--host-budget", type=float, help="host memory in GiB for offloaded checkpoints and host-kept moments (default: unlimited)")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}")
    p.add_argument("--no-longest", action="store_true", help="skip the longest-sequence search (faster)")


def cmd_plan(args) -> int:
    """Run ``fastlora plan``: print the answer; exit status 0 if some contender fits, 1 if none does."""
    spec = StepSpec(args.model, method=args.method, rank=args.rank, seq=args.seq, batch=args.batch,
                    checkpointing=args.checkpointing, dtype=args.dtype, targets=args.targets, experts=args.experts,
                    optimizer=args.optimizer, optimizer_state=args.optimizer_state)  # fmt: skip
    contenders = tuple(c for c in args.contenders.split(",") if c)
    budgets = tuple(float(b) for b in str(args.budget).split(",") if b)
    answer = plan(spec, budgets, contenders, longest=not args.no_longest, host_budget_gib=args.host_budget)
    if args.json:
        print(json.dumps({"spec": dataclasses.asdict(spec), "budgets_gib": list(budgets), "host_budget_gib": args.host_budget,
                          "accounted": True, "contenders": {c: p.as_dict() for c, p in answer.items()}}, indent=1))  # fmt: skip
    else:
        print(render(spec, budgets, answer, args.host_budget))
    return 0 if any(p.fits for p in answer.values()) else 1
