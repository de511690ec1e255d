"""First contact: what the run-time choice costs a training run's first steps, counted on the CPU.

- Per step, the keys timed and the candidate calls made (:func:`fastlora.tuning.first_contact`): the first step of a
  tiny QLoRA Llama times at most one graph key per layer shape and one key per op and shape; later steps of the same
  M bucket time nothing.
- ``tuning.tune`` ahead of training (``fastlora tune``) makes the first step of a new process time nothing.
- Timing holds one candidate's output at a time (losing outputs are dropped at once).
"""

from __future__ import annotations

import weakref

import pytest
import torch

import fastlora
from fastlora import tuning
from fastlora.backends import cpp
from fastlora.backends import reference as ref
from tests.conftest import tiny_llama_peft
from tests.test_tuning import fresh_tuning  # noqa: F401 - autouse: a cache file and fresh choices per test

pytestmark = pytest.mark.skipif(cpp.unavailable_reason() is not None, reason="C++ backend unavailable")

BATCH, SEQ = 2, 16
#: The tiny Llama's distinct LoRA layer shapes (N, K): q/o, k/v, gate/up, down.
SHAPES = [(64, 64), (32, 64), (96, 64), (64, 96)]
#: Keys one step can time: a layer graph per shape, and per shape its five tuned ops (fewer are distinct).
MAX_KEYS_PER_BUCKET = len(SHAPES) * (1 + len(tuning.TUNED_OPS))


def _model():
    model = tiny_llama_peft("qlora", r=8, dropout=0.05, dtype=torch.float32)
    fastlora.patch(model, backend="cpp")
    return model


def _step(model, seq: int = SEQ) -> tuning.FirstContact:
    """One training step; returns what it cost (the difference of first_contact around it)."""
    before = tuning.first_contact()
    ids = torch.randint(0, 128, (BATCH, seq))
    model(input_ids=ids, labels=ids).loss.backward()
    after = tuning.first_contact()
    return tuning.FirstContact(*(a - b for a, b in zip(after, before)))


def test_timing_per_step_is_bounded_and_happens_once_per_bucket():
    model = _model()
    first = _step(model)
    most_candidates = max(len(paths) for paths in cpp.candidates().values())
    assert 0 < first.measured_keys <= MAX_KEYS_PER_BUCKET
    assert first.timed_calls <= first.measured_keys * (1 + tuning.ROUNDS) * most_candidates
    assert _step(model).measured_keys == 0 and _step(model).timed_calls == 0
    assert _step(model, seq=SEQ + 5).measured_keys == 0  # M = 42: the same bucket (64)
    longer = _step(model, seq=4 * SEQ)  # M = 128: a new bucket (256), timed once
    assert 0 < longer.measured_keys <= MAX_KEYS_PER_BUCKET and _step(model, seq=4 * SEQ).measured_keys == 0


def test_tuning_ahead_makes_the_first_training_step_free_of_timing():
    tuning.tune("cpp", "cpu", SHAPES, [BATCH * SEQ], base="nf4", rank=8, dtype=torch.float32, dropout=[0.05])
    assert tuning.first_contact().measured_keys > 0
    tuning.reset()  # a new training process in all but name: nothing in memory, the cache file stays
    model = _model()
    cost = _step(model)
    assert (cost.measured_keys, cost.timed_calls, cost.seconds) == (0, 0, 0)
    assert tuning.decisions() and {d.source for d in tuning.decisions()} <= {"cache", "only candidate"}


def test_timing_holds_one_output_at_a_time():
    """Three candidates of lora_linear, timed: when a candidate runs, every earlier call's output is gone."""
    alive: list[weakref.ref] = []

    def candidate(*args):
        assert all(r() is None for r in alive), "an earlier candidate's output is still held"
        out = cpp.lora_linear(*args)
        alive.append(weakref.ref(out))
        return out

    candidates = cpp.candidates()
    candidates["lora_linear"] = {name: tuning.Candidate(candidate) for name in ("a", "b", "c")}
    impl = tuning.TunedOps("cpp", "cpu", cpp, candidates)
    x, w, s, b = torch.randn(9, 130), torch.randn(70, 130), torch.randn(9, 4), torch.randn(70, 4)
    y = impl.lora_linear(x, w, None, 0, None, s, b)
    want = ref.lora_linear(x, w, None, 0, None, s, b)
    assert (y - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert tuning.decisions()[-1].source == "measured here" and len(alive) >= 3 * (1 + tuning.MIN_ROUNDS) + 1


@pytest.mark.interpreter
def test_triton_autotuner_runs_per_step_under_the_interpreter():
    """One QLoRA layer (fp32 compute, dropout) on the Triton kernels: a step autotunes each kernel key once (at most
    5: lora_linear, its grad_input, lora_down for x·Aᵀ and for dy·B, lora_down_grad); a second step with the same
    M autotunes nothing; an M in the next power-of-2 Triton bucket autotunes its keys again."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1")
    from tests.conftest import lora_layer_model

    model = lora_layer_model(77, 51, base="nf4", adapters=((8, 16, 0.05, False),))  # shapes no other test launches
    fastlora.patch(model, backend="triton")

    def step(m: int) -> int:
        before = tuning.first_contact().autotune_runs
        model(torch.randn(1, m, 77)).sum().backward()
        return tuning.first_contact().autotune_runs - before

    first = step(20)
    assert 0 < first <= 5
    assert step(20) == 0 and step(31) == 0  # the same Triton bucket (32)
    assert 0 < step(40) <= 5  # bucket 64: autotuned again (fastlora's own choice buckets are powers of 4)
