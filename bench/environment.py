"""What this machine offers: host, CPU and GPU names, library versions, and which fastlora backends can run.

Feeds ``fastlora info`` and the header of every benchmark report.

Usage::

    env = describe_environment()          # dict, JSON-ready
    print(format_environment(env))
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import socket
import sys

import torch

from fastlora import backends

LIBRARIES = ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "fastlora")


def library_versions() -> dict[str, str | None]:
    """Installed version of each library the benchmarks depend on (None when absent)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["torch"] = torch.__version__  # the build tag (+cpu, +cu126) matters and metadata may omit it
    return versions


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, falling back to platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_description() -> dict | None:
    """Name, memory, compute capability and L2 size of CUDA device 0, or None without one."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "cuda": torch.version.cuda,
    }


def backend_status(device_types: tuple[str, ...] = ("cpu", "cuda")) -> dict[str, dict]:
    """Per device type: ``reasons`` (each backend's reason it cannot run there, None when it can) and ``auto``
    (the backend "auto" resolves to, None without such a device)."""
    status: dict[str, dict] = {}
    for device_type in device_types:
        reasons = {name: backends.unavailable_reason(name, device_type) for name in backends.NAMES}
        present = device_type != "cuda" or torch.cuda.is_available()
        auto = backends.resolve("auto", torch.device(device_type)) if present else None
        status[device_type] = {"reasons": reasons, "auto": auto}
    return status


def cpp_build_state() -> dict[str, str | None]:
    """Where the C++ extension is cached and whether a build is there (without building it)."""
    try:
        from fastlora.backends import cpp
    except ImportError as err:
        return {"build_dir": None, "state": f"cpp backend not importable: {err}"}
    build_dir = cpp.default_build_dir()
    built = build_dir.is_dir() and any(build_dir.glob(f"{cpp.EXTENSION_NAME}*.so"))
    return {"build_dir": str(build_dir), "state": "cached build present" if built else "not built yet (builds on first use)"}


def c_allocator() -> str:
    """The C library's allocator and its settings: CPU timings of multi-MB calls depend on them (glibc's adaptive
    mmap threshold can make an allocation fault its pages in on every call; see docs/performance.md)."""
    name, version = platform.libc_ver()
    libc = f"{name} {version}".strip() or "unknown C library"
    settings = " ".join(f"{key}={value}" for key, value in sorted(os.environ.items()) if key.startswith("MALLOC_"))
    described = f"{libc} malloc ({settings or 'default settings'})"
    preload = os.environ.get("LD_PRELOAD")
    return f"{described}, LD_PRELOAD={preload}" if preload else described


def describe_environment() -> dict:
    """Everything a report header needs, JSON-ready."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "allocator": c_allocator(),
        "gpu": gpu_description(),
        "versions": library_versions(),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    }


def format_environment(env: dict, backend_states: dict | None = None, cpp_state: dict | None = None) -> str:
    """Plain-text summary for ``fastlora info``."""
    gpu = env["gpu"]
    lines = [
        f"host      {env['host']}  ({env['platform']})",
        f"cpu       {env['cpu']}  ({env['cpu_count']} cores, torch uses {env['torch_threads']} threads)",
        f"gpu       {gpu['name']}, {gpu['memory_gib']} GiB, sm {gpu['capability']}, CUDA {gpu['cuda']}" if gpu else "gpu       none",
        f"allocator {env.get('allocator', '-')}",
        "versions  " + ", ".join(f"{name} {version or '-'}" for name, version in env["versions"].items()),
    ]
    if cpp_state is not None:
        lines.append(f"cpp build {cpp_state['state']}  [{cpp_state['build_dir']}]")
    for device_type, state in (backend_states or {}).items():
        auto = state["auto"] or "nothing (no such device)"
        lines.append(f"backends on {device_type} (auto -> {auto}):")
        for name, reason in state["reasons"].items():
            lines.append(f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)
