"""Static report on the Hopper (sm_90) code of every shipped Triton kernel config: no GPU needed, no timings.

Each config is compiled with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))``; the cubin is read with
the ``cuobjdump`` (registers, spills) and ``nvdisasm`` (SASS) that ship with Triton's NVIDIA backend. The main
loop is the innermost SASS loop (a backward branch) holding the most matrix instructions; its instruction mix
gives the issue slots (warp-instructions) a program spends per dequantized NF4 element, and from those an upper
bound on NF4 decode throughput at M <= 16 compared with HBM bandwidth. Every figure is static: read from
compiled code under stated assumptions, never timed.

Usage::

    python -m fastlora.bench.kernel_report                 # all Hopper configs -> bench/results/static-sm90-<date>/
    python -m fastlora.bench.kernel_report --only forward  # cases whose name contains "forward"
    fastlora info --kernels
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch

from fastlora.bench.kernel_sass import (  # noqa: F401 - re-exported for the tests and callers
    CLASSES,
    MATRIX_FAMILIES,
    Instruction,
    classify,
    is_dot,
    load_width,
    main_loop,
    nvidia_tool,
    resources,
    sass,
)

# ---- what to compile ------------------------------------------------------------------------------------------

#: Int arguments take this value unless a case says otherwise: a 4096-token batch through a 4096x4096 layer.
REALISTIC_INT = 4096
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
#: SASS operand type of a base GEMM's dot per activation dtype (IEEE fp32 has no matrix instruction).
DOT_TYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: None}
#: Largest dynamic shared memory one block may use (bytes): H100/H200 and A100.
SHARED_LIMIT = {90: 232448, 80: 166912}
#: Fused base-GEMM kernels: (report group, module, kernel attribute, the config keys tiling the output [M, *]
#: dimension, the config key giving the rows of the main dot's output tile). The transposed variants are
#: candidates for the run-time chooser at small M (their dot's rows are W's, not the tokens).
LINEAR_KERNELS = (
    ("forward", "lora_linear", "lora_linear_kernel", ("BLOCK_M", "BLOCK_N"), "BLOCK_M"),
    ("grad_input", "lora_linear_grad_input", "lora_linear_grad_input_kernel", ("BLOCK_M", "BLOCK_K"), "BLOCK_M"),
    ("forward-transposed", "lora_linear_transposed", "lora_linear_transposed_kernel", ("BLOCK_M", "BLOCK_N"), "BLOCK_N"),
    ("grad_input-transposed", "lora_linear_grad_input_transposed", "lora_linear_grad_input_transposed_kernel",
     ("BLOCK_M", "BLOCK_K"), "BLOCK_K"),
)  # fmt: skip


#: Int arguments of the linear kernels: rank 16, two adapter groups (a loop, as with dropout on two adapters), a
#: row-major W (its column stride is 1, which Triton specializes as a constant).
LINEAR_INTS = dict(R=16, N_GROUPS=2, stride_wk=1)


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel compiled with one config for one GPU generation."""

    label: str  # kernel, base and dtype: "forward-nf4-bf16"
    config: str  # block sizes, warps, stages: "64x64x64x8-w4-s4"
    kernel: str  # report group: "forward", "grad_input", "lora_down", ...
    fn: object  # the @triton.jit function
    pointers: dict  # pointer argument -> element type ("bf16", "u8", ...)
    consts: dict  # constexpr values (config's block sizes included)
    ints: dict  # int arguments that differ from REALISTIC_INT
    num_warps: int
    num_stages: int
    capability: int
    dtype: str  # the activations' element type
    nf4: bool  # dequantizes NF4 in its main loop
    #: SASS operand type of the main loop's dot ("BF16", "F16", "TF32"; None: no dot or IEEE fp32 on FMAs): tells
    #: the main loop from a later loop with another dot (the LoRA terms run in TF32).
    dot_type: str | None = None
    #: NF4 elements one main-loop iteration unpacks (0 when ``nf4`` is false).
    elements_per_iteration: int = 0
    #: Programs of a 4096x4096 layer at M=16 (0 when not applicable).
    decode_programs: int = 0
    #: Rows of the main dot's output tile (wgmma needs 64 per warpgroup); 0 without a dot.
    dot_rows: int = 0
    #: Multiply-adds of the main dot per loop iteration (0: not counted).
    macs_per_iteration: int = 0
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.label}-sm{self.capability}-{self.config}"


def _modules():
    names = {module for _, module, *_ in LINEAR_KERNELS} | {"lora_down", "lora_down_grad", "nf4_absmax", "nf4_dequantize"}
    return {name: importlib.import_module(f"fastlora.kernels.{name}") for name in names}


def config_id(kwargs: dict, num_warps: int, num_stages: int) -> str:
    """``"64x64x64x8-w4-s4"``: the config's block sizes in order, warps, stages."""
    return "x".join(str(v) for v in kwargs.values()) + f"-w{num_warps}-s{num_stages}"


def _linear_consts(base: int, dtype: torch.dtype) -> dict:
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return dict(
        BASE=base, R_BLOCK=16, BLOCKSIZE=64, EVEN_K=True, K_ALIGNED=True, PRECISION=precision, LORA_PRECISION=precision
    )


def _linear_pointers(kernel: str, base_nf4: bool, dtype: torch.dtype) -> dict:
    t = TRITON_TYPES[dtype]
    w = "u8" if base_nf4 else t
    if kernel.startswith("forward"):
        return dict(
            x_ptr=t, w_ptr=w, absmax_ptr="fp32", table_ptr="fp32", bias_ptr=t, s_ptr="fp32", b_ptr="fp32", y_ptr=t,
            partial_ptr="fp32", count_ptr="i32",
        )  # fmt: skip
    return dict(
        dy_ptr=t, w_ptr=w, absmax_ptr="fp32", table_ptr="fp32", ds_ptr="fp32", a_ptr="fp32",
        groups_ptr="i64", keep_scales_ptr="fp32", seeds_ptr="i64", dx_ptr=t, partial_ptr="fp32", count_ptr="i32",
    )  # fmt: skip


def _decode_programs(tile: tuple[str, str], kwargs: dict) -> int:
    rows, cols = (kwargs[key] for key in tile)
    return -(-16 // rows) * -(-4096 // cols) * kwargs.get("SPLIT_K", kwargs.get("SPLIT_N", 1))


def linear_cases(capabilities: tuple[int, ...] = (90,)) -> Iterator[Case]:
    """The fused forward and grad_input kernels and their transposed variants: every config set, bf16 (fp32 sets
    in fp32), plus the split path's epilogue and one fp16 config."""
    mods = _modules()
    nf4, dense, out = (getattr(mods["lora_linear"], k) for k in ("BASE_NF4", "BASE_DENSE", "BASE_IN_OUTPUT"))
    for kernel, module_name, attr, tile, dot_rows in LINEAR_KERNELS:
        module = mods[module_name]
        fn = getattr(module, attr).fn
        variants = []  # (config, capability, base, dtype)
        for set_name, configs in module.CONFIGS.items():
            if set_name == "fp32":
                variants += [(c, cc, b, torch.float32) for c in configs for cc in capabilities for b in (nf4, dense)]
                continue
            cc, base = (90 if set_name.startswith("hopper") else 80), (nf4 if set_name.endswith("nf4") else dense)
            variants += [(c, cc, base, torch.bfloat16) for c in configs if cc in capabilities]
        if 90 in capabilities:
            if "transposed" not in kernel:  # the split path's epilogue: the shipped kernels with BASE=0
                variants += [(module.CONFIGS["hopper-dense"][0], 90, out, torch.bfloat16)]
            variants += [(module.CONFIGS["hopper-nf4"][0], 90, nf4, torch.float16)]
        extra = dict(HAS_BIAS=True, HAS_LORA=True) if kernel.startswith("forward") else {}
        for cfg, cc, base, dtype in variants:
            kw = cfg.kwargs
            is_nf4 = base == nf4
            yield Case(
                label=f"{kernel}-{['split_epilogue', 'dense', 'nf4'][base]}-{TRITON_TYPES[dtype]}",
                config=config_id(kw, cfg.num_warps, cfg.num_stages), kernel=kernel, fn=fn,
                pointers=_linear_pointers(kernel, is_nf4, dtype),
                consts={**_linear_consts(base, dtype), **extra, **kw}, ints=LINEAR_INTS,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, capability=cc, dtype=TRITON_TYPES[dtype],
                nf4=is_nf4, elements_per_iteration=kw["BLOCK_N"] * kw["BLOCK_K"] if is_nf4 else 0,
                decode_programs=_decode_programs(tile, kw), dot_type=DOT_TYPES[dtype], dot_rows=kw[dot_rows],
                macs_per_iteration=kw["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_K"],
            )  # fmt: skip


def thin_cases(capabilities: tuple[int, ...] = (90,)) -> Iterator[Case]:
    """The LoRA thin GEMMs (lora_down, lora_down_grad) and the NF4 helpers (dequantize, absmax)."""
    mods = _modules()
    thin = (
        ("lora_down", dict(a_ptr="fp32", s_ptr="fp32", keep_scales_ptr="fp32", col_scales_ptr="fp32"),
         dict(stride_ak=1, stride_sm=16)),
        ("lora_down_grad", dict(g_ptr="fp32", out_ptr="fp32", keep_scales_ptr="fp32"),
         dict(stride_gm=16, stride_gr=1, stride_ok=1, rows_per_split=512)),
    )  # fmt: skip
    for name, pointers, ints in thin:
        module = mods[name]
        fn = getattr(module, f"{name}_kernel").fn
        pointers = {**pointers, "groups_ptr": "i64", "seeds_ptr": "i64"}
        for set_name, configs in module.CONFIGS.items():
            generation, _, wide = set_name.partition("-")  # "-wide": the sets for rank tiles of 256
            dtype, cc = {"hopper": ("bf16", 90), "ampere": ("bf16", 80), "fp32": ("fp32", 90)}[generation]
            if cc not in capabilities:
                continue
            r_block = mods["lora_down"].common.WIDE_RANK_BLOCK if wide else 16
            consts = dict(R_BLOCK=r_block, PRECISION="ieee" if dtype == "fp32" else "tf32")
            for c in configs:
                yield Case(
                    f"{name}-{dtype}{'-r' + str(r_block) if wide else ''}", config_id(c.kwargs, c.num_warps, c.num_stages), name, fn,
                    {**pointers, "x_ptr": dtype}, {**consts, **c.kwargs}, ints, c.num_warps, c.num_stages, cc, dtype, False,
                    dot_type="TF32" if dtype == "bf16" else None,
                    dot_rows=consts["R_BLOCK"] if name == "lora_down_grad" else c.kwargs["BLOCK_M"],
                )  # fmt: skip
    dequant = mods["nf4_dequantize"]
    for set_name, configs in dequant.CONFIGS.items():
        cc = 90 if set_name == "hopper" else 80
        if cc not in capabilities:
            continue
        for c in configs:
            yield Case(
                "nf4_dequantize-bf16", config_id(c.kwargs, c.num_warps, c.num_stages), "nf4_dequantize",
                dequant.nf4_dequantize_kernel.fn, dict(packed_ptr="u8", absmax_ptr="fp32", table_ptr="fp32", out_ptr="bf16"),
                {"BLOCKSIZE": 64, **c.kwargs}, {}, c.num_warps, c.num_stages, cc, "bf16", True,
                elements_per_iteration=c.kwargs["BLOCK"],
            )  # fmt: skip
    if 90 in capabilities:
        absmax = mods["nf4_absmax"]
        yield Case(
            "nf4_absmax-fp32", f"{absmax.BLOCK}-w4", "nf4_absmax", absmax.nf4_absmax_kernel,
            dict(q_ptr="u8", code2_ptr="fp32", absmax2_ptr="fp32", out_ptr="fp32"),
            dict(BLOCKSIZE2=256, BLOCK=absmax.BLOCK), {}, 4, 3, 90, "fp32", False,
            options=dict(enable_fp_fusion=False),  # as launched
        )  # fmt: skip


def all_cases(capabilities: tuple[int, ...] = (90,)) -> list[Case]:
    """Every shipped config of every kernel (and candidate variant) for ``capabilities``.

    Usage: ``[c.name for c in all_cases((90,))]``
    """
    return [*linear_cases(capabilities), *thin_cases(capabilities)]


# ---- compiling ---------------------------------------------------------------------------------------------


def _signature(case: Case):
    """Signature, constexprs and attributes as Triton's launcher specializes a call with the case's int values:
    1 becomes a constant, multiples of 16 are marked divisible by 16 (pointers from torch always are)."""
    signature, attrs, consts = {}, {}, dict(case.consts)
    for index, param in enumerate(case.fn.params):
        arg = param.name
        value = case.ints.get(arg, REALISTIC_INT)
        if param.is_constexpr and arg not in consts and arg.startswith("HAS_"):
            consts[arg] = False  # an optional input the case does not pass
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in case.pointers or arg.endswith("_ptr"):
            signature[arg] = "*" + case.pointers.get(arg, "fp32")  # a pointer the case does not name: unused
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg == "offset":
            signature[arg] = "fp32"
        elif value == 1:
            signature[arg], consts[arg] = "constexpr", 1
        else:
            signature[arg] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def compile_case(case: Case):
    """The ``triton.compile`` result of ``case`` for its target (``.asm["cubin"]``, ``.metadata.shared``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs = _signature(case)
    options = dict(num_warps=case.num_warps, num_stages=case.num_stages, **case.options)
    source = triton.compiler.ASTSource(case.fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", case.capability, 32), options=options)


@dataclasses.dataclass
class Analysis:
    """What the report says about one case."""

    case: Case
    registers: int
    spill_bytes: int  # local memory per thread
    stack_bytes: int
    shared_bytes: int
    matrix: str  # "wgmma", "mma.sync" or "none (FMA)" in the main loop
    matrix_shapes: list[str]
    loop_instructions: int  # one iteration, per warp
    mix: Counter  # class -> count
    global_loads: Counter  # "LDG.32" / "LDGSTS.128" -> count

    @property
    def issue_slots_per_element(self) -> float | None:
        """Warp-instructions the program issues per NF4 element it unpacks (one main-loop iteration)."""
        per_iteration = self.case.elements_per_iteration
        if not per_iteration:
            return None
        return self.loop_instructions * self.case.num_warps / per_iteration


def analyze(case: Case) -> Analysis:
    """Compile ``case`` and read its resources and main loop.

    Usage: ``analyze(all_cases()[0]).issue_slots_per_element``
    """
    compiled = compile_case(case)
    cubin = compiled.asm["cubin"]
    res = resources(cubin)
    instructions, labels = sass(cubin)
    body = main_loop(instructions, labels, case.dot_type) or instructions
    opcodes = [i.opcode for i in body]
    dots = [op for op in opcodes if is_dot(op, case.dot_type)]
    families = {MATRIX_FAMILIES[op.split(".")[0]] for op in dots}
    matrix = "wgmma" if "wgmma" in families else ("mma.sync" if families else "none (FMA)")
    shapes = sorted({".".join(op.split(".")[1:]) for op in dots})
    loads = Counter(f"{op.split('.')[0]}.{load_width(op)}" for op in opcodes if op.split(".")[0] in {"LDG", "LDGSTS"})
    return Analysis(
        case, res["REG"], res["LOCAL"], res["STACK"], compiled.metadata.shared, matrix, shapes,
        len(body), Counter(classify(op) for op in opcodes), loads,
    )  # fmt: skip


def expected_matrix(case: Case) -> str:
    """The matrix instruction family a case's main loop should use (what Triton can emit for its tile), or None
    for kernels without a GEMM loop of their own (the split path's epilogue, the NF4 helpers).

    Triton emits wgmma on sm_90 when the dot's output tile has >= 64 rows per warpgroup (4 warps) and
    16-bit or TF32 operands; smaller tiles get mma.sync; IEEE fp32 runs on FMAs.

    Usage: ``expected_matrix(case) == analyze(case).matrix``
    """
    if case.kernel in ("nf4_dequantize", "nf4_absmax") or case.consts.get("BASE") == 0:
        return None
    if case.consts.get("PRECISION") == "ieee":
        return "none (FMA)"
    if case.capability >= 90 and case.num_warps % 4 == 0 and case.dot_rows >= 64:
        return "wgmma"
    return "mma.sync"


# ---- derived figures and the report ----------------------------------------------------------------------------

#: Assumptions of the decode estimate (stated in the report).
SMS = 132
#: GH100's clock behind NVIDIA's peak tensor figures (989 bf16 TFLOPS = 132 SMs x 4096 FLOP/clk x 1.83 GHz); a
#: clock throttled under load only lowers the bound.
CLOCK_HZ = 1.83e9
#: Warp-instructions an SM issues per clock: 4 schedulers, one each (Hopper has no dual issue).
ISSUE_PER_SM_CLOCK = 4
HBM = {"H100 SXM": 3.35e12, "H200": 4.8e12}
#: 16-bit dense multiply-adds per SM per clock at that peak (989 TFLOPS / 2 / 132 SMs / 1.83 GHz).
MACS_PER_SM_CLOCK = 2048
#: Bytes read per NF4 element at M <= 16: packed codes (1/2) + the resolved fp32 absmax per 64-element block.
NF4_BYTES_PER_ELEMENT = 0.5 + 4 / 64
REGISTERS_PER_SM, SHARED_PER_SM = 65536, 233472


def programs_per_sm(a: Analysis) -> int:
    """Programs one SM holds at once, limited by registers (allocated per warp in units of 8 per thread) and
    shared memory."""
    threads = 32 * a.case.num_warps
    by_regs = REGISTERS_PER_SM // (-(-max(a.registers, 1) // 8) * 8 * threads)
    by_shared = SHARED_PER_SM // a.shared_bytes if a.shared_bytes else 32
    return max(0, min(by_regs, by_shared, 32))


def decode_elements_per_s(a: Analysis) -> float | None:
    """Upper bound on NF4 elements per second a 4096x4096 layer at M=16 unpacks when issue-bound: the SMs its
    grid occupies x the schedulers its warps fill x the clock / issue slots per element. Latency ignored."""
    slots = a.issue_slots_per_element
    if slots is None or not a.case.decode_programs:
        return None
    programs = a.case.decode_programs
    active_sms = min(SMS, programs)
    resident = min(programs_per_sm(a), -(-programs // SMS))
    schedulers = min(ISSUE_PER_SM_CLOCK, a.case.num_warps * resident)
    return active_sms * schedulers * CLOCK_HZ / slots


def issue_to_mma_cycles(a: Analysis) -> float | None:
    """Clocks one main-loop iteration needs to issue its instructions over the clocks the SM's tensor cores need
    for its multiply-adds at the 16-bit dense peak. Above 1, the loop cannot reach tensor peak even at
    compute-bound sizes (M in the thousands): issuing (mostly NF4 decoding) is the bound."""
    if not a.case.macs_per_iteration or a.case.dot_type is None:
        return None
    return (a.loop_instructions * a.case.num_warps / ISSUE_PER_SM_CLOCK) / (a.case.macs_per_iteration / MACS_PER_SM_CLOCK)


def hbm_elements_per_s(bandwidth: float) -> float:
    """NF4 elements per second HBM delivers at ``bandwidth`` bytes/s."""
    return bandwidth / NF4_BYTES_PER_ELEMENT


MIX_COLUMNS = ("matrix", "global load", "shared load", "shared store", "fp arith", "int/address", "conversion", "uniform",
               "sync/control", "move/other")  # fmt: skip


def _row(a: Analysis) -> str:
    c = a.case
    loads = ", ".join(f"{k}x{v}" for k, v in sorted(a.global_loads.items())) or "-"
    slots = a.issue_slots_per_element
    rate = decode_elements_per_s(a)
    ratio = issue_to_mma_cycles(a)
    verdict = "-"
    if rate is not None:
        verdict = " / ".join(f"{rate / hbm_elements_per_s(bw):.2f}" for bw in HBM.values())
    mix = " | ".join(str(a.mix.get(col, 0)) for col in MIX_COLUMNS)
    return (
        f"| {c.label} | {c.config} | {a.matrix} {','.join(a.matrix_shapes)} | {expected_matrix(c) or '-'} | "
        f"{a.registers} | {a.spill_bytes}/{a.stack_bytes} | "
        f"{a.shared_bytes // 1024} | {a.loop_instructions} | {mix} | {loads} | "
        f"{'-' if slots is None else f'{slots:.3f}'} | {verdict} | {'-' if ratio is None else f'{ratio:.2f}'} |"
    )


HEADER = (
    "| kernel | config | main-loop matrix | expected | regs | local/stack B | smem KiB | loop instrs | "
    + " | ".join(MIX_COLUMNS)
    + " | global loads (op.bits x n) | slots/elem | decode / HBM (H100, H200) | issue / MMA clocks |"
)


def summary(analyses: list[Analysis]) -> list[str]:
    """Markdown lines: per kernel, its best bf16 NF4 config by issue slots per element and by the decode bound."""
    lines = ["## Summary: NF4 decoding, bf16", "",
             "| kernel | fewest slots/elem (config, matrix) | best decode / HBM at M = 16, H100 / H200 (config) "
             "| lowest issue / MMA clocks (config) |",
             "|---|---|---|---|"]  # fmt: skip
    for kernel in dict.fromkeys(a.case.kernel for a in analyses):
        group = [a for a in analyses if a.case.kernel == kernel and a.case.dtype == "bf16" and a.issue_slots_per_element]
        if not group:
            continue
        lean = min(group, key=lambda a: a.issue_slots_per_element)
        fast = max(group, key=lambda a: decode_elements_per_s(a) or 0.0)
        best = decode_elements_per_s(fast)
        ratios = "-" if best is None else " / ".join(f"{best / hbm_elements_per_s(bw):.2f}" for bw in HBM.values())
        dense_compute = min(group, key=lambda a: issue_to_mma_cycles(a) or float("inf"))
        ratio = issue_to_mma_cycles(dense_compute)
        lines.append(
            f"| {kernel} | {lean.issue_slots_per_element:.3f} ({lean.case.config}, {lean.matrix}) | {ratios} "
            f"({fast.case.config}) | {'-' if ratio is None else f'{ratio:.2f} ({dense_compute.case.config})'} |"
        )
    return lines + [""]


def render(analyses: list[Analysis], versions: dict[str, str]) -> str:
    """The markdown report."""
    need = {name: hbm_elements_per_s(bw) for name, bw in HBM.items()}
    lines = [
        "# Static report: fastlora's Triton kernels compiled for Hopper (sm_90)",
        "",
        "**These figures are static, read from compiled code, not timings.** No GPU ran anything. "
        f"Generated {versions['date']} by `python -m fastlora.bench.kernel_report` with "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "date")
        + ".",
        "",
        "How to read it:",
        "- *main-loop matrix*: the matrix instructions in the kernel's main loop (the innermost SASS loop holding "
        "the most of them): `wgmma` (SASS `HGMMA`), `mma.sync` (`HMMA`), or none (the dot runs on FMAs).",
        "- *loop instrs* and the mix: SASS instructions of one main-loop iteration, per warp (padding that never "
        "executes left out; a branch inside the loop counted as if taken). Kernels without a loop: the whole kernel.",
        "- *local/stack B*: bytes per thread of local memory and stack (register spills); anything but 0/0 fails the "
        "test suite for bf16 Hopper configs.",
        "- *global loads*: `LDG` loads into registers, `LDGSTS` asynchronous copies into shared memory (Triton's "
        "software pipeline), with the bits each thread moves per instruction.",
        "- *slots/elem*: warp-instructions issued per dequantized NF4 element = loop instrs x warps / "
        "(NF4 elements one iteration unpacks).",
        f"- *decode / HBM*: upper bound on the NF4 elements/s a 4096x4096 layer at M = 16 can unpack when issue-bound "
        f"(SMs its grid occupies, of {SMS}; {ISSUE_PER_SM_CLOCK} warp-instructions per SM per clock, at most one per "
        f"warp; clock {CLOCK_HZ / 1e9:.2f} GHz; latency ignored), divided by the elements/s HBM delivers at "
        f"{NF4_BYTES_PER_ELEMENT:.4f} B/element ("
        + ", ".join(f"{n} {bw / 1e12:.2f} TB/s = {need[n] / 1e12:.2f} T elements/s" for n, bw in HBM.items())
        + "). Below 1: NF4 decoding cannot keep up with HBM in that config; above 1 it may (a bound, not a promise).",
        f"- *issue / MMA clocks*: clocks to issue one iteration (loop instrs x warps / {ISSUE_PER_SM_CLOCK}) over "
        f"clocks the tensor cores need for its multiply-adds at the 16-bit dense peak ({MACS_PER_SM_CLOCK} per SM "
        "per clock). Above 1 the loop is bound by issuing instructions, not by the tensor cores, even at "
        "compute-bound M (both can overlap, so below 1 the decoding can hide under the MMAs).",
        "",
    ]
    lines += summary(analyses)
    for kernel in dict.fromkeys(a.case.kernel for a in analyses):
        group = [a for a in analyses if a.case.kernel == kernel]
        lines += [f"## {kernel}", "", HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
        lines += [_row(a) for a in group]
        lines.append("")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    import triton

    ptxas = subprocess.run([nvidia_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", ptxas)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "ptxas/nvdisasm (CUDA)": release.group(1) if release else "unknown",
    }


def run(only: str | None = None, out_dir: Path | None = None, show_progress: bool = True) -> tuple[list[Analysis], str]:
    """Compile and analyze every Hopper case (or those whose name contains ``only``); write ``report.md``
    into ``out_dir`` when given. Returns the analyses and the markdown.

    Usage: ``analyses, markdown = run("transposed")``
    """
    from tqdm import tqdm

    if nvidia_tool("nvdisasm") is None or nvidia_tool("cuobjdump") is None:
        raise RuntimeError("nvdisasm/cuobjdump not found (they ship with Triton's NVIDIA backend)")
    cases = [c for c in all_cases((90,)) if only is None or only in c.name]
    analyses = [analyze(c) for c in tqdm(cases, desc="compiling for sm_90", disable=not show_progress)]
    text = render(analyses, versions())
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.md").write_text(text + "\n")
    return analyses, text


def default_out_dir() -> Path:
    """``bench/results/static-sm90-<yyyymmdd>`` of the source tree."""
    day = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d")
    return Path(__file__).resolve().parent / "results" / f"static-sm90-{day}"


def main(argv: list[str] | None = None) -> int:
    """``python -m fastlora.bench.kernel_report [--only TEXT] [--out DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m fastlora.bench.kernel_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="only cases whose name contains this text")
    parser.add_argument("--out", type=Path, help="output directory (default bench/results/static-sm90-<date>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    out = args.out or default_out_dir()
    _, text = run(args.only, out, show_progress=not args.quiet)
    print(text)
    print(f"\nwrote {out / 'report.md'} (static figures, not timings)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
