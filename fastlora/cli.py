"""The ``fastlora`` command: ``fastlora bench`` runs the benchmark suite, ``fastlora info`` says what this
machine offers.

Usage::

    fastlora info
    fastlora tune --model llama-3-8b --tokens 1-4096  # run-time path choices ahead of time, printed
    fastlora bench                                  # every suite, defaults for the device, into ./fastlora-bench
    fastlora bench --device cuda --suite layers --model llama-3-8b --tokens 1,4096 --out results/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Callable, Sequence

import torch

from fastlora.memory import planner as memory_planner


def _split(convert: Callable[[str], object] = str) -> Callable[[str], tuple]:
    """An argparse type for comma-separated lists."""

    def parse(text: str) -> tuple:
        return tuple(convert(item.strip()) for item in text.split(",") if item.strip())

    return parse


_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(text: str) -> torch.dtype:
    from fastlora.bench.settings import DTYPES

    name = _DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"dtype {text!r}: choose from {', '.join(DTYPES)} (or fp32, bf16, fp16)")
    return DTYPES[name]


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: use on or off")
    return text == "on"


def _threads(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _bench_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="benchmark PEFT vs fastlora: layers, training, memory",
        description="Benchmark LoRA/QLoRA layers, training and memory: PEFT vs the split practice vs fastlora per "
        "backend. Defaults depend on --device (a few minutes on a CPU; on a GPU the full suite's length is not "
        "measured yet, and --time-budget bounds it). Writes report.md, results.json and PNG plots into --out.",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--suite", default="all", type=_split(), help="layers, train, memory or all; or a comma list; or moe alone (the MoE layer suite)")
    p.add_argument("--model", type=_split(), help="model preset(s) for every suite (default per device; see fastlora info)")
    p.add_argument("--out", default="fastlora-bench", help="output directory (default ./fastlora-bench)")
    p.add_argument("--dtype", type=_dtype, help="compute dtype: float32 (CPU default), bfloat16 (GPU default), float16")
    p.add_argument("--backends", type=_split(), help="fastlora backends to measure (default: all available, torch reference only on CPU)")
    p.add_argument("--triton-paths", type=_split(), help="Triton paths to measure: auto, fused, split (default auto)")
    p.add_argument("--no-split", action="store_true", help="leave out the split-practice contender")
    p.add_argument("--no-dense", action="store_true", help="leave out the dense F.linear reference")
    layer = p.add_argument_group("layer suite")
    layer.add_argument("--layer-dtypes", type=_split(_dtype),
                       help="compute dtypes of the layer suite, e.g. float32,bfloat16 (CPU default; else --dtype)")  # fmt: skip
    layer.add_argument("--tokens", type=_split(int), help="M values, e.g. 1,16,128")
    layer.add_argument("--ranks", type=_split(int), help="LoRA ranks, e.g. 16,64")
    layer.add_argument("--bases", type=_split(), help="dense, nf4")
    layer.add_argument("--modes", type=_split(), help="fwd, fwd+bwd")
    layer.add_argument("--projections", type=_split(), help="only the shapes of these layers, e.g. q_proj,down_proj")
    train = p.add_argument_group("training and memory suites")
    train.add_argument("--methods", type=_split(), help="lora, qlora")
    train.add_argument("--checkpointing", type=_split(_on_off), help="gradient checkpointing settings: off,on")
    train.add_argument("--seq-len", type=int, help="training sequence length")
    train.add_argument("--batch", type=int, help="training batch size")
    train.add_argument("--steps", type=int, help="timed optimizer steps")
    train.add_argument("--warmup", type=int, help="untimed optimizer steps first")
    train.add_argument("--lr", type=float, help="AdamW learning rate")
    train.add_argument("--memory-seq-lens", type=_split(int), help="sequence lengths of the memory sweep")
    train.add_argument("--longest-context", type=_split(), help="memory suite: the longest-context table (accounted, QLoRA r=32, "
                       "batch 1, 24/48/80/141 GiB, PEFT and every fastlora option) for these presets, e.g. llama-3-8b (minutes)")
    train.add_argument("--fused-loss", type=_on_off, default=True,
                       help="also each fastlora backend with the fused cross-entropy: on (default) or off")  # fmt: skip
    train.add_argument("--long-context", type=_on_off, default=False,
                       help="also fused loss + offloaded checkpoints / tiled MLP / both (needs --checkpointing on to offload)")  # fmt: skip
    p.add_argument("--threads", type=_threads, default="auto", help="torch CPU threads, or auto: cores not busy now (default)")
    p.add_argument("--seed", type=int, help="random seed for weights and data")
    p.add_argument("--time-budget", type=float, help="seconds after which no new case or run starts; the rest is reported as not run")
    p.add_argument("--case-seconds", type=float, help="CPU timing per contender and case (default 0.3): longer runs "
                   "steady the ratios of short cases on a small machine")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")


#: CLI option -> BenchSettings field(s) it sets.
_OVERRIDES = {
    "dtype": ("dtype",),
    "layer_dtypes": ("layer_dtypes",),
    "backends": ("backends", "train_backends"),
    "triton_paths": ("triton_paths",),
    "tokens": ("tokens",),
    "ranks": ("ranks",),
    "bases": ("bases",),
    "modes": ("modes",),
    "projections": ("projections",),
    "methods": ("methods",),
    "checkpointing": ("checkpointing",),
    "seq_len": ("seq_len",),
    "batch": ("batch",),
    "steps": ("steps",),
    "warmup": ("warmup",),
    "lr": ("lr",),
    "memory_seq_lens": ("memory_seq_lens",),
    "longest_context": ("accounting_longest_context",),
    "model": ("layer_models", "train_models", "memory_models"),
    "seed": ("seed",),
    "time_budget": ("time_budget_s",),
}


def settings_from_args(args: argparse.Namespace):
    """BenchSettings: the device's defaults, overridden by whatever the command line gives."""
    from fastlora.bench.models import preset
    from fastlora.bench.runner import auto_threads
    from fastlora.bench.settings import SUITES, default_settings

    settings = default_settings(args.device)
    changes = {field: value for option, fields in _OVERRIDES.items() if (value := getattr(args, option)) is not None for field in fields}
    suites = SUITES if "all" in args.suite else args.suite
    unknown = set(suites) - set(SUITES)
    if unknown:
        raise SystemExit(f"fastlora bench: unknown suite(s) {sorted(unknown)}; choose from {', '.join(SUITES)} or all")
    for model in args.model or ():
        preset(model)  # raises with the list of known presets
    if args.dtype is not None and args.layer_dtypes is None:
        changes["layer_dtypes"] = ()  # one compute dtype asked for: the layer suite runs it alone
    changes["suites"] = tuple(suites)
    changes["include_split"] = not args.no_split
    changes["include_dense"] = not args.no_dense
    changes["train_fused_loss"] = args.fused_loss
    changes["train_long_context"] = args.long_context
    if torch.device(args.device).type == "cpu":
        changes["threads"] = auto_threads() if args.threads == "auto" else args.threads
    if args.case_seconds is not None:
        changes["timing"] = dataclasses.replace(settings.timing, budget_s=args.case_seconds)
    return dataclasses.replace(settings, **changes)


def cmd_bench(args: argparse.Namespace) -> int:
    from fastlora.bench.report import problems, summary_table
    from fastlora.bench.runner import run_benchmarks

    if list(args.suite) == ["moe"]:  # the MoE layer suite has its own runner and outputs (moe.json, moe.md)
        from pathlib import Path

        from fastlora.bench.moe import run_suite, summary
        from fastlora.bench.runner import auto_threads

        torch.set_num_threads(auto_threads())
        print(summary(run_suite(Path(args.out), show_progress=not args.quiet)))
        return 0

    settings = settings_from_args(args)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results = run_benchmarks(settings, args.out, show_progress=not args.quiet)
    print()
    print(summary_table(results))
    print(f"\nwrote {args.out}/report.md, results.json and plots in {results.wall_time_s:.0f} s")
    # A contender computing different numbers is a failure of the run, not a footnote.
    failed = [line for line in problems(results) if ": mismatch" in line or ": error" in line]
    return 1 if failed else 0


def cmd_info(args: argparse.Namespace) -> int:
    if getattr(args, "kernels", False):
        from fastlora.bench import kernel_report

        return kernel_report.main([])
    from fastlora.bench.environment import backend_status, cpp_build_state, describe_environment, format_environment
    from fastlora.bench.models import MODEL_PRESETS

    cpp_state = cpp_build_state()  # before backend_status, which builds the extension if needed
    print(format_environment(describe_environment(), backend_status(), cpp_state))
    _print_path_choices()
    print("model presets: " + ", ".join(f"{name} ({p.note})" for name, p in MODEL_PRESETS.items()))
    return 0


def _print_path_choices() -> None:
    """The run-time path choices stored for this machine's devices (cache and shipped table), and where they live."""
    from fastlora import tuning

    shipped = json.loads(tuning.shipped_table_path().read_text()).get("devices", {})
    print(f"path choices: cache {tuning.cache_path() or 'off'}; shipped table has {', '.join(shipped) or 'no device'}")
    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        name = tuning.device_name(device)
        stored = tuning.stored_decisions(name)
        print(f"  {name}: {len(stored)} stored choices" + (" (none yet: measured on first use)" if not stored else ""))
        for decision in stored:
            print(f"    {decision}")


def _token_range(text: str) -> tuple[int, ...]:
    """"1-4096": one M per M bucket the range touches (each bucket's largest M); "1,16,512": those M."""
    from fastlora.tuning import MAX_M_BUCKET, m_bucket

    if "-" not in text:
        return _split(int)(text)
    low, high = (m_bucket(int(v)) for v in text.split("-", 1))
    buckets, bucket = [], 1
    while bucket <= min(high, MAX_M_BUCKET):
        if bucket >= low:
            buckets.append(bucket)
        bucket *= 4
    return tuple(buckets)


def _tune_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "tune",
        help="measure the run-time path choices ahead of time and print them",
        description="Time every implementation of each fused op (forward, grad_input, the thin LoRA products) for the "
        "layer shapes of a model and each M bucket of a token range, on this machine, and store the fastest in the "
        "path-choice cache (FASTLORA_TUNING_CACHE), as the first training calls would. Prints every choice.",
    )
    p.add_argument("--model", default="tiny", help="a model preset (see fastlora info) or a path to a Hugging Face config")
    p.add_argument("--tokens", default="1-4096", type=_token_range, help="token counts: a range 1-4096 (every M bucket) or a list 1,16,512")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--backend", default="auto", help="fastlora backend (default: auto for the device)")
    p.add_argument("--bases", default=("nf4", "dense"), type=_split(), help="nf4, dense")
    p.add_argument("--rank", default=16, type=int, help="LoRA rank")
    p.add_argument("--dtype", type=_dtype, help="compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--dropout", default=(0.0,), type=lambda text: tuple(float(v) for v in text.split(",")),
                   help="LoRA dropout probabilities the training uses, e.g. 0.05 (dropout > 0 has keys of its own)")
    p.add_argument("--threads", type=int, help="torch CPU threads (choices are keyed by the thread count)")


def _model_shapes(model: str) -> list[tuple[int, int]]:
    """Distinct (N, K) of a preset's or a Hugging Face config's decoder linear layers."""
    from pathlib import Path

    from fastlora.bench.models import MODEL_PRESETS, ModelPreset, layer_shapes

    if model not in MODEL_PRESETS and Path(model).exists():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        fields = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")
        MODEL_PRESETS[model] = ModelPreset(*(getattr(config, f) for f in fields), getattr(config, "attention_bias", False))
    return list(dict.fromkeys((s.out_features, s.in_features) for s in layer_shapes(model)))


def cmd_tune(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from fastlora import backends, tuning

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backend = backends.resolve(args.backend, device)
    dtype = args.dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)
    shapes = _model_shapes(args.model)
    with tqdm(total=len(shapes) * len(args.tokens) * len(args.bases), desc="tune", unit="shape") as bar:
        for base in args.bases:
            tuning.tune(backend, device, shapes, list(args.tokens), base=base, rank=args.rank, dtype=dtype, progress=bar,
                        dropout=args.dropout)
    decisions = tuning.decisions()
    print(f"{backend} on {tuning.device_name(device)}: {len(decisions)} choices, {tuning.measurement_seconds():.2f} s of timing; "
          f"cache {tuning.cache_path() or 'off'}")
    for decision in decisions:
        print(f"  {decision}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora", description="Fused-kernel backend for PEFT LoRA/QLoRA.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _bench_parser(subparsers)
    memory_planner.add_parser(subparsers)
    _tune_parser(subparsers)
    info = subparsers.add_parser("info", help="devices, backends available (and why not), C++ build state, versions")
    info.add_argument(
        "--kernels", action="store_true",
        help="instead: compile every shipped Triton kernel config for Hopper (sm_90, no GPU needed) and report its "
        "SASS (static figures, not timings) into bench/results/static-sm90-<date>/report.md",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastlora`` command."""
    args = build_parser().parse_args(argv)
    return {"bench": cmd_bench, "info": cmd_info, "plan": memory_planner.cmd_plan, "tune": cmd_tune}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
