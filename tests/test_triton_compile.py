"""Every Triton kernel, with every config it ships, compiles for Hopper (sm_90; Ampere configs for sm_80).

No GPU needed: ``triton.compile`` with a ``GPUTarget`` runs the whole pipeline to a cubin on the CPU. The cases
(and the compile/resource helpers) are :mod:`fastlora.bench.kernel_report`'s, which also reads the SASS; each
case prints its resources (``pytest -s``); the test fails on register spills (local memory per thread, read
from the cubin with ``cuobjdump -res-usage``) or on shared memory beyond the target's per-block limit. Also: the
split reductions' SASS orders the partials' stores (barrier, then fence) before the counter's atomic, and every op
has a config that fits each generation's shared memory at rank tiles up to 256, with ``lora_up_grad``'s B.T strides
and with sizes no tile divides. Static analysis of compiled code, run with the installed Triton (for another
version, put it first on ``PYTHONPATH``).

    python -m pytest tests/test_triton_compile.py -s
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="static compilation needs Triton without the interpreter"
)

pytest.importorskip("triton")
from fastlora.bench import kernel_report  # noqa: E402
from fastlora.kernels import common, resources  # noqa: E402

CASES = kernel_report.all_cases((90, 80))


@pytest.mark.skipif(kernel_report.nvidia_tool("cuobjdump") is None, reason="cuobjdump (bundled with Triton) not found")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_compiles_without_spills(case):
    compiled = kernel_report.compile_case(case)
    res = kernel_report.resources(compiled.asm["cubin"])
    shared = compiled.metadata.shared
    print(f"{case.name}: shared {shared} B, registers {res['REG']}, spill (local) {res['LOCAL']} B, stack {res['STACK']} B")
    assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{case.name} spills registers: {res}"
    assert shared <= kernel_report.SHARED_LIMIT[case.capability], f"{case.name} needs {shared} B of shared memory"


# ---- split reductions: ordering in the compiled code --------------------------------------------------------------

SPLIT_CASES = {
    (c.kernel, c.capability): c
    for c in reversed(CASES)
    if "transposed" in c.kernel and c.dtype == "bf16" and max(c.consts.get("SPLIT_K", 1), c.consts.get("SPLIT_N", 1)) > 1
}


def _opcode(instruction) -> str:
    return instruction.opcode.split(".")[0]


@pytest.mark.skipif(kernel_report.nvidia_tool("nvdisasm") is None, reason="nvdisasm (bundled with Triton) not found")
@pytest.mark.parametrize("key", sorted(SPLIT_CASES), ids=[f"{k}-sm{cc}" for k, cc in sorted(SPLIT_CASES)])
def test_split_partials_are_fenced_before_the_counter_atomic(key):
    """In the SASS of each split-reduction kernel, between the last store of the partials and the atomic on the
    tile's counter there is a CTA barrier (every warp's stores done) and then a GPU-scope memory barrier (the stores
    visible GPU-wide) before the atomic: the last program to arrive then sums complete partials."""
    instructions, _ = kernel_report.sass(kernel_report.compile_case(SPLIT_CASES[key]).asm["cubin"])
    atomics = [i for i, ins in enumerate(instructions) if _opcode(ins) in ("ATOMG", "ATOM", "RED", "REDG")]
    assert len(atomics) == 1, [instructions[i].opcode for i in atomics]
    before = instructions[: atomics[0]]
    last_store = max(i for i, ins in enumerate(before) if _opcode(ins) in ("STG", "ST"))
    between = [_opcode(ins) for ins in before[last_store + 1 :]]
    assert "BAR" in between, between
    assert "MEMBAR" in between[between.index("BAR") :] or "FENCE" in between[between.index("BAR") :], between


# ---- shared memory: at least one config of every op fits every GPU generation at every rank ----------------------

#: Per-block shared memory of the generations the kernels serve (sm_86 and sm_89 share the smallest).
ARCHS = {cc: resources.SHARED_MEMORY_PER_BLOCK[(cc // 10, cc % 10)] for cc in (90, 80, 86)}
RANK_BLOCKS = (16, 32, 64, 128, 256)
#: Op -> (representative case label, kernel module, config picker's activation argument, int overrides).
#: lora_up_grad runs the thin kernels on B.T (stride over rank 1, over N the rank) and writes dB through dB.T.
SWEEP_OPS = {
    "forward-nf4": ("forward-nf4-bf16", "lora_linear", "x_ptr", {}),
    "forward-dense": ("forward-dense-bf16", "lora_linear", "x_ptr", {}),
    "grad_input-nf4": ("grad_input-nf4-bf16", "lora_linear_grad_input", "dy_ptr", {}),
    "grad_input-dense": ("grad_input-dense-bf16", "lora_linear_grad_input", "dy_ptr", {}),
    "forward-transposed-nf4": ("forward-transposed-nf4-bf16", "lora_linear_transposed", "x_ptr", {}),
    "forward-transposed-dense": ("forward-transposed-dense-bf16", "lora_linear_transposed", "x_ptr", {}),
    "grad_input-transposed-nf4": ("grad_input-transposed-nf4-bf16", "lora_linear_grad_input_transposed", "dy_ptr", {}),
    "grad_input-transposed-dense": (
        "grad_input-transposed-dense-bf16", "lora_linear_grad_input_transposed", "dy_ptr", {},
    ),
    "lora_down": ("lora_down-bf16", "lora_down", "x_ptr", {}),
    "lora_down_grad": ("lora_down_grad-bf16", "lora_down_grad", "x_ptr", {}),
    "lora_up_grad-dS": ("lora_down-bf16", "lora_down", "x_ptr", dict(stride_ar=1, stride_ak=48)),
    "lora_up_grad-dB": ("lora_down_grad-bf16", "lora_down_grad", "x_ptr", dict(stride_or=1, stride_ok=48)),
}  # fmt: skip
#: Sizes no tile divides: M, N, K odd (no divisibility-by-16 specialization; NF4's odd-K path).
ODD_INTS = dict(M=4093, N=4091, K=4089, R=45, stride_sm=45, stride_gm=45, rows_per_split=509)


def _sweep_cases(op: str, cc: int, r_block: int, odd: bool) -> list:
    """A case per config of the set the pruner picks for ``op`` at ``r_block`` on ``cc``, smallest tiles first."""
    label, module_name, activation, ints = SWEEP_OPS[op]
    module = importlib.import_module(f"fastlora.kernels.{module_name}")
    base = next(c for c in kernel_report.all_cases((90,)) if c.name.startswith(f"{label}-sm90-"))
    pick = getattr(module, "config_set", common.config_set_by_x_dtype)
    activations = torch.empty(0, dtype=torch.bfloat16, device="meta")
    configs = module.CONFIGS[pick(cc >= 90, {activation: activations, "BASE": base.consts.get("BASE"), "R_BLOCK": r_block})]
    consts, ints = {**base.consts, "R_BLOCK": r_block}, {**base.ints, **ints, **(ODD_INTS if odd else {})}
    if odd and "EVEN_K" in consts:
        consts.update(EVEN_K=False, K_ALIGNED=False)
    cases = [
        dataclasses.replace(
            base, config=kernel_report.config_id(cfg.kwargs, cfg.num_warps, cfg.num_stages), consts={**consts, **cfg.kwargs},
            ints=ints, num_warps=cfg.num_warps, num_stages=cfg.num_stages, capability=cc,
        )
        for cfg in configs
    ]  # fmt: skip
    return sorted(cases, key=lambda c: c.num_stages * math.prod(v for k, v in c.consts.items() if k.startswith("BLOCK_")))


def assert_a_config_fits(op: str, cc: int, r_block: int, odd: bool = False) -> None:
    """Compile the picked set's configs, smallest first, until one fits ``cc``'s shared memory."""
    for case in _sweep_cases(op, cc, r_block, odd):
        shared = kernel_report.compile_case(case).metadata.shared
        print(f"{op} sm{cc} R_BLOCK={r_block}{' odd' if odd else ''}: {case.config} needs {shared} of {ARCHS[cc]} B")
        if shared <= ARCHS[cc]:
            return
    pytest.fail(f"no {op} config fits sm_{cc} at R_BLOCK={r_block}")


#: The default run: the widest rank tile (shared memory grows with it) on Hopper with even and odd sizes, and on
#: the smallest GPU (sm_86/89). Every other (generation, rank tile) runs with FASTLORA_RANK_SWEEP=1 (~80 compiles).
CHEAP_SWEEP = [(90, 256, False), (90, 256, True), (86, 256, False)]
FULL_SWEEP = [(cc, r, False) for cc in ARCHS for r in RANK_BLOCKS if (cc, r, False) not in CHEAP_SWEEP]


@pytest.mark.parametrize("op", sorted(SWEEP_OPS))
@pytest.mark.parametrize("cc,r_block,odd", CHEAP_SWEEP)
def test_every_op_has_a_fitting_config(op, cc, r_block, odd):
    assert_a_config_fits(op, cc, r_block, odd)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTLORA_RANK_SWEEP") != "1", reason="set FASTLORA_RANK_SWEEP=1 (~80 compiles)")
@pytest.mark.parametrize("op", sorted(SWEEP_OPS))
@pytest.mark.parametrize("cc,r_block,odd", FULL_SWEEP)
def test_every_op_has_a_fitting_config_at_every_rank(op, cc, r_block, odd):
    assert_a_config_fits(op, cc, r_block, odd)


# ---- the other end of the supported Triton range ------------------------------------------------------------------

#: A directory holding another Triton (``pip install --no-deps --target DIR triton==3.6.0``): the checks above then
#: also run with it, in a subprocess (the split ordering and the shared-memory fit: ~40 compiles; every shipped
#: config's spill check too with FASTLORA_OTHER_TRITON_ALL=1, ~180 compiles).
OTHER_TRITON = os.environ.get("FASTLORA_OTHER_TRITON")


@pytest.mark.slow
@pytest.mark.skipif(not OTHER_TRITON, reason="set FASTLORA_OTHER_TRITON to a directory holding another Triton")
def test_compile_checks_pass_with_the_other_triton():
    import subprocess
    import sys

    selection = [] if os.environ.get("FASTLORA_OTHER_TRITON_ALL") == "1" else ["-k", "fenced or fitting_config"]
    env = {**os.environ, "PYTHONPATH": OTHER_TRITON, "FASTLORA_OTHER_TRITON": ""}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, *selection],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:]
    assert OTHER_TRITON in subprocess.run(
        [sys.executable, "-c", "import triton; print(triton.__file__)"], env=env, capture_output=True, text=True
    ).stdout
