"""The static Hopper report (:mod:`fastlora.bench.kernel_report`): its SASS reading, and the bf16 Hopper configs'
compiled code meeting what the report says they should be.

A bf16 Hopper config fails if it spills registers or if its main loop has no matrix instruction of the family
:func:`~fastlora.bench.kernel_report.expected_matrix` names (wgmma for dot tiles of >= 64 rows per warpgroup,
mma.sync below). The default run compiles a few representative configs (about a minute on 2 cores); every bf16
Hopper config is ``slow``. No GPU needed; nothing is timed.

    python -m pytest tests/test_kernel_report.py
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="static compilation needs Triton without the interpreter"
)

pytest.importorskip("triton")
from fastlora.bench import kernel_report as kr  # noqa: E402

HAVE_TOOLS = kr.nvidia_tool("nvdisasm") is not None and kr.nvidia_tool("cuobjdump") is not None
BF16_HOPPER = [c for c in kr.all_cases((90,)) if c.dtype == "bf16" and kr.expected_matrix(c) is not None]
#: Both matrix families, both directions, the shipped kernels and their transposed variants, NF4 and dense.
CHEAP = {
    "forward-nf4-bf16-sm90-64x64x64x8-w4-s4",
    "forward-nf4-bf16-sm90-16x64x64x8-w4-s4",
    "grad_input-nf4-bf16-sm90-16x64x32x8-w4-s4",
    "forward-transposed-nf4-bf16-sm90-64x16x64x2-w4-s4",
    "forward-transposed-dense-bf16-sm90-64x16x128x1-w4-s4",
    "grad_input-transposed-nf4-bf16-sm90-64x16x64x4-w4-s4",
    "lora_down-bf16-sm90-64x128-w4-s4",
}


def check_compiled_code(case):
    a = kr.analyze(case)
    assert a.spill_bytes == 0 and a.stack_bytes == 0, f"{case.name} spills: {a.spill_bytes} B local, {a.stack_bytes} B stack"
    assert a.matrix == kr.expected_matrix(case), f"{case.name}: main loop uses {a.matrix}, expected {kr.expected_matrix(case)}"
    assert a.mix["matrix"] > 0
    return a


@pytest.mark.skipif(not HAVE_TOOLS, reason="nvdisasm/cuobjdump (bundled with Triton) not found")
@pytest.mark.parametrize("name", sorted(CHEAP))
def test_bf16_hopper_config_matrix_and_spills(name):
    (case,) = [c for c in BF16_HOPPER if c.name == name]
    a = check_compiled_code(case)
    if case.nf4:
        assert 0 < a.issue_slots_per_element < 10  # a loop was found and counted


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TOOLS, reason="nvdisasm/cuobjdump (bundled with Triton) not found")
@pytest.mark.parametrize("case", BF16_HOPPER, ids=[c.name for c in BF16_HOPPER])
def test_every_bf16_hopper_config(case):
    check_compiled_code(case)


def test_cheap_set_names_exist():
    """Renaming a config must not silently empty the cheap set."""
    assert CHEAP <= {c.name for c in BF16_HOPPER}


def _ins(address: int, opcode: str, text: str = "") -> kr.Instruction:
    return kr.Instruction(address, opcode, text)


def test_main_loop_is_the_loop_with_the_main_dot():
    """Two loops: a TF32 one (the LoRA terms) and a BF16 one (the base GEMM) with fewer matrix instructions."""
    ins = [
        _ins(0x00, "MOV"),
        _ins(0x10, "LDG.E.U8"), _ins(0x20, "HGMMA.64x16x16.F32.BF16"), _ins(0x30, "BRA", "`(.L_x_1)"),
        _ins(0x40, "HMMA.1688.F32.TF32"), _ins(0x50, "HMMA.1688.F32.TF32"), _ins(0x60, "BRA", "`(.L_x_2)"),
        _ins(0x70, "EXIT"),
    ]  # fmt: skip
    labels = {".L_x_1": 0x10, ".L_x_2": 0x40}
    assert [i.address for i in kr.main_loop(ins, labels, "BF16")] == [0x10, 0x20, 0x30]
    assert [i.address for i in kr.main_loop(ins, labels, "TF32")] == [0x40, 0x50, 0x60]
    assert kr.main_loop(ins[:1], {}, "BF16") is None


def test_instruction_classes_and_load_widths():
    assert kr.classify("LDGSTS.E.BYPASS.128") == "global load" and kr.load_width("LDGSTS.E.BYPASS.128") == 128
    assert kr.load_width("LDG.E.U8") == 8 and kr.load_width("LDG.E.64") == 64 and kr.load_width("LDG.E") == 32
    assert kr.classify("F2FP.BF16.F32.PACK_AB") == "conversion"
    assert kr.classify("UIADD3") == "uniform" and kr.classify("LOP3.LUT") == "int/address"


def test_decode_estimate_uses_occupied_sms():
    """The decode bound scales with the SMs a grid occupies: 64 programs use 64 of 132 SMs, 128 (split K in two)
    use 128, and 256 fill all 132 (two resident programs each)."""
    slots = 256 * 4 / (64 * 64)
    for split, sms in [(1, 64), (2, 128), (4, 132)]:
        name = f"forward-transposed-nf4-bf16-sm90-64x16x64x{split}-w4-s4"
        case = next(c for c in BF16_HOPPER if c.name == name)
        a = kr.Analysis(case, 64, 0, 0, 32768, "wgmma", [], 256, kr.Counter(), kr.Counter())
        assert case.decode_programs == 64 * split
        assert kr.decode_elements_per_s(a) == pytest.approx(sms * 4 * kr.CLOCK_HZ / slots)
    text = kr.render([a], {"date": "today", "triton": "x"})
    assert "static" in text and "not timings" in text
