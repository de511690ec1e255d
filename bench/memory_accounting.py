"""The memory accounting suite: peak memory of one training step at real model sizes, accounted on meta tensors
(:mod:`fastlora.memory`), per contender with its breakdown, over sequence lengths and batch sizes; the longest
sequence that fits each budget; a plot of peak vs sequence length. Figures are accounted, not measured on a device.

Usage::

    python -m fastlora.bench.memory_accounting --model llama-3-8b --out bench/results/accounted-llama-3-8b
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

from tqdm import tqdm

from fastlora.memory.planner import GIB, LABELS, longest_fitting_seq
from fastlora.memory.step import CHECKPOINTING, CONTENDERS, StepSpec, account
from fastlora.memory.tracker import CATEGORIES

BUDGETS_GIB = (24, 40, 80, 141)


def run(spec: StepSpec, seqs: list[int], batches: list[int], budgets=BUDGETS_GIB, contenders=CONTENDERS,
        show_progress: bool = True) -> dict:  # fmt: skip
    """Accountings of ``spec`` over ``seqs`` x ``batches`` and the longest fitting sequence per budget (batch 1)."""
    rows, longest = [], {}
    cases = [(c, s, b) for b in batches for s in seqs for c in contenders]
    for contender, seq, batch in tqdm(cases, desc=f"accounting {spec.model}", unit="step", disable=not show_progress):
        a = account(dataclasses.replace(spec, seq=seq, batch=batch), contender)
        rows.append({"contender": contender, "seq": seq, "batch": batch, "peak": a.peak, "breakdown": a.breakdown,
                     "phase": a.phase, "notes": a.notes})  # fmt: skip
    for contender in tqdm(contenders, desc="longest sequence", unit="contender", disable=not show_progress):
        known = {r["seq"]: r["peak"] for r in rows if r["contender"] == contender and r["batch"] == 1}
        longest[contender] = {f"{b:g}": longest_fitting_seq(spec, contender, int(b * GIB), known=known) for b in budgets}
    return {"spec": spec.__dict__, "rows": rows, "longest": longest, "budgets_gib": list(budgets)}


def render(results: dict, environment: str, level: int = 1) -> str:
    """report.md for :func:`run`'s results (``level``: the markdown level of its title; sections one below)."""
    spec = results["spec"]
    title, sub = "#" * level, "#" * (level + 1)
    lines = [
        f"{title} Memory accounting: {spec['model']}, {spec['method']} r={spec['rank']} on all linear layers, {spec['dtype']}, "
        f"checkpointing {spec['checkpointing']}",
        "",
        "**Accounted, not measured on a device.** One real training step (forward, backward, AdamW step) of the model "
        "built on meta tensors; bytes of every live tensor at every op (fastlora.memory). Attention as CUDA's flash "
        "kernel runs it. Not counted: CUDA context, allocator rounding and fragmentation, cuBLAS/Triton workspaces, "
        "NCCL buffers.",
        "",
        *([environment, ""] if environment else []),
        f"{sub} Peak per step (GiB)",
        "",
        "| batch | seq | contender | peak | " + " | ".join(LABELS[c] for c in CATEGORIES) + " | vs PEFT |",
        "|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|",
    ]
    peft = {(r["seq"], r["batch"]): r["peak"] for r in results["rows"] if r["contender"] == "peft"}
    for r in results["rows"]:
        ratio = r["peak"] / peft[(r["seq"], r["batch"])] if (r["seq"], r["batch"]) in peft else float("nan")
        cells = " | ".join(f"{r['breakdown'][c] / GIB:.2f}" for c in CATEGORIES)
        lines.append(f"| {r['batch']} | {r['seq']} | {r['contender']} | {r['peak'] / GIB:.2f} | {cells} | {ratio:.2f}x |")
    lines += ["", f"{sub} Longest sequence that fits (batch 1, multiples of 256 tokens)", "",
              "| contender | " + " | ".join(f"{b:g} GiB" for b in results["budgets_gib"]) + " |",
              "|---|" + "---|" * len(results["budgets_gib"])]  # fmt: skip
    for contender, by_budget in results["longest"].items():
        lines.append(f"| {contender} | " + " | ".join(str(by_budget[f"{b:g}"]) for b in results["budgets_gib"]) + " |")
    notes = sorted({n for r in results["rows"] for n in r["notes"]})
    lines += ["", "Notes:", *[f"- {n}" for n in notes], "", "![peak vs sequence length](memory_vs_seq.png)", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Peak memory vs sequence length (batch 1), one line per contender, budgets as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for contender in dict.fromkeys(r["contender"] for r in results["rows"]):
        rows = sorted((r for r in results["rows"] if r["contender"] == contender and r["batch"] == 1), key=lambda r: r["seq"])
        ax.plot([r["seq"] for r in rows], [r["peak"] / GIB for r in rows], marker="o", label=contender)
    for budget in results["budgets_gib"]:
        ax.axhline(budget, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel("accounted peak memory (GiB)")
    ax.set_title(f"{results['spec']['model']} {results['spec']['method']}: one training step (accounted)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: unsloth's published longest contexts for Llama-3.1-8B QLoRA r=32, batch 1 (their docs, "Unsloth Benchmarks";
#: GB as they state it), quoted beside ours, labelled as theirs: not reproduced here.
UNSLOTH_PUBLISHED = {24: 78_475, 48: 191_728, 80: 342_733}
LONGEST_BUDGETS_GIB = (24, 48, 80, 141)
#: Where the step-time cost of the long-context options is measured (CPU, interleaved, by the training suite with
#: ``--long-context on``): quoted under the table.
STEP_TIME_NOTE = ("Step-time cost of offloaded checkpoints and the tiled MLP: measured on the CPU by the training suite "
                  "(`fastlora bench --suite train --model small-32k --long-context on`); the copy/compute overlap of the "
                  "offload is a GPU property, unmeasured.")


def longest_context(model: str = "llama-3-8b", rank: int = 32, budgets=LONGEST_BUDGETS_GIB, contenders=("peft", "fastlora+all"),
                    show_progress: bool = True) -> dict:  # fmt: skip
    """The longest QLoRA sequence (batch 1, checkpointing on) that fits each budget per contender, with the host
    memory the offloaded checkpoints need there (accounted at that length)."""
    spec = StepSpec(model, method="qlora", rank=rank, seq=8192, checkpointing="non-reentrant")
    table = {}
    for contender in tqdm(contenders, desc="longest context", unit="contender", disable=not show_progress):
        known: dict[int, int] = {}
        rows = {}
        for budget in budgets:
            seq = longest_fitting_seq(spec, contender, int(budget * GIB), known=known)
            host = account(spec.with_seq(seq), contender).host_peak if seq and contender == "fastlora+all" else 0
            rows[f"{budget:g}"] = {"seq": seq, "peak": known.get(seq), "host_peak": host}
        table[contender] = rows
    return {"spec": dataclasses.asdict(spec), "budgets_gib": list(budgets), "longest": table}


def render_longest_context(results: dict, step_time_note: str = "") -> str:
    """The longest-context table (markdown), unsloth's published figures beside it, labelled as theirs."""
    budgets = results["budgets_gib"]
    spec = results["spec"]
    lines = [
        f"Longest sequence that fits, {spec['model']} shapes (Llama-3.1-8B), QLoRA r={spec['rank']} on all linear layers, "
        f"{spec['dtype']}, batch 1, gradient checkpointing: **accounted** (fastlora.memory), not measured on a device.",
        "",
        "| | " + " | ".join(f"{b:g} GiB" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for contender, rows in results["longest"].items():
        lines.append(f"| {contender} (accounted) | " + " | ".join(f"{rows[f'{b:g}']['seq']:,}" for b in budgets) + " |")
        if any(rows[f"{b:g}"]["host_peak"] for b in budgets):
            lines.append(f"| {contender}: host memory needed | "
                         + " | ".join(f"{rows[f'{b:g}']['host_peak'] / GIB:.1f} GiB" for b in budgets) + " |")  # fmt: skip
    lines.append("| unsloth, published (theirs, GB, not reproduced) | "
                 + " | ".join(f"{UNSLOTH_PUBLISHED[b]:,}" if b in UNSLOTH_PUBLISHED else "-" for b in budgets) + " |")  # fmt: skip
    if step_time_note:
        lines += ["", step_time_note]
    return "\n".join(lines) + "\n"


#: The MoE cases of issue 22 (seq 4096, r=16, checkpointing on, the fused loss for fastlora): per row (method,
#: LoRA targets, expert storage, contender). PEFT + bitsandbytes cannot hold NF4 experts (bitsandbytes quantizes
#: nn.Linear only): its QLoRA rows keep them dense.
MOE_CASES = (
    ("lora", "attention+experts", "dense", "peft"), ("lora", "attention+experts", "dense", "fastlora+loss"),
    ("qlora", "attention+experts", "dense", "peft"), ("qlora", "attention+experts", "nf4", "fastlora+loss"),
    ("qlora", "attention", "dense", "peft"), ("qlora", "attention", "nf4", "fastlora+loss"),
    ("lora", "attention+experts", "dense", "fastlora+all"), ("qlora", "attention+experts", "nf4", "fastlora+all"),
)  # fmt: skip


def run_moe(models: list[str], seq: int = 4096, rank: int = 16, optimizers: tuple[str, ...] = ("adamw-foreach",),
            optimizer_states: tuple[str, ...] = ("steady",), cases=MOE_CASES, show_progress: bool = True) -> list[dict]:  # fmt: skip
    """``cases`` (default :data:`MOE_CASES`) per MoE preset, optimizer and optimizer state: the step's peak, its
    breakdown and the peak of each phase."""
    runs = [(model, *case, optimizer, state) for model in models for state in optimizer_states for case in cases
            for optimizer in optimizers]  # fmt: skip
    rows = []
    for model, method, targets, experts, contender, optimizer, optimizer_state in tqdm(
        runs, desc="accounting MoE", unit="step", disable=not show_progress
    ):
        spec = StepSpec(model, method=method, rank=rank, seq=seq, checkpointing="non-reentrant", targets=targets,
                        experts=experts, optimizer=optimizer, optimizer_state=optimizer_state)  # fmt: skip
        a = account(spec, contender)
        rows.append({"model": model, "method": method, "targets": targets, "experts": experts, "contender": contender,
                     "optimizer": optimizer, "optimizer_state": optimizer_state, "peak": a.peak, "breakdown": a.breakdown,
                     "phase": a.phase, "phase_peaks": a.phase_peaks(), "notes": a.notes, "host_peak": a.host_peak})  # fmt: skip
    return rows


def render_moe(rows: list[dict], seq: int, environment: str) -> str:
    """report.md for :func:`run_moe`'s rows. "vs PEFT": above weights over PEFT's (same model, method, LoRA targets
    and optimizer state; PEFT with torch's AdamW with foreach, as it trains by default)."""
    lines = [
        f"# MoE memory, accounted: seq {seq}, batch 1, LoRA r=16, bf16, gradient checkpointing (non-reentrant)",
        "",
        "**Accounted, not measured on a device** (fastlora.memory; NF4 experts as fastlora.moe.quantize_experts stores "
        "them, run on the meta model). "
        "fastlora rows: fused expert path and the fused loss. \"above weights\": peak minus frozen weights (it "
        "includes the LoRA parameters, their gradients and AdamW state). Forward/backward: the largest peak of those "
        "phases, above the weights. Optimizers: torch.optim.AdamW with foreach (its CUDA default) or without, and "
        "fastlora's AdamW in backward (fastlora.training.optimizer_in_backward; its updates run in the backward phase), "
        "with its moments on the device or in host memory (-host-state: state_device='cpu'; each update copies its "
        "parameter's two moments to the device and back). Host GiB: host memory the step holds (moments kept there, "
        "offloaded checkpoints). Steady step: AdamW's two moments live from the step's start (every step but the "
        "first); first-step: the step makes them.",
        "",
        environment,
        "",
        "| model | method | LoRA on | experts | contender | optimizer | step | peak GiB | above weights | vs PEFT | "
        "forward/backward above weights | optimizer step above weights | host GiB | weights | adapters+grads+AdamW | "
        "activations | logits | transient |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peft = {(r["model"], r["method"], r["targets"], r.get("optimizer_state")): r["peak"] - r["breakdown"]["weights"]
            for r in rows if r["contender"] == "peft" and r.get("optimizer", "adamw-foreach") == "adamw-foreach"}  # fmt: skip
    for r in rows:
        w, phases = r["breakdown"]["weights"], r["phase_peaks"]
        fwd_bwd = max(phases.get("forward", 0), phases.get("backward", 0))
        cells = " | ".join(f"{r['breakdown'][c] / GIB:.2f}" for c in CATEGORIES)
        base = peft.get((r["model"], r["method"], r["targets"], r.get("optimizer_state")))
        ratio = f"{(r['peak'] - w) / base:.2f}x" if base else "-"
        # AdamW in backward allocates nothing in the optimizer step phase: its updates ran in backward
        step_cell = f"{(phases['optimizer step'] - w) / GIB:.2f}" if "optimizer step" in phases else "(in backward)"
        lines.append(f"| {r['model']} | {r['method']} | {r['targets']} | {r['experts']} | {r['contender']} | "
                     f"{r.get('optimizer', 'adamw-foreach')} | {r.get('optimizer_state', 'first-step')} | "
                     f"{r['peak'] / GIB:.2f} | {(r['peak'] - w) / GIB:.2f} | {ratio} | {(fwd_bwd - w) / GIB:.2f} | "
                     f"{step_cell} | {r.get('host_peak', 0) / GIB:.2f} | {cells} |")  # fmt: skip
    notes = sorted({n for r in rows for n in r["notes"]})
    return "\n".join(lines + ["", "Notes:", *[f"- {n}" for n in notes]]) + "\n"


def run_matrix(models: list[str], methods: list[str], checkpointings: list[str], seq: int, batch: int, rank: int = 16,
               show_progress: bool = True) -> list[dict]:  # fmt: skip
    """One accounting per (model, method, checkpointing, contender) at one sequence length and batch."""
    cases = [(m, meth, ck, c) for m in models for meth in methods for ck in checkpointings for c in CONTENDERS]
    rows = []
    for model, method, checkpointing, contender in tqdm(cases, desc="accounting", unit="step", disable=not show_progress):
        a = account(StepSpec(model, method=method, rank=rank, seq=seq, batch=batch, checkpointing=checkpointing), contender)
        rows.append({"model": model, "method": method, "checkpointing": checkpointing, "contender": contender,
                     "peak": a.peak, "breakdown": a.breakdown, "phase": a.phase})  # fmt: skip
    return rows


def render_matrix(rows: list[dict], seq: int, batch: int, environment: str) -> str:
    """report.md for :func:`run_matrix`'s rows."""
    lines = [
        f"# Memory accounting: models x methods x checkpointing, seq {seq}, batch {batch}, r=16 on all linear layers, bf16",
        "",
        "**Accounted, not measured on a device** (see fastlora.memory; what is and is not counted: README, Memory).",
        "",
        environment,
        "",
        "| model | method | checkpointing | contender | peak GiB | " + " | ".join(LABELS[c] for c in CATEGORIES) + " | vs PEFT |",
        "|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|",
    ]
    peft = {(r["model"], r["method"], r["checkpointing"]): r["peak"] for r in rows if r["contender"] == "peft"}
    for r in rows:
        cells = " | ".join(f"{r['breakdown'][c] / GIB:.2f}" for c in CATEGORIES)
        ratio = r["peak"] / peft[(r["model"], r["method"], r["checkpointing"])]
        lines.append(f"| {r['model']} | {r['method']} | {r['checkpointing']} | {r['contender']} | {r['peak'] / GIB:.2f} | {cells} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def run_suite(settings, out: Path, show_progress: bool = True) -> list[dict]:
    """The accounting part of ``fastlora bench --suite memory``: :func:`run` per model of
    ``settings.accounting_models``, each with its plot in ``out``; a model that fails is recorded with its error."""
    runs = []
    for model in settings.accounting_models:
        spec = StepSpec(model, method=settings.accounting_method, rank=settings.train_rank,
                        checkpointing=settings.accounting_checkpointing)  # fmt: skip
        try:
            results = run(spec, list(settings.accounting_seq_lens), list(settings.accounting_batches), show_progress=show_progress)
        except Exception as err:  # noqa: BLE001 - recorded in the report; the other suites' results stand
            runs.append({"spec": spec.__dict__, "error": f"{type(err).__name__}: {err}".splitlines()[0]})
            continue
        results["plot"] = f"memory_accounted_{model}.png"
        plot(results, out / results["plot"])
        runs.append(results)
    for model in settings.accounting_longest_context:
        runs.append({"longest_context": longest_context(model, show_progress=show_progress)})
    (out / "accounting.json").write_text(json.dumps(runs, indent=1, default=str))
    return runs


def section(runs: list[dict]) -> str:
    """The main report's section for :func:`run_suite`'s results."""
    parts = []
    for results in runs:
        if "longest_context" in results:
            parts.append(render_longest_context(results["longest_context"], STEP_TIME_NOTE))
        elif "error" in results:
            parts.append(f"{results['spec']['model']}: not accounted: {results['error']}")
        else:
            parts.append(render(results, "", level=3).replace("memory_vs_seq.png", results["plot"]))
    return "## Memory at real sizes, accounted (not measured on a device)\n\n" + "\n\n".join(parts)


def main(argv=None) -> int:
    """Run the suite from the command line and write report.md, results.json and memory_vs_seq.png."""
    from fastlora.bench.environment import describe_environment, format_environment

    p = argparse.ArgumentParser(prog="python -m fastlora.bench.memory_accounting")
    p.add_argument("--model", default="llama-3-8b", help="preset or config.json path")
    p.add_argument("--method", default="qlora")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--checkpointing", default="non-reentrant")
    p.add_argument("--seqs", default="1024,2048,4096,8192,16384,32768")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS_GIB)), help="GiB; empty: no longest-sequence search")
    p.add_argument("--longest-context", action="store_true",
                   help="instead: the longest-context table (QLoRA r=32, batch 1, PEFT and every fastlora option)")
    p.add_argument("--matrix", action="store_true",
                   help="instead: every model (comma list) x method (lora,qlora) x checkpointing at the first seq and batch")
    p.add_argument("--moe", action="store_true", help="instead: the MoE cases (MOE_CASES) for the models (comma list) at the first seq")
    p.add_argument("--optimizers", default="adamw-foreach", help="--moe: comma list of StepSpec optimizers")
    p.add_argument("--optimizer-states", default="steady", help="--moe: comma list of steady, first-step (StepSpec.optimizer_state)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    env = describe_environment()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = "python -m fastlora.bench.memory_accounting " + " ".join(argv or [])
    environment = f"{format_environment(env)}\n\nDate: {date}. Command: `{command}`"
    args.out.mkdir(parents=True, exist_ok=True)
    seqs, batches = [int(s) for s in args.seqs.split(",")], [int(b) for b in args.batches.split(",")]
    if args.longest_context:
        results = longest_context(args.model, rank=32)
        results.update(environment=env, date=date)
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "report.md").write_text(f"# Longest context (accounted)\n\n{environment}\n\n" + render_longest_context(results))
        return 0
    if args.moe:
        rows = run_moe(args.model.split(","), seqs[0], optimizers=tuple(args.optimizers.split(",")),
                       optimizer_states=tuple(args.optimizer_states.split(",")))  # fmt: skip
        (args.out / "results.json").write_text(json.dumps({"rows": rows, "environment": env, "date": date}, indent=1, default=str))
        (args.out / "report.md").write_text(render_moe(rows, seqs[0], environment))
        return 0
    if args.matrix:
        rows = run_matrix(args.model.split(","), ["lora", "qlora"], list(CHECKPOINTING), seqs[0], batches[0], args.rank)
        (args.out / "results.json").write_text(json.dumps({"rows": rows, "environment": env, "date": date}, indent=1, default=str))
        (args.out / "report.md").write_text(render_matrix(rows, seqs[0], batches[0], environment))
        return 0
    spec = StepSpec(args.model, method=args.method, rank=args.rank, checkpointing=args.checkpointing)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    results = run(spec, seqs, batches, budgets=budgets)
    results["environment"], results["date"] = env, date
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.out / "memory_vs_seq.png")
    (args.out / "report.md").write_text(render(results, environment))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
