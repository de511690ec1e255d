"""report.md and the summary table printed at the end of a run, rendered from :class:`Results` alone.

Usage::

    text = render_report(results, ["layers_nf4.png"])
    print(summary_table(results))
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Sequence

from fastlora.bench.results import LayerRecord, MemoryRecord, Results, TrainRecord

PEFT = "peft"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table; cells are converted with str()."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def format_bytes(count: float | None) -> str:
    if count is None:
        return "-"
    return f"{count / 2**30:.2f} GiB" if abs(count) >= 2**30 else f"{count / 2**20:.1f} MiB"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def geometric_mean(values: Sequence[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def contenders_in_order(records: Iterable) -> list[str]:
    """Contender names in first-seen order (PEFT first, as the suites emit them)."""
    return list(dict.fromkeys(r.contender for r in records))


# ---- layers -------------------------------------------------------------------------------------------------------


def _layer_cell(record: LayerRecord | None) -> str:
    if record is None:
        return "-"
    if record.status != "ok":
        return record.status
    if record.contender == PEFT:
        return format_seconds(record.median_s)
    return f"{format_seconds(record.median_s)} ({_ratio(record.speedup_vs_peft)})"


def _layer_groups(records: list[LayerRecord]) -> dict[tuple, list[LayerRecord]]:
    groups: dict[tuple, list[LayerRecord]] = defaultdict(list)
    for r in records:
        groups[(r.base, r.mode, r.rank, r.dtype)].append(r)
    return groups


def layer_tables(records: list[LayerRecord]) -> str:
    """One table per (base, mode, rank): rows = shape x M, columns = contenders (median time, speedup vs PEFT)."""
    sections = []
    for (base, mode, rank, dtype), group in _layer_groups(records).items():
        contenders = contenders_in_order(group)
        cells: dict[tuple, dict[str, LayerRecord]] = defaultdict(dict)
        for r in group:
            cells[(r.model, r.projections, r.in_features, r.out_features, r.tokens)][r.contender] = r
        rows = [
            [model, projections, f"{k}→{n}", m, *(_layer_cell(by_name.get(c)) for c in contenders)]
            for (model, projections, k, n, m), by_name in cells.items()
        ]
        title = f"### {base.upper() if base == 'nf4' else base} base · {mode} · r={rank} · {dtype}"
        sections.append(title + "\n\nMedian time per call (speedup vs PEFT).\n\n" + markdown_table(["model", "layers", "K→N", "M", *contenders], rows))
    return "\n\n".join(sections)


def layer_detail_table(records: list[LayerRecord]) -> str:
    """Every layer record with all its figures."""
    rows = [
        [
            r.model, r.projections, f"{r.in_features}→{r.out_features}", r.tokens, r.base, r.mode, r.rank, r.contender,
            r.status, format_seconds(r.median_s), _ratio(r.speedup_vs_peft),
            "-" if r.tflops is None else f"{r.tflops:.3g}", "-" if r.gbps is None else f"{r.gbps:.3g}",
            _percent(r.gemm_peak_fraction), _percent(r.copy_peak_fraction),
            "-" if r.check_error is None else f"{r.check_error:.1e}", r.path or "",
        ]
        for r in records
    ]
    headers = ["model", "layers", "K→N", "M", "base", "mode", "r", "contender", "status", "median", "vs PEFT",
               "TFLOP/s", "GB/s", "% GEMM peak", "% copy peak", "check err", "path (source)"]  # fmt: skip
    if any(r.host_s is not None for r in records):
        # GPU: the host time to issue a call, next to the GPU median (host-bound where they are close); CPU: a
        # fastlora call's time outside its ops.
        headers.insert(10, "host/call")
        for row, r in zip(rows, records):
            row.insert(10, format_seconds(r.host_s))
    return markdown_table(headers, rows)


def layer_summary_rows(records: list[LayerRecord]) -> list[list[object]]:
    """Per (dtype, base, mode, contender): geometric mean, min and max speedup vs PEFT over the cases measured."""
    speedups: dict[tuple, list[float]] = defaultdict(list)
    for r in records:
        if r.contender != PEFT and r.status == "ok" and r.speedup_vs_peft:
            speedups[(r.dtype, r.base, r.mode, r.contender)].append(r.speedup_vs_peft)
    return [
        [dtype, base, mode, contender, len(values), _ratio(geometric_mean(values)), _ratio(min(values)), _ratio(max(values))]
        for (dtype, base, mode, contender), values in speedups.items()
    ]


#: The floors every default case must hold: fastlora at least as fast as PEFT, and at most 3% behind the split practice.
PEFT_FLOOR, SPLIT_FLOOR = 1.0, 0.97


def floor_rows(records: list[LayerRecord]) -> list[list[object]]:
    """Per compute dtype and fastlora contender: the cases measured, how many fall below each floor (speed of
    fastlora / PEFT < 1, fastlora / split < 0.97) and the lowest of each ratio, with its case."""
    by_case: dict[tuple, dict[str, LayerRecord]] = defaultdict(dict)
    for r in records:
        if r.status == "ok" and r.median_s:
            by_case[(r.dtype, r.model, r.in_features, r.out_features, r.base, r.mode, r.rank, r.tokens)][r.contender] = r
    worst: dict[tuple, dict] = {}
    for case, by_name in by_case.items():
        for name, r in by_name.items():
            if not name.startswith("fastlora"):
                continue
            entry = worst.setdefault((case[0], name), {"cases": 0, "peft": [], "split": []})
            entry["cases"] += 1
            label = f"{case[4]} {case[5]} {case[2]}→{case[3]} M={case[7]}"
            for other in ("peft", "split"):
                if other in by_name:
                    entry[other].append((by_name[other].median_s / r.median_s, label))
    rows = []
    for (dtype, name), entry in worst.items():
        row = [dtype, name, entry["cases"]]
        for other, floor in (("peft", PEFT_FLOOR), ("split", SPLIT_FLOOR)):
            ratios = entry[other]
            lowest = min(ratios) if ratios else None
            row += [sum(ratio < floor for ratio, _ in ratios), "-" if lowest is None else f"{_ratio(lowest[0])} ({lowest[1]})"]
        rows.append(row)
    return rows


# ---- training and memory ------------------------------------------------------------------------------------------


def _train_key(r: TrainRecord) -> tuple:
    return (r.model, r.method, r.checkpointing)


def train_rows(records: list[TrainRecord]) -> list[list[object]]:
    peft_speed = {_train_key(r): r.tokens_per_s for r in records if r.contender == PEFT}
    rows = []
    for r in records:
        reference = peft_speed.get(_train_key(r))
        speedup = r.tokens_per_s / reference if r.tokens_per_s and reference else None
        growth = None if r.peak_memory_bytes is None else r.peak_memory_bytes - r.start_memory_bytes
        diff = "-" if r.loss_max_abs_diff_vs_peft is None else f"{r.loss_max_abs_diff_vs_peft:.2e}"
        rows.append([
            r.model, r.method, "on" if r.checkpointing else "off", r.contender, r.status,
            "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}", _ratio(speedup),
            format_bytes(r.peak_memory_bytes), format_bytes(growth), diff,
        ])  # fmt: skip
    return rows


TRAIN_HEADERS = ["model", "method", "grad ckpt", "contender", "status", "tokens/s (median step)", "vs PEFT", "peak memory",
                 "peak − start", "max |Δloss| vs PEFT"]  # fmt: skip


def loss_tables(records: list[TrainRecord]) -> str:
    """Per configuration, the per-step losses of every contender side by side."""
    groups: dict[tuple, list[TrainRecord]] = defaultdict(list)
    for r in records:
        groups[_train_key(r)].append(r)
    sections = []
    for (model, method, checkpointing), group in groups.items():
        steps = max((len(r.losses) for r in group), default=0)
        rows = [[step + 1, *(f"{r.losses[step]:.6f}" if step < len(r.losses) else "-" for r in group)] for step in range(steps)]
        title = f"#### {model} · {method} · gradient checkpointing {'on' if checkpointing else 'off'}"
        sections.append(title + "\n\n" + markdown_table(["step", *(r.contender for r in group)], rows))
    return "\n\n".join(sections)


def _memory_cell(record: MemoryRecord | None) -> str:
    if record is None:
        return "-"
    if record.status not in ("ok", "fallback"):
        return record.status.upper() if record.status == "oom" else record.status
    return f"{format_bytes(record.peak_memory_bytes)} (+{format_bytes(record.peak_memory_bytes - record.start_memory_bytes)})"


def memory_table(records: list[MemoryRecord]) -> str:
    lengths = sorted({r.seq_len for r in records})
    cells: dict[tuple, dict[int, MemoryRecord]] = defaultdict(dict)
    for r in records:
        cells[(r.model, r.method, r.checkpointing, r.contender)][r.seq_len] = r
    rows = [
        [model, method, "on" if ckpt else "off", contender, *(_memory_cell(by_len.get(n)) for n in lengths)]
        for (model, method, ckpt, contender), by_len in cells.items()
    ]
    return markdown_table(["model", "method", "grad ckpt", "contender", *(f"seq {n}" for n in lengths)], rows)


def memory_summary_rows(records: list[MemoryRecord]) -> list[list[object]]:
    """Per contender: the longest sequence that fit, and the peak memory there."""
    best: dict[tuple, MemoryRecord] = {}
    for r in records:
        key = (r.model, r.method, r.contender)
        if r.status == "ok" and (key not in best or r.seq_len > best[key].seq_len):
            best[key] = r
    return [[*key, r.seq_len, format_bytes(r.peak_memory_bytes)] for key, r in best.items()]


# ---- whole report -------------------------------------------------------------------------------------------------


def problems(results: Results) -> list[str]:
    """What the time budget left out, and every record that is not a clean measurement, as one line each."""
    lines = list(results.not_run)
    for r in results.layers:
        if r.status not in ("ok", "skipped"):
            lines.append(f"layers: {r.contender} on {r.model} {r.projections} {r.base} {r.mode} r={r.rank} M={r.tokens}: {r.status} ({r.detail})")
    skipped = {(r.contender, r.detail) for r in results.layers if r.status == "skipped"}
    lines += [f"layers: {name} skipped: {detail}" for name, detail in sorted(skipped)]
    for r in results.train:
        if r.status != "ok":
            lines.append(f"train: {r.contender} on {r.model} {r.method} ckpt={r.checkpointing}: {r.status} ({r.detail})")
    for r in results.memory:
        if r.status not in ("ok", "oom"):
            lines.append(f"memory: {r.contender} on {r.model} seq={r.seq_len}: {r.status} ({r.detail})")
    return lines


def summary_table(results: Results) -> str:
    """The headline figures of every suite that ran (printed at the end of ``fastlora bench``)."""
    parts = []
    if results.layers:
        parts.append("Layers: speedup vs PEFT (geometric mean over shapes and M; min; max)\n\n" + markdown_table(
            ["dtype", "base", "mode", "contender", "cases", "geo mean", "min", "max"], layer_summary_rows(results.layers)))
        parts.append(
            f"Layer floors per compute dtype: cases where fastlora is slower than PEFT (speed ratio < {PEFT_FLOOR:g}) or "
            f"more than 3% behind the split practice (< {SPLIT_FLOOR:g}), and the lowest ratio of each\n\n"
            + markdown_table(["dtype", "contender", "cases", "< PEFT", "lowest vs PEFT", "< split −3%", "lowest vs split"],
                             floor_rows(results.layers)))  # fmt: skip
    if results.train:
        parts.append("Training\n\n" + markdown_table(TRAIN_HEADERS, train_rows(results.train)))
    if results.memory:
        parts.append("Memory: longest sequence that fit (batch 1)\n\n" + markdown_table(
            ["model", "method", "contender", "longest seq", "peak memory"], memory_summary_rows(results.memory)))
    issues = problems(results)
    if issues:
        parts.append("Problems\n\n" + "\n".join(f"- {line}" for line in issues))
    return "\n\n".join(parts) or "no suite ran"


def _environment_table(results: Results) -> str:
    env = results.environment
    gpu = env.get("gpu")
    rows = [
        ["date (UTC)", env.get("date")],
        ["host", f"{env.get('host')} ({env.get('platform')})"],
        ["CPU", f"{env.get('cpu')}, {env.get('cpu_count')} cores, torch threads {results.settings.get('threads', env.get('torch_threads'))}"],
        ["C allocator", env.get("allocator", "not recorded")],
        ["GPU", f"{gpu['name']}, {gpu['memory_gib']} GiB, sm {gpu['capability']}, L2 {gpu['l2_mib']} MiB, CUDA {gpu['cuda']}" if gpu else "none"],
        *[[name, version or "not installed"] for name, version in env.get("versions", {}).items()],
        ["command", f"`{env.get('command')}`"],
        ["wall time", format_seconds(results.wall_time_s)],
    ]
    for device_type, state in env.get("backends", {}).items():
        available = ", ".join(n for n, reason in state["reasons"].items() if reason is None)
        rows.append([f"backends on {device_type}", f"{available} (auto → {state['auto']})"])
    tuned = env.get("tuning")
    if tuned:
        rows.append(["run-time path choice", f"{tuned['measured']} shape keys measured in {format_seconds(tuned['measurement_s'])} "
                     f"(of {tuned['decisions']} decisions; the rest from cache, shipped table or one candidate); cache {tuned['cache']}"])
    return markdown_table(["", ""], rows)


def _peaks_table(results: Results) -> str:
    p = results.peaks
    if not p:
        return "not measured (layer suite not run)"
    m, n, k = p["gemm_shape"]
    return markdown_table(
        ["GEMM", "TFLOP/s", "copy", "GB/s"],
        [[f"{m}×{n}×{k} {p['dtype']} torch.mm", f"{p['gemm_tflops']:.3g}", f"{format_bytes(p['copy_bytes'] / 2)} copy_ (read + write)", f"{p['copy_gbps']:.3g}"]],
    )


def render_report(results: Results, plot_files: Sequence[str] = ()) -> str:
    """The whole report.md."""
    device = results.settings.get("device", "?")
    gpu = results.environment.get("gpu")
    where = gpu["name"] if gpu and device.startswith("cuda") else results.environment.get("cpu")
    settings = "\n".join(f"{key}: {value}" for key, value in results.settings.items())
    out = [
        f"# fastlora benchmark: {device} ({where})",
        "PEFT (+ bitsandbytes) vs the split practice (dequantize into a reused buffer + GEMM + `addmm_` LoRA term) vs "
        "fastlora per backend. Every contender's outputs (and gradients) are checked against an fp32 reference before it "
        "is timed; a contender that fails the check is reported, not timed. Raw figures: `results.json`.",
        "## Machine and versions\n\n" + _environment_table(results),
        "## Settings\n\n```\n" + settings + "\n```",
        "## Measured device peaks\n\n" + _peaks_table(results),
        "## Summary\n\n" + summary_table(results),
    ]
    if results.layers:
        timing = (
            "triton.testing.do_bench median (CUDA events, L2 flushed, rotating inputs); \"host/call\" in the detail "
            "table is the host time to issue one call, GPU not waited for (a median close to it is host-bound)"
            if device.startswith("cuda")
            else "median of interleaved rounds in one process, each round starting one contender further on; "
            "\"host/call\" in the detail table is a fastlora call's time outside its ops (Python, autograd, argument "
            "handling), median of 10 calls; for a call on a whole-layer graph (the C++ node: \"layer: native\"), the "
            "call's time minus that of the node called directly on the same tensors"
        )
        out.append(
            "## Layers\n\n"
            f"Timing: {timing}. `fwd` runs under `torch.no_grad()`; `fwd+bwd` also returns dx, dA, dB. "
            "TFLOP/s count the useful FLOPs of the LoRA layer (the dense contender: of x·Wᵀ alone); GB/s count the "
            "bytes a perfect implementation must move (NF4: 0.516 B/param).\n\n" + layer_tables(results.layers)
            + "\n\n<details><summary>All layer figures</summary>\n\n" + layer_detail_table(results.layers) + "\n\n</details>"
        )
    if results.train:
        s = results.settings
        out.append(
            "## Training\n\n"
            f"LoRA r={s.get('train_rank')} (alpha 2r, no dropout) on all linear layers, AdamW lr {s.get('lr')}, batch {s.get('batch')} × "
            f"seq {s.get('seq_len')}, {s.get('warmup')} warm-up + {s.get('steps')} timed steps, synthetic tokens, same initial "
            "adapters for every contender, steps interleaved across contenders (each keeps its own adapters and optimizer). "
            "Peak memory, over a contender's first step: " + (results.train[0].memory_kind or "-") + "; peak − start is what that "
            "step added to the model already in memory, and peak is that plus the memory in use before any contender's first "
            "step (so no contender's peak includes another's optimizer state).\n\n" + markdown_table(TRAIN_HEADERS, train_rows(results.train))
            + "\n\n### Per-step losses\n\n" + loss_tables(results.train)
        )
    if results.memory:
        out.append(
            "## Memory vs sequence length\n\n"
            "Peak memory of one training step (forward, backward, AdamW) at batch 1, after one unmeasured step; "
            "in parentheses the growth over the memory in use before the step.\n\n" + memory_table(results.memory)
        )
    if getattr(results, "accounting", None):  # set by the memory suite (bench/memory_accounting.py)
        from fastlora.bench.memory_accounting import section

        out.append(section(results.accounting))
    if plot_files:
        out.append("## Plots\n\n" + "\n\n".join(f"![{name}]({name})" for name in plot_files))
    return "\n\n".join(out) + "\n"
