"""The tuning cache shared by several processes (the ranks of a distributed run), and homes it cannot use.

Two processes write distinct keys into one cache file at the same moment: every key of both must be in the file
afterwards (each write reads, merges and replaces the file under a lock; before, the last writer's keys replaced the
other's). A cache under a home directory that cannot be written or found leaves choices in memory with a warning,
and the op still answers.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch

from fastlora import backends, tuning
from fastlora.backends import cpp
from fastlora.backends import reference as ref

KEYS_PER_RANK = 40

_WRITER = """
import os, sys, time
from fastlora.tuning import store
rank, go = int(sys.argv[1]), sys.argv[2]
open(go + f".ready{rank}", "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
cache = store.Store()
for i in range(KEYS):
    key = store.ShapeKey("cpp", "lora_linear", 16, 100 + i, 64 * (rank + 1), 8, "float32", "nf4", False, "rank-test")
    cache.store(key, f"path{rank}", {f"path{rank}": float(i)})
"""


def test_two_processes_writing_at_once_keep_every_key(tmp_path):
    cache, go = tmp_path / "tuning.json", tmp_path / "go"
    env = {**os.environ, tuning.CACHE_ENV: str(cache)}
    script = _WRITER.replace("KEYS", str(KEYS_PER_RANK))
    writers = [subprocess.Popen([sys.executable, "-c", script, str(rank), str(go)], env=env) for rank in (0, 1)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"go.ready{rank}").exists() for rank in (0, 1)):  # both imported: start together
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers)
        time.sleep(0.01)
    go.touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    entries = json.loads(cache.read_text())["devices"]["rank-test"]
    for rank in (0, 1):
        mine = {text: e for text, e in entries.items() if f"|k{64 * (rank + 1)}|" in text}
        assert len(mine) == KEYS_PER_RANK, (rank, len(mine))
        assert all(e["path"] == f"path{rank}" for e in mine.values())
    assert not list(tmp_path.glob("*.tmp"))  # every partial file was renamed into place


def test_a_write_keeps_what_another_process_wrote_since_this_one_read(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "tuning.json"))
    first, second = tuning.store.Store(), tuning.store.Store()  # both read an empty cache
    key = tuning.ShapeKey("cpp", "lora_down", 1, 0, 64, 8, "float32", "-", False, "dev")
    first.store(key, "cpp", {})
    second.store(key._replace(k=128), "torch", {})
    entries = json.loads((tmp_path / "tuning.json").read_text())["devices"]["dev"]
    assert {e["path"] for e in entries.values()} == {"cpp", "torch"}
    assert tuning.store.Store().lookup(key)[0]["path"] == "cpp"


@pytest.mark.skipif(cpp.unavailable_reason() is not None, reason="C++ backend unavailable")
@pytest.mark.parametrize("home", ["a file, not a directory", "not found"])
def test_a_home_that_cannot_hold_the_cache_leaves_choices_in_memory(home, tmp_path, monkeypatch):
    monkeypatch.delenv(tuning.CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(tuning.PATH_ENV, raising=False)
    if home == "not found":  # what Python raises without HOME and without a passwd entry for the user
        def no_home():
            raise RuntimeError("Could not determine home directory.")

        monkeypatch.setattr(pathlib.Path, "home", staticmethod(no_home))
    else:
        blocker = tmp_path / "home"
        blocker.write_text("")  # ~/.cache cannot be created under a regular file, even by root
        monkeypatch.setenv("HOME", str(blocker))
    with pytest.warns(UserWarning, match="no home directory" if home == "not found" else "cannot write tuning cache"):
        tuning.reset()
        x, w, s, b = torch.randn(9, 130), torch.randn(70, 130), torch.randn(9, 4), torch.randn(70, 4)
        y = tuning.implementation("cpp", "cpu").lora_linear(x, w, None, 0, None, s, b)
    want = ref.lora_linear(x, w, None, 0, None, s, b)
    assert (y - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    assert tuning.decisions()[-1].source == "measured here"
    monkeypatch.undo()
    tuning.reset()
