"""What the GPU a launch runs on can take: its compute capability and shared memory per block, read from the
launch's own tensors' device (cached per device, never the "current" device), and which autotune configs fit it.

A config's shared-memory need is read from its compiled kernel (``metadata.shared``, the figure Triton itself
checks before loading a kernel), so it is exact for the installed Triton: the shared memory a config needs grows
with the LoRA rank tile (the epilogue stages S and B, [tile, R_BLOCK] fp32 each) and with the pipeline depth, and
no formula tracks every Triton version's allocator. The compile is the one the autotuner would make anyway to
benchmark or launch that config (the JIT cache keeps it). Configs that do not fit are dropped before Triton's
autotuner sees them; when none fits, :class:`DoesNotFit` says so (a Python exception the caller can catch and fall
back on, never a crash inside the launch).

Usage::

    resources.capability(x.device)                  # (9, 0)
    resources.shared_memory_limit(x.device)         # 232448 on an H100 / H200
    kept = resources.fitting(kernel_fn, configs, args, x.device)
"""

from __future__ import annotations

import functools
import importlib

import torch

#: tl.dot on bf16 and the async copies the configs pipeline with need Ampere or newer.
MIN_CAPABILITY = (8, 0)
#: Triton releases the kernels support, [first, last]: every shipped config was compiled for sm_90 and sm_80 with
#: both ends (``tests/test_triton_compile.py`` under each). pyproject.toml states the same range. Triton 3.2-3.5
#: (torch 2.6-2.9) were not checked: those installs get the torch backend, with this module's reason.
TRITON_RANGE = ((3, 6), (3, 9))
#: Largest dynamic shared memory one block may opt in to, per compute capability, where torch cannot tell
#: (bytes; CUDA programming guide, "compute capabilities"): A100/A30 and Orin; RTX 30xx, A10, L4, RTX 40xx;
#: H100/H200 and B200; RTX 50xx.
SHARED_MEMORY_PER_BLOCK = {
    (8, 0): 166912, (8, 7): 166912, (8, 6): 101376, (8, 9): 101376,
    (9, 0): 232448, (10, 0): 232448, (12, 0): 101376,
}  # fmt: skip


def triton_version_problem(version: str) -> str | None:
    """Why Triton ``version`` is outside :data:`TRITON_RANGE`, or None.

    Usage: ``triton_version_problem(triton.__version__)``
    """
    found = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    (lo, hi) = TRITON_RANGE
    if lo <= found <= hi:
        return None
    supported = f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"
    return f"fastlora's Triton kernels support Triton {supported} (compile-checked); this is Triton {version}"


class DoesNotFit(RuntimeError):
    """No config of a kernel fits the GPU it would run on (shared memory), or the GPU is too old for the kernels."""


@functools.lru_cache(maxsize=None)
def capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of the CUDA ``device`` (cached per device).

    Usage: ``capability(torch.device("cuda", 1))``
    """
    return tuple(torch.cuda.get_device_capability(device))


@functools.lru_cache(maxsize=None)
def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one block may use on the CUDA ``device`` (opt-in maximum; cached per device).

    Usage: ``shared_memory_limit(x.device)``
    """
    props = torch.cuda.get_device_properties(device)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    return limit or SHARED_MEMORY_PER_BLOCK.get(capability(device), 101376)


def tensor_device(args: dict) -> torch.device:
    """The device of the first tensor among a launch's arguments (every tensor argument shares it).

    Usage: ``tensor_device({"x_ptr": x, "M": 7})``
    """
    return next(value.device for value in args.values() if isinstance(value, torch.Tensor))


def check_capability(device: torch.device) -> None:
    """Raise :class:`DoesNotFit` when ``device`` is older than :data:`MIN_CAPABILITY`.

    Usage: ``check_capability(x.device)``
    """
    found = capability(device)
    if found < MIN_CAPABILITY:
        need = ".".join(map(str, MIN_CAPABILITY))
        raise DoesNotFit(f"fastlora's Triton kernels need compute capability >= {need}; {device} has {found[0]}.{found[1]}")


def compiled_shared(fn, config, args: dict) -> int:
    """Bytes of shared memory the ``@triton.jit`` ``fn`` compiled with ``config`` for ``args`` needs on the current
    device (compiled, not launched; the JIT cache keeps the kernel for the launch).

    Usage: ``compiled_shared(kernel.fn, kernel.configs[0], {**named_args, **constexprs})``
    """
    kernel_args = {name: value for name, value in args.items() if name in fn.arg_names}  # not grid, warmup, ...
    return fn.warmup(grid=(1,), **kernel_args, **config.all_kwargs()).metadata.shared


def _config_errors() -> tuple[type[BaseException], ...]:
    # What Triton's own autotuner counts as "this config cannot run here" when it benchmarks (it times them as inf).
    from triton.compiler.errors import CompileTimeAssertionFailure
    from triton.runtime.errors import OutOfResources

    ptxas = getattr(importlib.import_module("triton.runtime.errors"), "PTXASError", None)
    return (OutOfResources, CompileTimeAssertionFailure) + ((ptxas,) if ptxas else ())


def fitting(fn, configs: list, args: dict, device: torch.device) -> list:
    """The configs of ``configs`` whose compiled ``fn`` fits ``device``'s shared memory, in their order; raises
    :class:`DoesNotFit` (naming the smallest need, or the configs' compile errors) when none does. A config that
    fails to compile with an error Triton's autotuner also skips (out of resources, ptxas) does not fit either. Call
    under the launch's device guard.

    Usage: ``kept = fitting(kernel.fn, configs, {**named_args, **kwargs}, x.device)``
    """
    limit, needs, errors = shared_memory_limit(device), [], []
    for config in configs:
        try:
            needs.append((compiled_shared(fn, config, args), config))
        except _config_errors() as err:
            errors.append(f"{config}: {type(err).__name__}: {err}")
    kept = [config for need, config in needs if need <= limit]
    if not kept:
        rank = f" at R_BLOCK={args['R_BLOCK']}" if "R_BLOCK" in args else ""
        least = min(needs, key=lambda pair: pair[0]) if needs else None
        why = f"the smallest needs {least[0]} B of shared memory ({least[1]})" if least else "; ".join(errors)
        raise DoesNotFit(f"no config of {fn.__name__}{rank} fits {device}: {why}, the GPU allows {limit} B per block")
    return kept
