"""Every Triton launcher on ``meta`` tensors with the launch itself stubbed: what reaches the kernel is on the
input's device, nothing syncs with the host, and launches run under a guard for the tensors' own device.

Meta tensors have no data: any ``.item()``, ``float()``, ``bool()`` or ``.tolist()`` of one raises, so a launcher
that completes here reads no tensor value on the host (on CUDA that would be a sync per call). The launch is
stubbed at Triton's entry points (``Autotuner.run``, ``JITFunction.run``), so the launchers' own code (workspaces,
cached tables, grids) runs unchanged. No GPU and no interpreter needed.

    python -m pytest tests/test_launch_devices.py
"""

from __future__ import annotations

import contextlib
import importlib
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1", reason="stubs the compiled launch path, not the interpreter's"
)
triton = pytest.importorskip("triton")
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from fastlora.kernels import common, resources  # noqa: E402

META = torch.device("meta")
M, N, K = 7, 72, 200
RANKS, DROPOUT, SCALES = [4, 16], [0.1, 0.0], [2.0, 0.5]


def _module(name: str):
    return importlib.import_module(f"fastlora.kernels.{name}")


class Launches:
    """Records each stubbed launch: (kernel name, tensor arguments by name, device made current around it)."""

    def __init__(self):
        self.calls: list[tuple[str, dict, object]] = []
        self.current = None

    def record(self, name: str, params: list[str], args: tuple, kwargs: dict) -> None:
        named = {**dict(zip(params, args)), **kwargs}
        tensors = {key: value for key, value in named.items() if isinstance(value, torch.Tensor)}
        self.calls.append((name, tensors, self.current))


@pytest.fixture
def launches(monkeypatch):
    """Stub Triton's launch entry points (the autotuner's and the JIT function's) with a recorder."""
    log = Launches()

    def autotuner_run(self, *args, grid, warmup=False, **kwargs):
        self.best_config = self.configs[0]
        grid({**kwargs, **self.best_config.all_kwargs()}) if callable(grid) else grid
        log.record(self.fn.__name__, self.fn.arg_names, args, kwargs)

    def jit_run(self, *args, grid, warmup=False, **kwargs):
        log.record(self.__name__, self.arg_names, args, kwargs)

    monkeypatch.setattr(Autotuner, "run", autotuner_run)
    monkeypatch.setattr(JITFunction, "run", jit_run)
    monkeypatch.setattr(common, "_TUNED", {})
    return log


def _nf4(n: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty((n * k + 1) // 2, dtype=torch.uint8, device=device), torch.empty(-(-n * k // 64), device=device)


def _calls(device):
    """(name, launcher call) for every launcher and path, on tensors on ``device``."""
    lora_linear, grad_input = _module("lora_linear").lora_linear, _module("lora_linear_grad_input").lora_linear_grad_input
    forward_t = _module("lora_linear_transposed").lora_linear_transposed
    grad_input_t = _module("lora_linear_grad_input_transposed").lora_linear_grad_input_transposed
    r = sum(RANKS)
    x, dy = torch.empty(M, K, dtype=torch.bfloat16, device=device), torch.empty(M, N, dtype=torch.bfloat16, device=device)
    a, b = torch.empty(r, K, device=device), torch.empty(N, r, device=device)
    s, seeds = torch.empty(M, r, device=device), torch.empty(len(RANKS), dtype=torch.int64, device=device)
    packed, absmax = _nf4(N, K, device)
    dense = torch.empty(N, K, dtype=torch.bfloat16, device=device)
    int8, scb = torch.empty(N, K, dtype=torch.int8, device=device), torch.empty(N, device=device)
    col_scale, bias = torch.empty(N, device=device), torch.empty(N, dtype=torch.bfloat16, device=device)
    bases = {"nf4": (packed, absmax), "dense": (dense, None), "int8": (int8, scb)}
    calls = {
        "lora_down": lambda: _module("lora_down").lora_down(x, a, RANKS, seeds, DROPOUT, SCALES),
        "lora_down_grad-split": lambda: _module("lora_down_grad").lora_down_grad(s, x, RANKS, seeds, DROPOUT, 4),
        "lora_up_grad": lambda: _module("lora_up_grad").lora_up_grad(dy, b, s, RANKS, SCALES),
        "nf4_dequantize": lambda: _module("nf4_dequantize").nf4_dequantize(packed, absmax, 64, N, K, torch.bfloat16),
        "int8_dequantize": lambda: _module("int8_dequantize").int8_dequantize(int8, scb, torch.bfloat16),
        "nf4_resolve_absmax": lambda: _module("nf4_absmax").nf4_resolve_absmax(
            torch.empty(40, dtype=torch.uint8, device=device), torch.empty(256, device=device),
            torch.empty(1, device=device), 256, 0.5,
        ),
    }  # fmt: skip
    for base, (w, am) in bases.items():
        for path in ("fused", "split"):
            calls[f"lora_linear-{base}-{path}"] = lambda w=w, am=am, path=path: lora_linear(
                x, w, am, 64, bias, s, b, col_scale, path=path
            )
            calls[f"grad_input-{base}-{path}"] = lambda w=w, am=am, path=path: grad_input(
                dy, w, am, 64, s, a, RANKS, seeds, DROPOUT, path=path
            )
        if base != "int8":
            calls[f"lora_linear_transposed-{base}"] = lambda w=w, am=am: forward_t(x, w, am, 64, bias, s, b, col_scale)
            calls[f"grad_input_transposed-{base}"] = lambda w=w, am=am: grad_input_t(
                dy, w, am, 64, s, a, RANKS, seeds, DROPOUT
            )
    return calls


CALLS = list(_calls(META))


@pytest.mark.parametrize("name", CALLS)
def test_launcher_passes_only_tensors_on_the_input_device_and_never_syncs(name, launches):
    result = _calls(META)[name]()
    assert launches.calls, f"{name} launched nothing"
    for kernel, tensors, _ in launches.calls:
        assert tensors, kernel
        wrong = {arg: t.device for arg, t in tensors.items() if t.device != META}
        assert not wrong, f"{name}: {kernel} got tensors on other devices: {wrong}"
    for out in result if isinstance(result, tuple) else (result,):
        assert out.device == META


def test_launch_runs_under_the_tensors_device(monkeypatch, launches):
    """``common.launch`` makes the tensors' CUDA device current around the launch (Triton launches on the current
    device and stream), whatever device was current before; other devices get no guard."""
    entered = []

    @contextlib.contextmanager
    def cuda_device(device):
        entered.append(device)
        launches.current = device
        yield
        launches.current = None

    monkeypatch.setattr(torch.cuda, "device", cuda_device)
    kernel = _module("nf4_dequantize").nf4_dequantize_kernel
    table = torch.empty(16, device=META)
    args = (torch.empty(4, dtype=torch.uint8, device=META), torch.empty(1, device=META), table, table, 8)
    for device in (torch.device("cuda", 3), torch.device("cuda", 3), META):  # first launch, cached config, meta
        common.launch(kernel, (1,), (device, torch.bfloat16, 8, 64), *args, BLOCKSIZE=64)
    assert entered == [torch.device("cuda", 3)] * 2
    assert [current for *_, current in launches.calls] == [torch.device("cuda", 3)] * 2 + [None]


def test_pruner_reads_the_tensors_device_and_keeps_fitting_configs(monkeypatch):
    """The config pruner asks the capability and shared memory of the launch tensors' device, keeps the configs of
    that generation's set whose compiled kernel fits, and raises DoesNotFit (a catchable error naming the smallest
    need) when none does, or when the GPU is older than Ampere."""
    module = _module("lora_down")
    asked, needs = [], {}
    monkeypatch.setattr(resources, "capability", lambda device: asked.append(device) or (9, 0))
    monkeypatch.setattr(resources, "shared_memory_limit", lambda device: 100_000)
    monkeypatch.setattr(resources, "compiled_shared", lambda fn, config, args: needs[config])
    hopper, wide = module.CONFIGS["hopper"], module.CONFIGS["hopper-wide"]
    for i, config in enumerate(hopper + wide):
        needs[config] = 150_000 if i % 2 else 50_000
    device = torch.device("cuda", 1)
    x = torch.empty(8, 64, dtype=torch.bfloat16, device=META)
    prune = module.lora_down_kernel.early_config_prune
    monkeypatch.setattr(resources, "tensor_device", lambda args: device if args["x_ptr"] is x else None)
    kept = prune(module.lora_down_kernel.configs, {"x_ptr": x}, R_BLOCK=128)
    assert kept == hopper[::2] and set(asked) == {device}
    assert prune(module.lora_down_kernel.configs, {"x_ptr": x}, R_BLOCK=256) == [  # the wide-rank set
        config for config in wide if needs[config] < 100_000
    ]
    needs.update({config: 150_000 for config in hopper})
    with pytest.raises(resources.DoesNotFit, match="R_BLOCK=128.*150000 B.*100000 B"):
        prune(module.lora_down_kernel.configs, {"x_ptr": x}, R_BLOCK=128)
    monkeypatch.setattr(resources, "capability", lambda device: (7, 5))
    with pytest.raises(resources.DoesNotFit, match="compute capability >= 8.0; cuda:1 has 7.5"):
        prune(module.lora_down_kernel.configs, {"x_ptr": x}, R_BLOCK=16)


def test_triton_outside_the_supported_range_is_refused_with_a_reason():
    """The range in resources.TRITON_RANGE is the one pyproject.toml states; versions outside it get a reason (the
    triton backend then fails to import with it, and ``auto`` takes the torch backend)."""
    from pathlib import Path

    (lo, hi) = resources.TRITON_RANGE
    stated = f"Supported Triton: {lo[0]}.{lo[1]} to {hi[0]}.{hi[1]}"
    assert stated in (Path(__file__).parents[1] / "pyproject.toml").read_text()
    for inside in (f"{lo[0]}.{lo[1]}.0", f"{hi[0]}.{hi[1]}.1+git1234", triton.__version__):
        assert resources.triton_version_problem(inside) is None, inside
    for outside in ("3.2.0", f"{hi[0]}.{hi[1] + 1}.0"):
        assert f"this is Triton {outside}" in resources.triton_version_problem(outside)


def test_a_config_that_cannot_compile_does_not_fit(monkeypatch):
    """A config whose compile fails the way Triton's autotuner skips (out of resources) is dropped like one that
    needs too much shared memory; when every config fails, DoesNotFit carries their errors."""
    from triton.runtime.errors import OutOfResources

    module = _module("lora_down")
    configs = module.CONFIGS["hopper"]

    def compiled_shared(fn, config, args):
        if config is configs[0]:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return 1000

    monkeypatch.setattr(resources, "compiled_shared", compiled_shared)
    monkeypatch.setattr(resources, "shared_memory_limit", lambda device: 232_448)
    assert resources.fitting(module.lora_down_kernel.fn, configs, {}, META) == configs[1:]
    with pytest.raises(resources.DoesNotFit, match="OutOfResources.*shared memory"):
        resources.fitting(module.lora_down_kernel.fn, configs[:1], {"R_BLOCK": 256}, META)


def test_first_launch_prunes_through_triton_autotuner_to_the_fitting_config(monkeypatch):
    """Through Triton's real ``Autotuner.run`` (only the JIT function's compile and launch stubbed): the pruner
    compiles each config of the set for the launch's arguments (warm-up compiles, no launch), keeps the one that
    fits, and the launch runs with it, without benchmarking."""
    from types import SimpleNamespace

    module = _module("lora_down")
    configs = module.CONFIGS["hopper"]
    fits = configs[2]
    warmed, launched = [], []

    def jit_run(self, *args, grid, warmup=False, **kwargs):
        config = next(c for c in configs if all(kwargs.get(k) == v for k, v in c.all_kwargs().items()))
        if warmup:
            warmed.append(config)
            return SimpleNamespace(metadata=SimpleNamespace(shared=1000 if config is fits else 10**6))
        launched.append((config, {k: v.device for k, v in kwargs.items() if isinstance(v, torch.Tensor)}))

    monkeypatch.setattr(JITFunction, "run", jit_run)
    monkeypatch.setattr(common, "_TUNED", {})
    monkeypatch.setattr(resources, "capability", lambda device: (9, 0))
    monkeypatch.setattr(resources, "shared_memory_limit", lambda device: 232_448)
    monkeypatch.setattr(module.lora_down_kernel, "cache", {})
    x, a = torch.empty(M, K, dtype=torch.bfloat16, device=META), torch.empty(16, K, device=META)
    module.lora_down(x, a, [16], torch.empty(1, dtype=torch.int64, device=META), [0.0], [1.0])
    assert warmed == configs and [config for config, _ in launched] == [fits]
