"""The C++ CPU backend: the ops of :mod:`fastlora.ops` for CPU tensors, built from ``csrc/`` on first use.

The sources are compiled with ninja through ``torch.utils.cpp_extension.load`` the first time an op (or
:func:`unavailable_reason`) needs them, and cached in a build directory keyed on the torch and Python versions
(``$FASTLORA_BUILD_DIR``, else ``$TORCH_EXTENSIONS_DIR/fastlora_cpp_<tag>``, else
``~/.cache/fastlora/cpp_<tag>``). They register ``fastlora_cpp::*`` operators (CPU dispatch key); the functions
here adapt them to the signatures of :mod:`fastlora.backends.reference`, computing dropout thresholds on the host
from :func:`fastlora.formats.dropout.dropout_threshold`. The hot ops are called through the extension's pybind11 functions
rather than ``torch.ops`` (the dispatcher costs more than the work at decode sizes); the registered operators
stay for the dispatcher-level callers and the tests. A failed build never raises at import: :func:`unavailable_reason`
returns why, and the registry falls back to the torch reference.

Usage::

    from fastlora.backends import cpp
    if cpp.unavailable_reason() is None:
        y = cpp.lora_linear(x, packed, absmax, 64, None, s, b)  # s from cpp.lora_down(..., scales)
"""

from __future__ import annotations

import os
import sys
import threading
from importlib import resources
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from fastlora.formats.dropout import dropout_threshold

EXTENSION_NAME = "fastlora_cpp"
SOURCE_FILES = ("lora_ops.cpp", "lora_layer.cpp", "lora_layer_half.cpp", "lora_half.cpp", "half_thin.cpp")
# -ffp-contract=off: the nested-absmax resolve and the dropout scaling must round like the reference
# (separate multiply and add), so the compiler may not fuse them into FMAs in the AVX2 code paths.
CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off")
LD_FLAGS = ("-fopenmp",)
# Last lines of a failed build kept in the reason: enough for the compiler's error, short enough to report.
_REASON_LINES = 15

_lock = threading.Lock()
_ops = None  # torch.ops.fastlora_cpp once loaded
# The extension's Python module: the hot ops as direct pybind11 calls, skipping the dispatcher (see lora_ops.cpp).
_direct = None
_failure: str | None = None


def source_dir() -> Path:
    """The directory holding the C++ sources: ``csrc/`` of a source checkout, else the installed package data."""
    checkout = Path(__file__).resolve().parents[2] / "csrc"
    if (checkout / SOURCE_FILES[0]).is_file():
        return checkout
    return Path(str(resources.files("fastlora.csrc")))


def default_build_dir() -> Path:
    """Where the extension is built and cached, one directory per torch/Python version (see module docstring)."""
    override = os.environ.get("FASTLORA_BUILD_DIR")
    if override:
        return Path(override)
    tag = f"torch{torch.__version__.replace('+', '_')}_py{sys.version_info.major}{sys.version_info.minor}"
    extensions_root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if extensions_root:
        return Path(extensions_root) / f"{EXTENSION_NAME}_{tag}"
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_root / "fastlora" / f"cpp_{tag}"


def build(build_dir: Path | str | None = None, verbose: bool = False):
    """Compile (or reuse the cached build of) the C++ ops, load them into this process and return ``torch.ops.fastlora_cpp``.

    A process can load the library once only (a second copy would register the same operators again), so a
    second call returns the loaded ops without building. Raises whatever the compiler or loader raises.
    Usage: ``cpp.build("/tmp/fresh", verbose=True)``.
    """
    global _ops, _direct
    with _lock:
        if _ops is None:
            sources = source_dir()
            target = Path(build_dir) if build_dir is not None else default_build_dir()
            _direct = load_extension(EXTENSION_NAME, [sources / name for name in SOURCE_FILES], target, verbose)
            _ops = torch.ops.fastlora_cpp
    return _ops


def load_extension(name: str, sources: list[Path], build_dir: Path, verbose: bool = False):
    """``torch.utils.cpp_extension.load`` of ``sources`` into ``build_dir`` with fastlora's flags, one build at a time.

    torch's own build lock (a ``lock`` file polled every 0.5 s) is left behind when a build is killed (an
    interrupted test run, a CI timeout), and every later process then waits on it forever. An advisory ``flock``
    around the build, which the kernel releases with its holder, serializes fastlora's builders instead: whoever
    holds it is the only builder, so a ``lock`` file found then is a dead build's, and is removed.

    Usage: ``module = load_extension("fastlora_cpp", [source_dir() / "lora_ops.cpp"], default_build_dir())``
    """
    import fcntl

    from torch.utils import cpp_extension

    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "fastlora-build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        return cpp_extension.load(
            name=name,
            sources=[str(source) for source in sources],
            extra_cflags=list(CXX_FLAGS),
            extra_ldflags=list(LD_FLAGS),
            extra_include_paths=[str(source_dir())],
            build_directory=str(build_dir),
            is_python_module=True,
            verbose=verbose,
        )


def _loaded_ops():
    """torch.ops.fastlora_cpp, building on first use; raises RuntimeError with the reason when that fails."""
    global _failure
    if _ops is not None:
        return _ops
    if _failure is None:
        try:
            return build()
        except Exception as err:  # noqa: BLE001 - any build/load failure means "fall back", with the reason
            lines = f"{type(err).__name__}: {err}".strip().splitlines()
            _failure = "C++ extension failed to build or load: " + "\n".join(lines[-_REASON_LINES:])
    raise RuntimeError(_failure)


def unavailable_reason() -> str | None:
    """None when the C++ ops are built and loaded (building them now if needed), else why they cannot be."""
    try:
        _loaded_ops()
    except RuntimeError as err:
        return str(err)
    return None


def _direct_ops():
    """The extension module (pybind11 functions), building on first use."""
    if _direct is None:
        _loaded_ops()
    return _direct


_dropout_cache: dict[tuple[float, ...], tuple[list[int], list[float]]] = {}


def _dropout_args(dropout_p) -> tuple[list[int], list[float]]:
    """Per adapter: the uint32 drop threshold and the fp64 keep scale 1/(1-p) (1.0 when p == 0); memoized, since
    a model has only a few distinct dropout settings."""
    key = tuple(dropout_p)
    args = _dropout_cache.get(key)
    if args is None:
        thresholds = [dropout_threshold(p) if p > 0.0 else 0 for p in key]
        scales = [1.0 / (1.0 - p) if p > 0.0 else 1.0 for p in key]
        args = _dropout_cache[key] = (thresholds, scales)
    return args


def _packed(weight: Tensor, absmax: Tensor | None) -> Tensor:
    """NF4 weights in any quant_storage dtype as the flat uint8 bytes the kernels read; dense weights as given."""
    return weight if absmax is None else weight.view(torch.uint8).reshape(-1)


def nf4_resolve_absmax(absmax_q: Tensor, code2: Tensor, absmax2: Tensor, blocksize2: int, offset: float) -> Tensor:
    return _loaded_ops().nf4_resolve_absmax(absmax_q, code2, absmax2, blocksize2, float(offset))


def nf4_dequantize(packed: Tensor, absmax: Tensor, blocksize: int, n: int, k: int, dtype: torch.dtype) -> Tensor:
    return _loaded_ops().nf4_dequantize(_packed(packed, absmax), absmax, blocksize, n, k, dtype)


def lora_down(
    x: Tensor, lora_a: Tensor, ranks: list[int], seeds: Tensor, dropout_p: list[float], scales: list[float]
) -> Tensor:
    thresholds, keep_scales = _dropout_args(dropout_p)
    return _direct_ops().lora_down(x, lora_a, ranks, seeds, thresholds, keep_scales, scales)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    absmax: Tensor | None,
    blocksize: int,
    bias: Tensor | None,
    lora_s: Tensor,
    lora_b: Tensor,
    col_scale: Tensor | None = None,
) -> Tensor:
    # The C++ side views any quant_storage dtype as bytes itself, and tells int8 (8-bit) weights by their dtype.
    return _direct_ops().lora_linear(x, weight, absmax, blocksize, bias, lora_s, lora_b, PATH_CODES["auto"], col_scale)


#: ``lora_linear`` with its per-column scale: one implementation serves both ops.
lora_linear_scaled = lora_linear


def lora_up_grad(
    grad_out: Tensor, lora_b: Tensor, lora_s: Tensor, ranks: list[int], scales: list[float]
) -> tuple[Tensor, Tensor]:
    return _direct_ops().lora_up_grad(grad_out, lora_b, lora_s, ranks, scales)


def lora_down_grad(grad_s: Tensor, x: Tensor, ranks: list[int], seeds: Tensor, dropout_p: list[float]) -> Tensor:
    thresholds, keep_scales = _dropout_args(dropout_p)
    return _direct_ops().lora_down_grad(grad_s, x, ranks, seeds, thresholds, keep_scales)


def lora_linear_grad_input(
    grad_out: Tensor,
    weight: Tensor,
    absmax: Tensor | None,
    blocksize: int,
    grad_s: Tensor,
    lora_a: Tensor,
    ranks: list[int],
    seeds: Tensor,
    dropout_p: list[float],
) -> Tensor:
    thresholds, keep_scales = _dropout_args(dropout_p)
    return _direct_ops().lora_linear_grad_input(
        grad_out, weight, absmax, blocksize, grad_s, lora_a, ranks, seeds, thresholds, keep_scales, PATH_CODES["auto"]
    )


def lora_layer(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    weight: Tensor,
    absmax: Tensor | None,
    blocksize: int,
    bias: Tensor | None,
    seeds: Tensor,
    dropout_p: float,
    scale: float,
    path: str = "auto",
) -> Tensor:
    """One LoRA layer call with a single adapter as a C++ autograd node (``csrc/lora_layer.cpp``):
    ``y = x·Wᵀ + b + s·drop(x)·Aᵀ·Bᵀ`` in x's dtype, with the backward of :class:`fastlora.functions.lora.LoRALinearFunction`
    (gradients of x, A, B) run in C++. Not an op of the schema: a candidate of :mod:`fastlora.functions.graph`. ``path``
    (a :data:`PATH_CODES` name) is how both base products get W, e.g. "half" for bf16/fp16 GEMMs; "half_lora" is the
    node with every product in x's dtype (``csrc/lora_layer_half.cpp``: the base GEMMs as on "half", the LoRA products
    as GEMMs in that dtype, each accumulated in fp32 and rounded once), for adapter weights kept in x's dtype (PEFT then
    computes its LoRA chain in it, rounding more often): x, ``lora_a`` and ``lora_b`` must share that dtype.

    Usage: ``y = cpp.lora_layer(x, a, b, w, None, 0, None, seeds, 0.0, 2.0)``
    """
    return bound_lora_layer(lora_a, lora_b, weight, blocksize, bias, dropout_p, scale, path)(x, absmax, seeds)


def bound_lora_layer(
    lora_a: Tensor, lora_b: Tensor, weight: Tensor, blocksize: int, bias: Tensor | None, dropout_p: float,
    scale: float, path: str = "auto",
) -> Callable[[Tensor, Tensor | None, Tensor], Tensor]:
    """:func:`lora_layer` with the layer's own arguments fixed: ``call(x, absmax, seeds)``. A layer's repeated calls
    (the same tensors, dropout and path) skip re-reading them and the wrappers' frames, a few µs of a one-token call.

    Usage: ``call = cpp.bound_lora_layer(a, b, w, 0, None, 0.0, 2.0); y = call(x, None, seeds)``
    """
    (threshold,), (keep_scale,) = _dropout_args((dropout_p,))
    direct = _direct_ops()
    if path == "half_lora":
        op = direct.lora_layer_half
        return lambda x, absmax, seeds: op(x, lora_a, lora_b, weight, absmax, blocksize, bias, seeds, threshold, keep_scale, scale)
    op, code = direct.lora_layer, PATH_CODES[path]
    return lambda x, absmax, seeds: op(x, lora_a, lora_b, weight, absmax, blocksize, bias, seeds, threshold, keep_scale, scale, code)


# ---- run-time candidates (fastlora.tuning) ------------------------------------------------------------------------

#: How a non-fp32 W reaches the base GEMM: csrc/lora_ops.cpp's ``BasePath`` codes. "auto" is its size thresholds;
#: "half" converts W to x's dtype (bf16/fp16) and multiplies in it (csrc/lora_half.cpp), the others in fp32.
PATH_CODES = {"auto": 0, "fused": 1, "whole": 2, "panels": 3, "half": 4}
#: Largest M bucket at which the fused few-token kernels are timed: they multiply row by row, so at larger M they
#: only lose, by a wide margin (dequantize + BLAS is ~2x faster already from about 8 tokens).
FUSED_MAX_M_BUCKET = 16


def _linear_on(code: int):
    direct = _direct_ops()

    def lora_linear(x, weight, absmax, blocksize, bias, lora_s, lora_b):
        return direct.lora_linear(x, weight, absmax, blocksize, bias, lora_s, lora_b, code, None)

    return lora_linear


def _grad_input_on(code: int):
    direct = _direct_ops()

    def lora_linear_grad_input(grad_out, weight, absmax, blocksize, grad_s, lora_a, ranks, seeds, dropout_p):
        thresholds, keep_scales = _dropout_args(dropout_p)
        return direct.lora_linear_grad_input(
            grad_out, weight, absmax, blocksize, grad_s, lora_a, ranks, seeds, thresholds, keep_scales, code
        )

    return lora_linear_grad_input


def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bf16 or fp16) natively, so that ATen's GEMM in it can beat fp32:
    AVX512-BF16 or AMX for bf16, AMX-FP16 for fp16. Elsewhere a bf16/fp16 GEMM emulates in software and is slower
    than fp32 by several times (fp16 by up to 100x on an AVX512-BF16 EPYC), so the "half" candidates are not even
    timed there. Usage: ``cpp.native_half_gemm(torch.bfloat16)``."""
    cpu = torch.cpu
    if dtype == torch.bfloat16:
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    elif dtype == torch.float16:
        probes = ("_is_amx_fp16_supported",)
    else:
        return False
    return any(getattr(cpu, probe, lambda: False)() for probe in probes)


def _half_applies(key) -> bool:
    """The "half" candidate: bf16/fp16 compute the CPU multiplies natively, a W that is not dense fp32 (that one
    goes to fp32 BLAS as it is)."""
    dtype = getattr(torch, key.dtype, None)
    return key.base != "float32" and dtype in (torch.bfloat16, torch.float16) and native_half_gemm(dtype)


def candidates(device_type: str = "cpu") -> dict:
    """Per tuned op, the implementations :mod:`fastlora.tuning` times, the default first: the C++ paths (a dense
    fp32 W goes straight to BLAS: "blas"; other W are converted "whole" into a reused buffer or by "panels", and
    NF4 at few tokens has "fused" kernels; with bf16/fp16 compute on a CPU that multiplies it natively, "half"
    converts W to that dtype and runs the GEMM in it) and "torch", the ATen composite of the split practice. For the
    base products the composite runs only with fp32 compute: "half" computes what it would in bf16/fp16 (the base
    GEMM rounded, the fp32 LoRA term added, the sum rounded), without its allocations. Either rounds the base GEMM
    where the fp32 paths round once: in bf16 the choice can change the output by about one unit roundoff, never
    farther from the exact result than PEFT, which rounds its LoRA term too.

    Usage: ``cpp.candidates()["lora_linear"]["panels"].fn(x, packed, absmax, 64, None, s, b)``
    """
    from fastlora.backends import Candidate
    from fastlora.backends.composite import Composite, without_dropout

    composite = Composite(dequantize=nf4_dequantize)
    dense_f32 = lambda key: key.base == "float32"  # noqa: E731
    converted = lambda key: key.base != "float32"  # noqa: E731
    fused = lambda key: key.base == "nf4" and key.m_bucket <= FUSED_MAX_M_BUCKET  # noqa: E731

    def base_op(on, torch_fn) -> dict:
        return {
            "blas": Candidate(on(PATH_CODES["auto"]), dense_f32),
            "fused": Candidate(on(PATH_CODES["fused"]), fused),
            "whole": Candidate(on(PATH_CODES["whole"]), converted),
            "panels": Candidate(on(PATH_CODES["panels"]), converted),
            "half": Candidate(on(PATH_CODES["half"]), _half_applies),
            "torch": Candidate(torch_fn, lambda key: key.dtype == "float32" and not key.dropout),
        }

    return {
        "lora_down": {"cpp": Candidate(lora_down), "torch": Candidate(composite.lora_down, without_dropout)},
        "lora_linear": base_op(_linear_on, composite.lora_linear),
        "lora_up_grad": {"cpp": Candidate(lora_up_grad), "torch": Candidate(composite.lora_up_grad)},
        "lora_down_grad": {"cpp": Candidate(lora_down_grad), "torch": Candidate(composite.lora_down_grad, without_dropout)},
        "lora_linear_grad_input": base_op(_grad_input_on, composite.lora_linear_grad_input),
    }


# ---- tuning and test knobs (not part of the op schema) -------------------------------------------------------


def set_panel_bytes(panel_bytes: int) -> int:
    """Set the size of the fp32 weight panel dequantized per GEMM call; returns the previous size.

    Usage: ``previous = cpp.set_panel_bytes(4096)`` (tests force many partial panels this way).
    """
    return _loaded_ops().set_panel_bytes(panel_bytes)


def set_whole_weight_bytes(whole_bytes: int) -> int:
    """Set the largest fp32 copy of a non-fp32 W (NF4, bf16, fp16) converted whole into a reused per-thread buffer
    and multiplied in one GEMM; larger weights go panel by panel. Returns the previous limit.

    Usage: ``previous = cpp.set_whole_weight_bytes(0)`` (always panels, as tests do to exercise them).
    """
    return _loaded_ops().set_whole_weight_bytes(whole_bytes)


def set_fused_tokens(tokens: int) -> int:
    """Set the most tokens (rows of x) for which an NF4 W is multiplied by the fused few-token kernels, never
    written out in fp32; returns the previous limit. Usage: ``cpp.set_fused_tokens(0)`` (always dequantize + BLAS).
    """
    return _loaded_ops().set_fused_tokens(tokens)


def set_avx2_enabled(enabled: bool) -> bool:
    """Allow (default) or forbid the AVX2 code paths; returns the previous setting.

    Usage: ``cpp.set_avx2_enabled(False)`` runs the portable paths, e.g. to test them on an AVX2 machine.
    """
    return _loaded_ops().set_avx2_enabled(enabled)


def has_avx2() -> bool:
    """Whether this CPU runs the AVX2 code paths. Usage: ``cpp.has_avx2()``."""
    return _loaded_ops().has_avx2()


def set_avx512_enabled(enabled: bool) -> bool:
    """Allow (default) or forbid the AVX-512 kernels of the thin LoRA products with a bf16/fp16 operand
    (csrc/half_thin_avx512.h); returns the previous setting. ``set_avx2_enabled(False)`` forbids them too.

    Usage: ``cpp.set_avx512_enabled(False)`` runs the AVX2 paths, e.g. to test them on an AVX-512 machine.
    """
    return _loaded_ops().set_avx512_enabled(enabled)


def has_avx512() -> bool:
    """Whether this CPU runs the AVX-512 kernels (AVX-512 F, BW and VL). Usage: ``cpp.has_avx512()``."""
    return _loaded_ops().has_avx512()
