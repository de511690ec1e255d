"""The MoE layer suite: one transformers experts module (Qwen3-MoE's, SwiGLU, weights [E, 2I, H] and [E, H, I])
with LoRA r on both expert weights, forward + backward, PEFT's ``ParamWrapper`` against fastlora, in one process,
interleaved (:func:`fastlora.bench.timing.time_interleaved`), on fixed random routing.

Cases are (experts, top-k, tokens M); the default set spans experts 8–128, top-k 2–8, M 16–2048 and runs in about
five minutes on a 2-core CPU. Each case first checks that both compute the same output and input gradient
(1e-4 relative in fp32), then times them. Results go to ``<out>/moe.json`` and ``<out>/moe.md``.

Usage::

    python -m fastlora.bench.moe --out bench/results/moe-cpu      # or: fastlora bench --suite moe --out ...
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

from fastlora.bench.environment import describe_environment
from fastlora.bench.timing import TimingPolicy, time_interleaved

#: (experts, top-k, tokens) of the default run.
DEFAULT_CASES = (
    (8, 2, 16), (8, 2, 256), (8, 2, 2048),
    (32, 4, 16), (32, 4, 256), (32, 4, 2048),
    (64, 8, 64), (64, 8, 512),
    (128, 8, 16), (128, 8, 256), (128, 8, 2048), (128, 2, 1024),
)  # fmt: skip
HIDDEN, INTERMEDIATE, RANK = 256, 128, 16


class _Block(nn.Module):
    """Holds the experts module at ``experts`` so PEFT's ``target_parameters`` names resolve."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, hidden, index, weights):
        return self.experts(hidden, index, weights)


def experts_layer(experts: int, dtype: torch.dtype, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, rank: int = RANK):
    """A PEFT-wrapped Qwen3-MoE experts module (random weights, LoRA B non-zero) in ``dtype``."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=experts)
    config._experts_implementation = "grouped_mm"
    module = Qwen3MoeExperts(config)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, hidden**-0.5)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = get_peft_model(_Block(module).to(dtype), lora)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    return model


def _inputs(tokens: int, experts: int, top_k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=g).to(dtype).requires_grad_(True)
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=-1).to(dtype)
    grad = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    return hidden, index, weights, grad


def _step(model, hidden, index, weights, grad):
    def run():
        hidden.grad = None
        model.zero_grad(set_to_none=True)
        model(hidden, index, weights).backward(grad)

    return run


def run_case(experts: int, top_k: int, tokens: int, dtype: torch.dtype, policy: TimingPolicy, backend: str = "auto"):
    """One case: agreement check, then interleaved medians; a dict for moe.json."""
    import fastlora

    peft_model = experts_layer(experts, dtype)
    fused = copy.deepcopy(peft_model)
    report = fastlora.patch(fused, backend=backend)
    hidden, index, weights, grad = _inputs(tokens, experts, top_k, dtype, seed=experts * 10_000 + tokens + top_k)
    outputs = {}
    for label, model in (("peft", peft_model), ("fastlora", fused)):
        hidden.grad = None
        out = model(hidden, index, weights)
        out.backward(grad)
        outputs[label] = (out.detach().double(), hidden.grad.double())
    error = max(
        ((outputs["fastlora"][i] - outputs["peft"][i]).norm() / outputs["peft"][i].norm()).item() for i in range(2)
    )
    medians = time_interleaved(
        {"peft": _step(peft_model, hidden, index, weights, grad), "fastlora": _step(fused, hidden, index, weights, grad)},
        torch.device("cpu"),
        policy,
    )
    return {
        "experts": experts, "top_k": top_k, "tokens": tokens, "hidden": HIDDEN, "intermediate": INTERMEDIATE,
        "rank": RANK, "dtype": str(dtype).removeprefix("torch."), "backend": sorted(set(report.patched.values())),
        "fallback_calls": dict(report.fallback_calls), "relative_difference": error,
        "peft_ms": medians["peft"] * 1e3, "fastlora_ms": medians["fastlora"] * 1e3,
        "speedup": medians["peft"] / medians["fastlora"],
    }  # fmt: skip


def summary(records: list[dict]) -> str:
    """A markdown table of the records and the geometric-mean speedup."""
    lines = ["| experts | top-k | M | PEFT ms | fastlora ms | speedup | rel. diff |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['experts']} | {r['top_k']} | {r['tokens']} | {r['peft_ms']:.2f} | {r['fastlora_ms']:.2f} | "
                     f"{r['speedup']:.2f}× | {r['relative_difference']:.1e} |")  # fmt: skip
    speedups = [r["speedup"] for r in records]
    geomean = math.exp(sum(math.log(s) for s in speedups) / len(speedups)) if speedups else float("nan")
    lines.append(f"\nGeometric mean speedup: **{geomean:.2f}×**; slowest case {min(speedups, default=float('nan')):.2f}×.")
    return "\n".join(lines)


def run_suite(out: Path, cases=DEFAULT_CASES, dtype: torch.dtype = torch.float32, budget_s: float = 2.0,
              backend: str = "auto", show_progress: bool = True) -> list[dict]:  # fmt: skip
    """Run ``cases``, write ``out/moe.json`` and ``out/moe.md``; returns the records."""
    from tqdm import tqdm

    policy = TimingPolicy(budget_s=budget_s, min_rounds=3)
    records = []
    for experts, top_k, tokens in tqdm(cases, desc="moe layer", disable=not show_progress):
        records.append(run_case(experts, top_k, tokens, dtype, policy, backend))
    out.mkdir(parents=True, exist_ok=True)
    env = describe_environment()
    env["threads"] = torch.get_num_threads()
    (out / "moe.json").write_text(json.dumps({"environment": env, "records": records}, indent=1, default=str))
    header = (f"# MoE layer suite: PEFT ParamWrapper vs fastlora (forward + backward)\n\n"
              f"Qwen3-MoE experts, H={HIDDEN}, I={INTERMEDIATE}, LoRA r={RANK} on gate_up_proj and down_proj, "
              f"{str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads. Interleaved medians in one "
              f"process.\n\nEnvironment: `{json.dumps(env, default=str)}`\n\n")  # fmt: skip
    (out / "moe.md").write_text(header + summary(records) + "\n")
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per contender and case")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the idle cores)")
    args = parser.parse_args(argv)
    from fastlora.bench.runner import auto_threads

    torch.set_num_threads(args.threads or auto_threads())
    records = run_suite(args.out, dtype=getattr(torch, args.dtype), budget_s=args.budget, backend=args.backend)
    print(summary(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
