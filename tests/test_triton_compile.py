"""Every Triton kernel, with every config it ships, compiles for Hopper (sm_90; Ampere configs for sm_80).

No GPU needed: ``triton.compile`` with a ``GPUTarget`` runs the whole pipeline to a cubin on the CPU. The cases
(and the compile/resource helpers) are :mod:`fastlora.bench.kernel_report`'s, which also reads the SASS; each
case prints its resources (``pytest -s``); the test fails on register spills (local memory per thread, read
from the cubin with ``cuobjdump -res-usage``) or on shared memory beyond the target's per-block limit.

    python -m pytest tests/test_triton_compile.py -s
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="static compilation needs Triton without the interpreter"
)

pytest.importorskip("triton")
from fastlora.bench import kernel_report  # noqa: E402

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
