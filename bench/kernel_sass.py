"""Reading compiled Triton kernels: resources from ``cuobjdump -res-usage``, SASS from ``nvdisasm``, the main
loop of a kernel and the class of each instruction. The tools are the ones Triton's NVIDIA backend ships.

Usage::

    instructions, labels = sass(compiled.asm["cubin"])
    body = main_loop(instructions, labels, "BF16")
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import tempfile
from pathlib import Path


def nvidia_tool(name: str) -> str | None:
    """Path of ``cuobjdump``/``nvdisasm``/``ptxas`` as bundled with Triton's NVIDIA backend, else on PATH."""
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def _run_on_cubin(tool: str, flags: list[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvidia_tool(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict:
    """REG, STACK and LOCAL (bytes per thread: spills) of a cubin, from ``cuobjdump -res-usage``."""
    out = _run_on_cubin("cuobjdump", ["-res-usage"], cubin)
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out)}


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers: "LDG.E.U8"
    text: str


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):", re.M)
_BRANCH_TARGET = re.compile(r"`\(?(\.L_x_\d+)\)?")


def sass(cubin: bytes) -> tuple[list[Instruction], dict[str, int]]:
    """The cubin's SASS (``nvdisasm -c``) as instructions, and each label's address. Padding that never
    executes (``@!PT``, NOP) is left out."""
    text = _run_on_cubin("nvdisasm", ["-c"], cubin)
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            pending.append(label.group(1))
            continue
        match = _LINE.search(line)
        if not match:
            continue
        address = int(match.group(1), 16)
        for name in pending:
            labels[name] = address
        pending = []
        if (match.group(2) or "").strip() == "@!PT" or match.group(3) == "NOP":
            continue
        instructions.append(Instruction(address, match.group(3), match.group(4).strip()))
    return instructions, labels


MATRIX_FAMILIES = {"HGMMA": "wgmma", "HMMA": "mma.sync", "IMMA": "mma.sync"}


def operand_type(opcode: str) -> str:
    """Operand type of a matrix instruction: its last modifier ("BF16", "TF32", ...); fp16 has none."""
    last = opcode.split(".")[-1]
    return last if last in ("BF16", "TF32", "E4M3", "E5M2", "S8", "U8") else "F16"


def is_dot(opcode: str, dot_type: str | None = None) -> bool:
    """True for a matrix instruction (with ``dot_type`` operands, when given)."""
    return opcode.split(".")[0] in MATRIX_FAMILIES and (dot_type is None or operand_type(opcode) == dot_type)


def main_loop(instructions: list[Instruction], labels: dict[str, int], dot_type: str | None) -> list[Instruction] | None:
    """The instructions of the innermost loop with the most matrix instructions on ``dot_type`` operands (else
    the largest loop), one iteration's worth; None for a kernel without loops."""
    loops = []
    for ins in instructions:
        if ins.opcode.startswith("BRA"):
            target = _BRANCH_TARGET.search(ins.text)
            start = labels.get(target.group(1)) if target else None
            if start is not None and start < ins.address:
                loops.append([i for i in instructions if start <= i.address <= ins.address])
    if not loops:
        return None
    matrix = lambda body: sum(is_dot(i.opcode, dot_type) for i in body)  # noqa: E731
    return max(loops, key=lambda body: (matrix(body), -len(body) if matrix(body) else len(body)))


#: Instruction classes of the mix, by opcode (without modifiers).
CLASSES = {
    "matrix": {"HGMMA", "HMMA", "IMMA"},
    "global load": {"LDG", "LDGSTS", "UTMALDG", "LDGDEPBAR"},
    "global store": {"STG", "RED", "ATOMG"},
    "shared load": {"LDS", "LDSM"},
    "shared store": {"STS"},
    "fp arith": {"FMUL", "FADD", "FFMA", "FMNMX", "FSEL", "FSETP", "HADD2", "HMUL2", "HFMA2", "MUFU", "FCHK", "DMUL"},
    "int/address": {"IMAD", "IADD3", "LEA", "LOP3", "SHF", "ISETP", "SEL", "VIADD", "VIMNMX", "SGXT", "PLOP3",
                    "IMNMX", "IABS", "FLO", "POPC", "BMSK", "LEA.HI", "IADD", "ISCADD"},
    "conversion": {"F2FP", "F2F", "I2F", "F2I", "I2FP", "F2IP", "PRMT"},
    "sync/control": {"BAR", "DEPBAR", "WARPGROUP", "MEMBAR", "FENCE", "BRA", "BSSY", "BSYNC", "EXIT", "SYNCS",
                     "WARPSYNC", "ARRIVES", "CCTL", "ERRBAR"},
}  # fmt: skip


def classify(opcode: str) -> str:
    """The mix class of a SASS opcode; uniform-datapath (U*) integer ops are "uniform"."""
    base = opcode.split(".")[0]
    for name, members in CLASSES.items():
        if base in members:
            return name
    if base.startswith("U") and base not in {"UTMALDG"}:
        return "uniform"
    return "move/other"


def load_width(opcode: str) -> int:
    """Bits per thread of a global load (``LDG.E.128`` -> 128, ``LDG.E.U8`` -> 8, ``LDGSTS.E`` -> 32)."""
    mods = opcode.split(".")[1:]
    for bits, names in ((128, {"128"}), (64, {"64"}), (16, {"U16", "S16"}), (8, {"U8", "S8"})):
        if names & set(mods):
            return bits
    return 32
