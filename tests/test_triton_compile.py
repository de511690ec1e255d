"""Every Triton kernel, with every config it ships, compiles for Hopper (sm_90; Ampere configs for sm_80).

No GPU needed: ``triton.compile`` with a ``GPUTarget`` runs the whole pipeline to a cubin on the CPU. Each
case prints its resources (``pytest -s``); the test fails on register spills (local memory per thread, read
from the cubin with ``cuobjdump -res-usage``) or on shared memory beyond the target's per-block limit.

    python -m pytest tests/test_triton_compile.py -s
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="static compilation needs Triton without the interpreter"
)

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

# The package re-exports the launchers under their modules' names, so fetch the modules themselves.
lora_down, lora_down_grad, lora_linear, lora_linear_grad_input, nf4_absmax, nf4_dequantize = (
    importlib.import_module(f"fastlora.kernels.{name}")
    for name in ("lora_down", "lora_down_grad", "lora_linear", "lora_linear_grad_input", "nf4_absmax", "nf4_dequantize")
)

#: Largest dynamic shared memory one block may use (bytes): H100/H200 and A100.
SHARED_LIMIT = {90: 232448, 80: 166912}
#: Int arguments take this value unless a case says otherwise: a 4096-token batch through a 4096x4096 layer.
REALISTIC_INT = 4096
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _linear_consts(base: int, dtype: torch.dtype) -> dict:
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return dict(
        BASE=base, R_BLOCK=16, BLOCKSIZE=64, EVEN_K=True, K_ALIGNED=True, PRECISION=precision, LORA_PRECISION=precision
    )


def _linear_pointers(kernel: str, base: int, dtype: torch.dtype) -> dict:
    t = TRITON_TYPES[dtype]
    w = "u8" if base == lora_linear.BASE_NF4 else t
    if kernel == "forward":
        return dict(x_ptr=t, w_ptr=w, absmax_ptr="fp32", table_ptr="fp32", bias_ptr=t, s_ptr="fp32", b_ptr="fp32", y_ptr=t)
    return dict(
        dy_ptr=t, w_ptr=w, absmax_ptr="fp32", table_ptr="fp32", ds_ptr="fp32", a_ptr="fp32",
        groups_ptr="i64", keep_scales_ptr="fp32", seeds_ptr="i64", dx_ptr=t,
    )  # fmt: skip


def _cases():
    """(id, jit function, pointer element types, constexprs, int values, triton.Config, compute capability)."""
    nf4, dense, out = lora_linear.BASE_NF4, lora_linear.BASE_DENSE, lora_linear.BASE_IN_OUTPUT
    for kernel, module, extra in (
        ("forward", lora_linear, dict(HAS_BIAS=True, HAS_LORA=True)),
        ("grad_input", lora_linear_grad_input, {}),
    ):
        fn = getattr(module, f"lora_linear{'' if kernel == 'forward' else '_grad_input'}_kernel").fn
        variants = []  # (config, capability, base, dtype)
        for set_name, configs in module.CONFIGS.items():
            if set_name == "fp32":
                variants += [(cfg, cc, b, torch.float32) for cfg in configs for cc in (90, 80) for b in (nf4, dense)]
            else:
                cc, base = (90 if set_name.startswith("hopper") else 80), (nf4 if set_name.endswith("nf4") else dense)
                variants += [(cfg, cc, base, torch.bfloat16) for cfg in configs]
        # The split path's epilogue (dense set) and fp16 (same code as bf16, other conversions).
        variants += [(module.CONFIGS["hopper-dense"][0], 90, out, torch.bfloat16)]
        variants += [(module.CONFIGS["hopper-nf4"][0], 90, nf4, torch.float16)]
        for cfg, cc, base, dtype in variants:
            name = f"{kernel}-{['split_epilogue', 'dense', 'nf4'][base]}-{TRITON_TYPES[dtype]}-sm{cc}-{_config_id(cfg)}"
            ints = dict(R=16, N_GROUPS=2)  # two adapter groups: a loop, as with dropout on two adapters
            yield name, fn, _linear_pointers(kernel, base, dtype), {**_linear_consts(base, dtype), **extra}, ints, cfg, cc
    for name, module, fn, pointers, ints in (
        (
            "lora_down", lora_down, lora_down.lora_down_kernel.fn,
            dict(a_ptr="fp32", s_ptr="fp32", keep_scales_ptr="fp32", col_scales_ptr="fp32"),
            dict(stride_ak=1, stride_sm=16),
        ),
        (
            "lora_down_grad", lora_down_grad, lora_down_grad.lora_down_grad_kernel.fn,
            dict(g_ptr="fp32", out_ptr="fp32", keep_scales_ptr="fp32"),
            dict(stride_gm=16, stride_gr=1, stride_ok=1, rows_per_split=512),
        ),
    ):  # fmt: skip
        pointers = {**pointers, "groups_ptr": "i64", "seeds_ptr": "i64"}
        for set_name, configs in module.CONFIGS.items():
            dtype, cc = {"hopper": ("bf16", 90), "ampere": ("bf16", 80), "fp32": ("fp32", 90)}[set_name]
            consts = dict(R_BLOCK=16, PRECISION="ieee" if dtype == "fp32" else "tf32")
            for cfg in configs:
                yield f"{name}-{dtype}-sm{cc}-{_config_id(cfg)}", fn, {**pointers, "x_ptr": dtype}, consts, ints, cfg, cc
    dequant = nf4_dequantize.nf4_dequantize_kernel.fn
    for set_name, configs in nf4_dequantize.CONFIGS.items():
        cc = 90 if set_name == "hopper" else 80
        for cfg in configs:
            pointers = dict(packed_ptr="u8", absmax_ptr="fp32", table_ptr="fp32", out_ptr="bf16")
            yield f"nf4_dequantize-bf16-sm{cc}-{_config_id(cfg)}", dequant, pointers, dict(BLOCKSIZE=64), {}, cfg, cc
    absmax_cfg = triton.Config({"BLOCK": nf4_absmax.BLOCK}, num_warps=4)
    pointers = dict(q_ptr="u8", code2_ptr="fp32", absmax2_ptr="fp32", out_ptr="fp32")
    yield "nf4_absmax-sm90", nf4_absmax.nf4_absmax_kernel, pointers, dict(BLOCKSIZE2=256), {}, absmax_cfg, 90


def _config_id(cfg) -> str:
    blocks = "x".join(str(v) for v in cfg.kwargs.values())
    return f"{blocks}-w{cfg.num_warps}-s{cfg.num_stages}"


CASES = list(_cases())


def _signature(fn, pointers: dict, consts: dict, ints: dict):
    """Signature, constexprs and attributes as Triton's launcher specializes a call with these int values:
    1 becomes a constant, multiples of 16 are marked divisible by 16 (pointers from torch always are)."""
    signature, attrs, consts = {}, {}, dict(consts)
    for index, arg in enumerate(fn.arg_names):
        value = ints.get(arg, REALISTIC_INT)
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = "*" + pointers[arg]
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


def _cuobjdump() -> str | None:
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def _resources(cubin: bytes) -> dict:
    """REG, STACK and LOCAL (bytes per thread: spills) of a cubin, from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump (bundled with Triton's NVIDIA backend) not found")
@pytest.mark.parametrize("name,fn,pointers,consts,ints,cfg,cc", CASES, ids=[c[0] for c in CASES])
def test_compiles_without_spills(name, fn, pointers, consts, ints, cfg, cc):
    signature, constexprs, attrs = _signature(fn, pointers, {**consts, **cfg.kwargs}, ints)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if fn is nf4_absmax.nf4_absmax_kernel:
        options["enable_fp_fusion"] = False  # as launched
    source = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
    res = _resources(compiled.asm["cubin"])
    shared = compiled.metadata.shared
    print(f"{name}: shared {shared} B, registers {res['REG']}, spill (local) {res['LOCAL']} B, stack {res['STACK']} B")
    assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{name} spills registers: {res}"
    assert shared <= SHARED_LIMIT[cc], f"{name} needs {shared} B of shared memory"
