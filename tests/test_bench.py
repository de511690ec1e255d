"""The benchmark suite's own logic: results schema, the correctness check before timing, report rendering,
plots, settings from the command line, and a minimal end-to-end ``fastlora bench`` on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from fastlora.bench import layers, plots, report
from fastlora.bench.layers import Contender, LayerCase, make_fixture, run_case
from fastlora.bench.models import LinearShape, layer_shapes
from fastlora.bench.results import LayerRecord, MemoryRecord, Results, TrainRecord, validate
from fastlora.bench.settings import default_settings
from fastlora.bench.timing import RotatingInputs, TimingPolicy, host_seconds, time_interleaved
from fastlora.bench.training import _compare_losses, synthetic_batches
from fastlora.cli import build_parser, main, settings_from_args

CPU = torch.device("cpu")
QUICK = TimingPolicy(budget_s=0.0, min_rounds=2, max_rounds=2)
SHAPE = LinearShape("q_proj", 64, 48, bias=True)


def _case(base: str, mode: str, tokens: int = 8, rank: int = 4) -> LayerCase:
    return LayerCase("micro", SHAPE, tokens, base, mode, rank, torch.float32)


def _settings(**changes):
    return dataclasses.replace(default_settings("cpu"), **changes)


def _by_name(records: list[LayerRecord]) -> dict[str, LayerRecord]:
    return {r.contender: r for r in records}


# ---- correctness check before timing -------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["dense", "nf4"])
def test_every_available_contender_agrees_with_the_reference(base):
    fixture = make_fixture(SHAPE, base, rank=4, dtype=torch.float32, device=CPU, seed=0)
    contenders, unavailable = layers.contenders_for(fixture, _settings(), CPU)
    assert {"peft", "split", "dense"} <= {c.name for c in contenders}
    for mode in ("fwd", "fwd+bwd"):
        records = _by_name(run_case(_case(base, mode), fixture, contenders, unavailable, CPU, None, QUICK))
        for contender in contenders:
            record = records[contender.name]
            assert record.status == "ok", (contender.name, record.detail)
            assert record.check_error <= record.tolerance
            assert record.median_s > 0
        assert records["peft"].speedup_vs_peft == pytest.approx(1.0)


def _scaled(contender: Contender, factor: float, name: str) -> Contender:
    return dataclasses.replace(contender, name=name, forward=lambda x: contender.forward(x) * factor)


class _WrongGradient(torch.autograd.Function):
    """Identity forward, backward off by 10%: only a check of the gradients can catch it."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.1


def test_check_catches_a_wrong_contender_and_does_not_time_it():
    fixture = make_fixture(SHAPE, "nf4", rank=4, dtype=torch.float32, device=CPU, seed=1)
    peft = layers.peft_contender(fixture)
    off_by_two_percent = _scaled(peft, 1.02, "wrong output")
    wrong_gradient = dataclasses.replace(peft, name="wrong gradient", forward=lambda x: _WrongGradient.apply(peft.forward(x)))
    contenders = [peft, off_by_two_percent, wrong_gradient]

    forward = _by_name(run_case(_case("nf4", "fwd"), fixture, contenders, {}, CPU, None, QUICK))
    assert forward["wrong output"].status == "mismatch"
    assert forward["wrong output"].check_error > forward["wrong output"].tolerance
    assert forward["wrong output"].median_s is None and forward["wrong output"].speedup_vs_peft is None
    assert forward["wrong gradient"].status == "ok"  # forward alone is right

    backward = _by_name(run_case(_case("nf4", "fwd+bwd"), fixture, contenders, {}, CPU, None, QUICK))
    assert backward["wrong gradient"].status == "mismatch"
    assert backward["wrong gradient"].median_s is None
    assert backward["peft"].status == "ok" and backward["peft"].median_s > 0


def test_check_catches_a_missing_lora_term():
    """The fixture's LoRA term is as large as the base term: dropping it cannot pass as rounding."""
    fixture = make_fixture(SHAPE, "dense", rank=4, dtype=torch.float32, device=CPU, seed=2)
    base_only = dataclasses.replace(layers.dense_contender(fixture), name="no lora", computes="lora")
    record = _by_name(run_case(_case("dense", "fwd"), fixture, [base_only], {}, CPU, None, QUICK))["no lora"]
    assert record.status == "mismatch" and record.check_error > 0.1


def test_a_call_that_fell_back_to_peft_is_not_timed_as_fastlora():
    fixture = make_fixture(SHAPE, "dense", rank=4, dtype=torch.float32, device=CPU, seed=3)
    peft = layers.peft_contender(fixture)
    report_stub = SimpleNamespace(fallback_calls=Counter())

    def forward(x):
        report_stub.fallback_calls["adapters merged"] += 1
        return peft.forward(x)

    pretender = dataclasses.replace(peft, name="fastlora[stub]", forward=forward, patch_report=report_stub)
    record = _by_name(run_case(_case("dense", "fwd"), fixture, [pretender], {}, CPU, None, QUICK))["fastlora[stub]"]
    assert record.status == "fallback" and "adapters merged" in record.detail
    assert record.median_s is None


def test_unavailable_contenders_are_recorded_as_skipped():
    fixture = make_fixture(SHAPE, "dense", rank=4, dtype=torch.float32, device=CPU, seed=4)
    contenders, unavailable = layers.contenders_for(fixture, _settings(backends=("nonexistent",)), CPU)
    assert "fastlora[nonexistent]" in unavailable
    records = _by_name(run_case(_case("dense", "fwd"), fixture, contenders, unavailable, CPU, None, QUICK))
    assert records["fastlora[nonexistent]"].status == "skipped"
    assert "nonexistent" in records["fastlora[nonexistent]"].detail


def test_flop_and_byte_counts():
    case = LayerCase("m", LinearShape("p", 4096, 1024, False), 512, "nf4", "fwd", 16, torch.bfloat16)
    m, k, n, r = 512, 4096, 1024, 16
    assert case.flops("base") == 2 * m * k * n
    assert case.flops("lora") == 2 * m * k * n + 2 * m * r * (k + n)
    backward = dataclasses.replace(case, mode="fwd+bwd")
    assert backward.flops("base") == 4 * m * k * n
    assert backward.flops("lora") == 4 * m * k * n + 6 * m * r * (k + n)
    # NF4 with double quant moves ~0.516 bytes per weight; a bf16 base 2.
    assert case.min_bytes("base") == pytest.approx(n * k * (0.5 + 1 / 64) + 2 * (m * k + m * n))
    assert dataclasses.replace(case, base="dense").min_bytes("base") == 2 * n * k + 2 * (m * k + m * n)


def test_layer_shapes_group_projections():
    shapes = {s.projections: (s.in_features, s.out_features, s.bias) for s in layer_shapes("llama-3-8b")}
    assert shapes == {
        "q_proj,o_proj": (4096, 4096, False),
        "k_proj,v_proj": (4096, 1024, False),
        "gate_proj,up_proj": (4096, 14336, False),
        "down_proj": (14336, 4096, False),
    }
    assert {s.projections for s in layer_shapes("qwen2.5-7b") if s.bias} == {"q_proj", "k_proj,v_proj"}


# ---- timing ----------------------------------------------------------------------------------------------------------


def test_interleaved_timing_measures_every_function():
    calls = Counter()
    medians = time_interleaved({"a": lambda: calls.update("a"), "b": lambda: calls.update("b")}, CPU, QUICK)
    assert set(medians) == {"a", "b"} and all(t >= 0 for t in medians.values())
    assert calls["a"] == calls["b"] == 3  # one warm-up call, then two interleaved rounds


def test_interleaved_timing_varies_who_follows_whom():
    """Over many rounds every contender runs after each of the others about equally often. Of 300 calls of each of 3
    contenders in random orders, a given other one precedes it 4/9 of the time (1/2 within a round, 1/3 across
    rounds): 133 +- 9 calls; 110-160 holds. A cyclic order, rotated each round, gives 200 and 100."""
    sequence = []
    fns = {name: (lambda name=name: sequence.append(name)) for name in "abc"}
    time_interleaved(fns, CPU, TimingPolicy(budget_s=0.0, min_rounds=300, max_rounds=300))
    after = Counter(zip(sequence[3:], sequence[4:]))  # past the warm-up calls
    for first in "abc":
        for then in "abc":
            if first != then:
                assert 110 <= after[first, then] <= 160, after


def test_the_environment_records_the_c_allocator_settings(monkeypatch):
    from fastlora.bench.environment import c_allocator

    for key in [key for key in os.environ if key.startswith("MALLOC_")] + ["LD_PRELOAD"]:
        monkeypatch.delenv(key, raising=False)
    assert "default settings" in c_allocator()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4294967296")
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")
    assert "MALLOC_TRIM_THRESHOLD_=4294967296" in c_allocator() and "LD_PRELOAD=libjemalloc.so.2" in c_allocator()


def test_rotating_inputs_cover_the_cache():
    made = []
    pool = RotatingInputs(lambda i: made.append(i) or (i,), item_bytes=10 * 2**20, cache_bytes=50 * 2**20)
    assert len(pool.items) == 10  # 2 x 50 MiB of 10 MiB items
    assert [pool.next()[0] for _ in range(11)] == [*range(10), 0]
    assert len(RotatingInputs(lambda i: (i,), item_bytes=8, cache_bytes=0).items) == 1


# ---- training bookkeeping ----------------------------------------------------------------------------------------------


def _train_record(contender: str, losses: list[float]) -> TrainRecord:
    return TrainRecord(model="micro", method="qlora", checkpointing=False, contender=contender, status="ok", seq_len=32,
                       batch=1, steps=2, warmup=1, dtype="float32", tokens_per_s=100.0, losses=losses)  # fmt: skip


def test_loss_comparison_flags_diverging_runs():
    group = [_train_record("peft", [5.0, 4.0, 3.0]), _train_record("fastlora[a]", [5.0, 4.0, 3.0 + 1e-5]),
             _train_record("fastlora[b]", [5.0, 4.1, 3.0])]  # fmt: skip
    _compare_losses(group, torch.float32)
    assert group[1].status == "ok" and group[1].loss_max_abs_diff_vs_peft == pytest.approx(1e-5)
    assert group[2].status == "mismatch" and group[2].loss_max_abs_diff_vs_peft == pytest.approx(0.1)


def test_synthetic_batches_are_reproducible_repeated_motifs():
    first = synthetic_batches(100, 2, 40, 3, seed=7, device=CPU)
    again = synthetic_batches(100, 2, 40, 3, seed=7, device=CPU)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (2, 40) and int(first[0].max()) < 100
    assert torch.equal(first[0][:, :16], first[0][:, 16:32])


# ---- results, report, plots -----------------------------------------------------------------------------------------


def _layer_record(contender: str, tokens: int, median: float | None, status: str = "ok", base: str = "nf4") -> LayerRecord:
    return LayerRecord(
        model="llama-3-8b", projections="q_proj,o_proj", in_features=4096, out_features=4096, bias=False, tokens=tokens,
        base=base, mode="fwd+bwd", rank=16, dtype="bfloat16", contender=contender, status=status,
        detail="" if status == "ok" else "max relative error 0.5 > tolerance 0.02", check_error=1e-3, tolerance=2e-2,
        median_s=median, speedup_vs_peft=None if median is None else 1e-3 / median, tflops=1.0, gbps=2.0,
        gemm_peak_fraction=0.5, copy_peak_fraction=0.25,
    )  # fmt: skip


def _synthetic_results() -> Results:
    env = {"date": "2025-01-01T00:00:00+00:00", "host": "h", "platform": "Linux", "cpu": "Test CPU", "cpu_count": 2,
           "torch_threads": 2, "gpu": None, "command": "fastlora bench",
           "versions": {"torch": "9.9.9", "triton": "3.9.0", "transformers": "5.0", "peft": "0.21", "bitsandbytes": "0.50"}}  # fmt: skip
    results = Results(environment=env, settings=default_settings("cpu").to_dict(),
                      peaks={"gemm_tflops": 0.1, "gemm_shape": [1024, 1024, 1024], "copy_gbps": 10.0, "copy_bytes": 2**28, "dtype": "float32"})  # fmt: skip
    for tokens in (1, 16):
        results.layers += [_layer_record("peft", tokens, 1e-3), _layer_record("fastlora[cpp]", tokens, 5e-4),
                           _layer_record("split", tokens, None, status="mismatch")]  # fmt: skip
    results.train = [_train_record("peft", [5.0, 4.0]), _train_record("fastlora[cpp]", [5.0, 4.0])]
    for r in results.train:
        r.peak_memory_bytes, r.start_memory_bytes, r.memory_kind = 3 * 2**20, 2**20, "process RSS"
    results.memory = [
        MemoryRecord(model="micro", method="qlora", checkpointing=True, contender="peft", status=status, seq_len=n, batch=1,
                     dtype="float32", peak_memory_bytes=peak, start_memory_bytes=0 if peak else None, memory_kind="process RSS")
        for n, status, peak in ((16, "ok", 2**20), (32, "oom", None))
    ]  # fmt: skip
    results.wall_time_s = 12.0
    return results


def test_results_round_trip_and_schema(tmp_path):
    results = _synthetic_results()
    path = tmp_path / "results.json"
    results.save(path)
    payload = json.loads(path.read_text())
    assert validate(payload) == []
    loaded = Results.load(path)
    assert loaded.layers == results.layers and loaded.train == results.train and loaded.memory == results.memory
    assert json.loads(json.dumps(loaded.to_dict())) == payload  # settings come back with lists for tuples


@pytest.mark.parametrize(
    "corrupt, complaint",
    [
        (lambda p: p.update(schema_version=0), "schema_version"),
        (lambda p: p["layers"][0].update(status="great"), "status"),
        (lambda p: p["layers"][0].update(median_s=None), "without median_s"),
        (lambda p: p["train"][0].pop("contender"), "missing ['contender']"),
        (lambda p: p["memory"][0].update(colour="red"), "unknown fields ['colour']"),
    ],
)
def test_schema_violations_are_reported(corrupt, complaint):
    payload = _synthetic_results().to_dict()
    corrupt(payload)
    problems = validate(payload)
    assert any(complaint in p for p in problems), problems
    with pytest.raises(ValueError):
        Results.from_dict(payload)


def test_report_has_tables_versions_settings_and_problems():
    text = report.render_report(_synthetic_results(), ["layers_nf4.png"])
    for expected in ("## Machine and versions", "| torch | 9.9.9 |", "| bitsandbytes | 0.50 |", "Test CPU", "## Settings",
                     "## Measured device peaks", "## Layers", "### NF4 base · fwd+bwd · r=16 · bfloat16",
                     "| model | layers | K→N | M | peft | fastlora[cpp] | split |", "500.0 µs (2.00×)", "| mismatch |",
                     "## Training", "### Per-step losses", "## Memory vs sequence length", "| OOM |",
                     "![layers_nf4.png](layers_nf4.png)", "2025-01-01"):  # fmt: skip
        assert expected in text, expected
    summary = report.summary_table(_synthetic_results())
    assert "| bfloat16 | nf4 | fwd+bwd | fastlora[cpp] | 2 | 2.00× |" in summary
    # the floors table: 2 cases, none below PEFT; split has no timing (mismatch), so no split ratio
    assert "| bfloat16 | fastlora[cpp] | 2 | 0 | 2.00× (nf4 fwd+bwd 4096→4096 M=1) | 0 | - |" in summary
    assert "split on llama-3-8b q_proj,o_proj nf4 fwd+bwd r=16 M=1: mismatch" in summary


def test_gpu_layer_figures_show_host_time_per_call():
    """GPU records carry the host time to issue a call; the detail table shows it next to the median (CPU records
    have none, and their table has no such column)."""
    records = _synthetic_results().layers
    assert "host/call" not in report.layer_detail_table(records)
    for r, host in zip(records, (2.5e-5, 4e-4, None)):
        r.host_s = host
    table = report.layer_detail_table(records).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[9:11] == ["median", "host/call"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:5]]
    assert [row[10] for row in cells] == ["25.0 µs", "400.0 µs", "-"]
    assert host_seconds(lambda: None, torch.device("cpu")) is None  # on CPU the host time is the timing


def test_plots_are_written_as_png(tmp_path):
    written = plots.write_plots(_synthetic_results(), tmp_path)
    assert {p.name for p in written} == {"layers_nf4.png", "train.png", "loss.png", "memory.png"}
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- command line -----------------------------------------------------------------------------------------------------


def test_settings_from_command_line():
    args = build_parser().parse_args(
        ["bench", "--device", "cpu", "--suite", "layers,memory", "--model", "micro", "--tokens", "1,8", "--dtype", "bf16",
         "--checkpointing", "on", "--backends", "torch", "--threads", "1", "--no-split", "--time-budget", "90",
         "--case-seconds", "1.5"]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert settings.suites == ("layers", "memory") and settings.time_budget_s == 90
    assert settings.timing.budget_s == 1.5 and settings.timing.min_rounds == 5  # only the budget changes
    assert settings.layer_models == settings.train_models == settings.memory_models == ("micro",)
    assert settings.tokens == (1, 8) and settings.dtype == torch.bfloat16 and settings.checkpointing == (True,)
    assert settings.layer_suite_dtypes() == (torch.bfloat16,)  # one --dtype: the layer suite runs it alone
    default = settings_from_args(build_parser().parse_args(["bench", "--device", "cpu"]))
    assert default.layer_suite_dtypes() == (torch.float32, torch.bfloat16) and default.dtype == torch.float32
    assert default.timing.budget_s == 0.3
    chosen = settings_from_args(build_parser().parse_args(["bench", "--device", "cpu", "--layer-dtypes", "bf16"]))
    assert chosen.layer_suite_dtypes() == (torch.bfloat16,)
    assert settings.backends == settings.train_backends == ("torch",)
    assert settings.threads == 1 and not settings.include_split
    with pytest.raises(SystemExit):
        settings_from_args(build_parser().parse_args(["bench", "--suite", "speed"]))
    with pytest.raises(ValueError, match="unknown model"):
        settings_from_args(build_parser().parse_args(["bench", "--model", "gpt-5"]))


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backends on cpu" in out and "torch" in out and "versions" in out


def test_bench_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "bench"
    code = main(["bench", "--device", "cpu", "--model", "micro", "--tokens", "1,8", "--ranks", "4", "--methods", "qlora",
                 "--checkpointing", "off", "--seq-len", "32", "--batch", "1", "--warmup", "1", "--steps", "1",
                 "--memory-seq-lens", "16,32", "--threads", "1", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    results = Results.load(out / "results.json")
    assert results.layers and results.train and results.memory
    assert {r.dtype for r in results.layers} == {"float32", "bfloat16"}  # the default layer suite runs both
    assert all(r.status in ("ok", "skipped") for r in results.layers), [r for r in results.layers if r.status not in ("ok", "skipped")]
    assert all(r.status == "ok" for r in results.train + results.memory)
    fastlora_runs = [r for r in results.train if r.contender.startswith("fastlora")]
    assert fastlora_runs and all(r.loss_max_abs_diff_vs_peft is not None for r in fastlora_runs)
    text = (out / "report.md").read_text()
    assert "## Layers" in text and "## Training" in text and "## Memory vs sequence length" in text
    assert {"layers_dense.png", "layers_nf4.png", "train.png", "loss.png", "memory.png"} <= {p.name for p in out.iterdir()}


@pytest.mark.gpu
def test_bench_end_to_end_on_gpu(tmp_path):
    """The GPU path of every suite (do_bench timing, CUDA peak memory, Triton contender) on micro sizes."""
    out = tmp_path / "bench"
    code = main(["bench", "--device", "cuda", "--model", "micro", "--tokens", "1,64", "--ranks", "16", "--seq-len", "64",
                 "--batch", "1", "--warmup", "1", "--steps", "2", "--memory-seq-lens", "64,128", "--out", str(out), "--quiet"])  # fmt: skip
    results = Results.load(out / "results.json")
    bad = [r for r in results.layers + results.train + results.memory if r.status not in ("ok", "skipped")]
    assert code == 0 and not bad, bad
    assert results.peaks["gemm_tflops"] > 1 and results.environment["gpu"]
    triton_layers = [r for r in results.layers if r.contender == "fastlora[triton]"]
    assert triton_layers and all(r.status == "ok" and r.path for r in triton_layers)
    assert all(r.memory_kind == "cuda max allocated" for r in results.train)


def test_interleaved_training_keeps_contenders_apart():
    """Each contender's losses in the interleaved suite equal those of the same contender trained alone from the
    initial adapters: no adapter value, gradient or optimizer state leaks from one contender's steps into another's."""
    from fastlora.bench.models import preset
    from fastlora.bench.training import ModelCache, contender_applied, run_train_suite, train_step

    settings = _settings(train_models=("micro",), methods=("qlora",), checkpointing=(False,), seq_len=32, batch=1,
                         warmup=1, steps=3, train_backends=("cpp",))  # fmt: skip
    cache = ModelCache()
    records = run_train_suite(settings, CPU, cache=cache)
    assert [r.contender for r in records] == ["peft", "fastlora[cpp]"] and all(r.status == "ok" for r in records)
    lora = cache.get("micro", "qlora", settings, CPU)
    batches = synthetic_batches(preset("micro").vocab_size, 1, 32, 4, settings.seed, CPU)
    for record, backend in zip(records, (None, "cpp")):
        with contender_applied(lora, backend, False):
            optimizer = torch.optim.AdamW(lora.trainable(), lr=settings.lr)
            alone = [train_step(lora.model, optimizer, b) for b in batches]
        assert record.losses == alone, record.contender
    assert records[0].losses[-1] < records[0].losses[0]  # it trained: the losses moved


def test_training_peaks_share_one_baseline():
    """A later contender's first step starts with earlier contenders' optimizer states in memory: its absolute peak
    is moved onto the first contender's baseline, and what its step added (peak - start) is kept."""
    from fastlora.bench.training import _common_memory_baseline

    def record(contender, start, peak):
        return TrainRecord(model="micro", method="qlora", checkpointing=False, contender=contender, status="ok", seq_len=8,
                           batch=1, steps=1, warmup=1, dtype="float32", start_memory_bytes=start, peak_memory_bytes=peak)  # fmt: skip

    group = [record("peft", 1000, 1500), record("fastlora[cpp]", 1040, 1340), record("fastlora[torch]", None, None)]
    _common_memory_baseline(group)
    assert [(r.start_memory_bytes, r.peak_memory_bytes) for r in group] == [(1000, 1500), (1000, 1300), (None, None)]


class _Countdown:
    """A run budget that is spent from its ``calls``-th question on (RunBudget's interface, without the clock)."""

    def __init__(self, calls: int):
        self.left = calls

    def spent(self) -> bool:
        self.left -= 1
        return self.left < 0


def test_layer_suite_stops_when_the_budget_is_spent():
    """No case starts after the budget is spent; the records cover exactly the cases run before (every contender)."""
    settings = _settings(layer_models=("micro",), tokens=(1, 8, 16), modes=("fwd",), bases=("dense",), projections=("q_proj",), timing=QUICK)
    # One question before the base layer is built, then one before each case: the fourth answer stops the suite.
    records = layers.run_layer_suite(settings, CPU, None, budget=_Countdown(3))
    assert layers.cases_done(records) == 2 < layers.count_cases(settings)
    contenders = {r.contender for r in records}
    assert len(records) == 2 * len(contenders) and {"peft", "dense"} <= contenders


def test_spent_budget_is_reported_as_not_run(tmp_path):
    """A budget spent before anything starts: every suite lists what it left out, in results.json and the report."""
    from fastlora.bench.runner import run_benchmarks

    settings = _settings(layer_models=("micro",), train_models=("micro",), memory_models=("micro",), time_budget_s=0.0)
    results = run_benchmarks(settings, tmp_path, show_progress=False)
    assert not results.layers and not results.train and not results.memory
    assert [line.split(":")[0] for line in results.not_run] == ["layers", "train", "memory"]
    assert all("time budget of 0 s was spent" in line for line in results.not_run)
    assert Results.load(tmp_path / "results.json").not_run == results.not_run
    assert results.not_run[0] in (tmp_path / "report.md").read_text()


def test_checkpoint_writes_a_report_marked_in_progress(tmp_path, monkeypatch):
    """Inside a suite, the checkpoint writes what was measured so far and says the suite was still running; the
    run's own list of what was not run is left as it was."""
    from fastlora.bench import runner

    monkeypatch.setattr(runner, "CHECKPOINT_INTERVAL_S", 0.0)
    results = Results(environment={}, settings=_settings().to_dict())
    record = LayerRecord(model="micro", projections="q_proj", in_features=64, out_features=48, bias=False, tokens=8, base="dense",
                         mode="fwd", rank=4, dtype="float32", contender="peft", status="ok", median_s=1e-3)  # fmt: skip
    runner._Checkpoint(results, "layers", tmp_path, 0.0)([record])
    saved = Results.load(tmp_path / "results.json")
    assert saved.layers == [record] and "still running" in saved.not_run[0]
    assert "still running" in (tmp_path / "report.md").read_text()
    assert results.not_run == []


def test_projections_select_layer_shapes():
    """--projections keeps only the shapes of the named layers (a shape shared by several layers stays once)."""
    import dataclasses

    from fastlora.bench.layers import count_cases, selected_shapes
    from fastlora.bench.settings import default_settings

    settings = dataclasses.replace(default_settings("cpu"), layer_models=("llama-3.2-1b",), projections=("q_proj", "down_proj"))
    shapes = selected_shapes("llama-3.2-1b", settings)
    assert [(s.in_features, s.out_features) for s in shapes] == [(2048, 2048), (8192, 2048)]
    assert "o_proj" in shapes[0].projections.split(",")
    everything = dataclasses.replace(settings, projections=())
    assert count_cases(settings) * 2 == count_cases(everything)
