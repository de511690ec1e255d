"""PNG plots of a run (matplotlib, Agg backend): layer speedups vs M, training throughput and memory, loss
curves, memory vs sequence length. Each plot has labelled axes with units and a legend.

Usage::

    paths = write_plots(results, Path("bench-out"))      # the PNG files written
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from fastlora.bench.report import PEFT, contenders_in_order
from fastlora.bench.results import Results

MODE_STYLES = {"fwd": "-", "fwd+bwd": "--"}
RANK_MARKERS = ["o", "s", "^", "D"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(names: list[str]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def plot_layer_speedups(results: Results, base: str, path: Path) -> bool:
    """Speedup vs PEFT over M, one panel per layer shape; colour = contender, line style = mode, marker = rank."""
    records = [r for r in results.layers if r.base == base and r.status == "ok" and r.contender != PEFT and r.speedup_vs_peft]
    if not records:
        return False
    plt = _pyplot()
    shapes = list(dict.fromkeys((r.model, r.projections, r.in_features, r.out_features) for r in records))
    contenders = contenders_in_order(records)
    colors = _colors(contenders)
    ranks = sorted({r.rank for r in records})
    columns = min(4, len(shapes))
    rows = math.ceil(len(shapes) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False, sharey=True)
    series: dict[tuple, list] = defaultdict(list)
    for r in records:
        series[((r.model, r.projections, r.in_features, r.out_features), r.contender, r.mode, r.rank)].append((r.tokens, r.speedup_vs_peft))
    for (shape, contender, mode, rank), points in series.items():
        ax = axes.flat[shapes.index(shape)]
        points.sort()
        ax.plot(*zip(*points), color=colors[contender], linestyle=MODE_STYLES.get(mode, ":"),
                marker=RANK_MARKERS[ranks.index(rank) % len(RANK_MARKERS)], markersize=4)  # fmt: skip
    for ax, (model, projections, k, n) in zip(axes.flat, shapes):
        ax.set_title(f"{model} {projections}\nK={k} → N={n}", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("M (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("speedup vs PEFT (×, log)")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    _legend(fig, plt, colors, ranks, sorted({r.mode for r in records}))
    dtype = records[0].dtype
    fig.suptitle(f"LoRA layer speedup vs PEFT, {base.upper() if base == 'nf4' else base} base, {dtype} (above 1 = faster than PEFT)")
    fig.tight_layout(rect=(0, 0, 0.85, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _legend(fig, plt, colors: dict[str, str], ranks: list[int], modes: list[str]) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, label=name) for name, c in colors.items()]
    handles += [Line2D([], [], color="gray", linestyle=MODE_STYLES.get(m, ":"), label=m) for m in modes]
    handles += [Line2D([], [], color="gray", linestyle="", marker=RANK_MARKERS[i % len(RANK_MARKERS)], label=f"r={r}") for i, r in enumerate(ranks)]
    fig.legend(handles=handles, loc="center right", fontsize=8)


def _train_label(r) -> str:
    return f"{r.model}\n{r.method}, ckpt {'on' if r.checkpointing else 'off'}"


def plot_training(results: Results, path: Path) -> bool:
    """Tokens/s and peak memory growth per configuration, one bar per contender."""
    records = [r for r in results.train if r.tokens_per_s is not None]
    if not records:
        return False
    plt = _pyplot()
    configs = list(dict.fromkeys(_train_label(r) for r in records))
    contenders = contenders_in_order(records)
    colors = _colors(contenders)
    width = 0.8 / len(contenders)
    fig, (speed_ax, memory_ax) = plt.subplots(1, 2, figsize=(max(9, 2.2 * len(configs) * 2), 4.5))
    for i, contender in enumerate(contenders):
        mine = {_train_label(r): r for r in records if r.contender == contender}
        xs = [j + (i - (len(contenders) - 1) / 2) * width for j, c in enumerate(configs) if c in mine]
        present = [c for c in configs if c in mine]
        speed_ax.bar(xs, [mine[c].tokens_per_s for c in present], width, color=colors[contender], label=contender)
        memory_ax.bar(xs, [(mine[c].peak_memory_bytes - mine[c].start_memory_bytes) / 2**20 for c in present], width, color=colors[contender], label=contender)
    for ax, ylabel, title in (
        (speed_ax, "throughput (tokens/s)", "Training throughput"),
        (memory_ax, f"peak − start memory (MiB, {records[0].memory_kind})", "Memory added by training"),
    ):
        ax.set_xticks(range(len(configs)), configs, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_losses(results: Results, path: Path) -> bool:
    """Per-step loss of every contender, one panel per (model, method); checkpointing does not change the
    math, so only the first checkpointing setting is drawn."""
    records = [r for r in results.train if r.losses]
    if not records:
        return False
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    first_ckpt = records[0].checkpointing
    panels = list(dict.fromkeys((r.model, r.method) for r in records))
    contenders = contenders_in_order(records)
    colors = _colors(contenders)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    for ax, (model, method) in zip(axes.flat, panels):
        for r in records:
            if (r.model, r.method, r.checkpointing) != (model, method, first_ckpt):
                continue
            steps = range(1, len(r.losses) + 1)
            peft = r.contender == PEFT
            ax.plot(steps, r.losses, color=colors[r.contender], linewidth=3 if peft else 1.2, alpha=0.5 if peft else 1.0,
                    linestyle="-" if peft else "--", marker="" if peft else ".", label=r.contender)  # fmt: skip
        ax.set_title(f"{model}, {method}")
        ax.set_xlabel("optimizer step (warm-up included)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("training loss (cross-entropy, nats)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Per-step loss: fastlora (dashed) on top of PEFT (thick)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(results: Results, path: Path) -> bool:
    """Peak memory growth of one training step vs sequence length; OOM marked with a cross at the top."""
    records = results.memory
    if not any(r.peak_memory_bytes is not None for r in records):
        return False
    plt = _pyplot()
    contenders = contenders_in_order(records)
    colors = _colors(contenders)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max((r.peak_memory_bytes - r.start_memory_bytes) / 2**30 for r in records if r.peak_memory_bytes is not None)
    for key in dict.fromkeys((r.model, r.method, r.contender) for r in records):
        mine = sorted((r for r in records if (r.model, r.method, r.contender) == key), key=lambda r: r.seq_len)
        ok = [(r.seq_len, (r.peak_memory_bytes - r.start_memory_bytes) / 2**30) for r in mine if r.peak_memory_bytes is not None]
        label = f"{key[0]} {key[1]}: {key[2]}"
        if ok:
            ax.plot(*zip(*ok), color=colors[key[2]], marker="o", label=label)
        oom = [r.seq_len for r in mine if r.status == "oom"]
        if oom:
            ax.plot(oom, [top * 1.05] * len(oom), color=colors[key[2]], marker="x", linestyle="", markersize=9, label=f"{label}: out of memory")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens, batch 1)")
    ax.set_ylabel(f"peak − start memory (GiB, {records[0].memory_kind})")
    ax.set_title("Memory of one training step vs sequence length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(results: Results, out_dir: Path) -> list[Path]:
    """Every plot the results have data for; returns the files written."""
    planned = [(f"layers_{base}.png", lambda p, b=base: plot_layer_speedups(results, b, p)) for base in ("dense", "nf4")]
    planned += [("train.png", lambda p: plot_training(results, p)), ("loss.png", lambda p: plot_losses(results, p)),
                ("memory.png", lambda p: plot_memory(results, p))]  # fmt: skip
    written = []
    for name, draw in planned:
        path = Path(out_dir) / name
        if draw(path):
            written.append(path)
    return written
