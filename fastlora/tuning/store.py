"""What :mod:`fastlora.tuning` keeps: shape keys, decisions, the on-disk cache and the shipped table, device names.

The cache (``$FASTLORA_TUNING_CACHE``, default ``~/.cache/fastlora/tuning.json``; ``off`` keeps choices in memory)
holds ``{"format", "versions": {fastlora, torch, triton}, "devices": {device name: {key text: {"path",
"times_us"}}}}``; a file that is unreadable or from other versions is ignored with a warning and rewritten. Several
processes (the ranks of a distributed run) share it: each write reads the file, adds the keys other processes wrote
since, and replaces it atomically, under a lock (``<cache>.lock``). A home directory that cannot be found or
written leaves the choices in memory, with a warning. The shipped table (``kernels/dispatch_table.json``) has the
same ``devices`` layout.

Usage::

    store = Store(); entry = store.lookup(key); store.store(key, "whole", {"whole": 12.0, "panels": 14.1})
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from fastlora.version import __version__

CACHE_ENV = "FASTLORA_TUNING_CACHE"
CACHE_FORMAT = 1


class ShapeKey(NamedTuple):
    """What a choice is made for. ``n``/``k`` are 0 where the op has no such dimension; ``base`` is the weight's
    kind ("nf4", "int8", or a dense dtype name; "-" for the thin LoRA products)."""

    backend: str
    op: str
    m_bucket: int
    n: int
    k: int
    rank: int
    dtype: str
    base: str
    dropout: bool
    device: str

    @property
    def text(self) -> str:
        """The key as stored in the cache (device apart): ``cpp|lora_linear|m16|n512|k1536|r16|float32|nf4|-``."""
        drop = "dropout" if self.dropout else "-"
        return f"{self.backend}|{self.op}|m{self.m_bucket}|n{self.n}|k{self.k}|r{self.rank}|{self.dtype}|{self.base}|{drop}"


@dataclass(frozen=True)
class Decision:
    """The path a shape key takes and where that choice came from; ``times_us`` when it was measured."""

    key: ShapeKey
    path: str
    source: str
    times_us: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        times = ", ".join(f"{name} {us:.1f}" for name, us in self.times_us.items())
        return f"{self.key.text} -> {self.path} ({self.source}{'; µs: ' + times if times else ''})"


def versions() -> dict[str, str]:
    """The versions a cache is valid for."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    return {"fastlora": __version__, "torch": torch.__version__, "triton": triton}


def cache_path() -> Path | None:
    """Where choices persist (None when ``FASTLORA_TUNING_CACHE=off``, or when there is no home directory to find)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return None if override == "off" else Path(override)
    try:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except (RuntimeError, KeyError, OSError) as err:  # no HOME and no passwd entry (some containers)
        warnings.warn(f"fastlora: no home directory ({err}): path choices stay in memory; set {CACHE_ENV}", stacklevel=3)
        return None
    return root / "fastlora" / "tuning.json"


def shipped_table_path() -> Path:
    """``kernels/dispatch_table.json`` of the installed package (found without importing the Triton kernels)."""
    spec = importlib.util.find_spec("fastlora.kernels")
    return Path(list(spec.submodule_search_locations)[0]) / "dispatch_table.json"


class Store:
    """The on-disk cache of this machine's choices, plus the shipped table's entries, per device name."""

    def __init__(self) -> None:
        self.path = cache_path()
        self.devices: dict[str, dict] = self._read_cache()
        self.shipped: dict[str, dict] = read_json(shipped_table_path(), "shipped table").get("devices", {})

    def _read_cache(self, quiet: bool = False) -> dict[str, dict]:
        if self.path is None:
            return {}
        payload = read_json(self.path, "tuning cache", quiet)
        if not payload:
            return {}
        if payload.get("format") != CACHE_FORMAT or payload.get("versions") != versions():
            if not quiet:
                warnings.warn(
                    f"fastlora: tuning cache {self.path} is from other versions ({payload.get('versions')}, now "
                    f"{versions()}): ignored, choices are measured again and the file rewritten",
                    stacklevel=4,
                )
            return {}
        devices = payload.get("devices")
        return devices if isinstance(devices, dict) else {}

    def lookup(self, key: ShapeKey) -> tuple[dict, str] | None:
        for table, source in ((self.devices, "cache"), (self.shipped, "shipped table")):
            entry = table.get(key.device, {}).get(key.text)
            if isinstance(entry, dict) and isinstance(entry.get("path"), str):
                return entry, source
        return None

    def store(self, key: ShapeKey, path: str, times_us: dict[str, float]) -> None:
        """Keep ``key``'s choice, and write it to the cache file merged with what other processes wrote there since
        (several ranks tune at once): read, merge, atomic replace, under an exclusive lock of ``<cache>.lock``."""
        entry = {"path": path, "times_us": times_us}
        self.devices.setdefault(key.device, {})[key.text] = entry
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _locked(self.path.with_name(self.path.name + ".lock")):
                for device, entries in self._read_cache(quiet=True).items():  # others' keys; ours stay as measured
                    if isinstance(entries, dict):
                        mine = self.devices.setdefault(device, {})
                        mine.update({text: e for text, e in entries.items() if text not in mine})
                payload = {"format": CACHE_FORMAT, "versions": versions(), "devices": self.devices}
                partial = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
                partial.write_text(json.dumps(payload, indent=1, sort_keys=True))
                os.replace(partial, self.path)  # atomic: a reader never sees half a file
        except OSError as err:
            warnings.warn(f"fastlora: cannot write tuning cache {self.path}: {err}; choices stay in memory", stacklevel=4)
            self.path = None


@contextlib.contextmanager
def _locked(lock_path: Path):
    """An exclusive advisory lock on ``lock_path`` for the block (POSIX ``flock``; without fcntl, no lock: the
    replace stays atomic, and only a key written by two processes in the same instant can be lost)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_json(path: Path, what: str, quiet: bool = False) -> dict:
    """The JSON object in ``path``; {} when the file is missing, or unreadable (with a warning unless ``quiet``)."""
    try:
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict):
            raise ValueError(f"top level is a {type(payload).__name__}, not an object")
        return payload
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        if not quiet:
            warnings.warn(f"fastlora: {what} {path} is unreadable ({err}): ignored", stacklevel=5)
        return {}


_device_names: dict[tuple[str, int | None], str] = {}


def device_name(device: torch.device) -> str:
    """What choices are keyed by: the GPU's name, or the CPU's model with torch's thread count (read when a shape
    key is first seen in this process)."""
    if device.type == "cpu":
        return f"cpu: {_cpu_model()} ({torch.get_num_threads()} threads)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = _device_names.get((device.type, index))
    if name is None:
        name = _device_names[(device.type, index)] = torch.cuda.get_device_name(index)
    return name


def _cpu_model() -> str:
    name = _device_names.get(("cpu-model", None))
    if name is None:
        name = platform.processor() or "unknown CPU"
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        _device_names[("cpu-model", None)] = name
    return name
