"""Run PEFT's own LoRA tests (from its sdist) with fastlora patched into every PEFT model, and compare with the
committed list of tests that fail without fastlora here.

Runs, each a pytest process over the LoRA tests of :data:`selection.FILES` (``fastlora_hook.py`` is the plugin):
  1. ``backend="cpp"`` on every LoRA test that passes unpatched (``unpatched_failures.txt``), minus
     ``slow_tests.txt`` (``--full`` keeps them);
  2. ``backend="torch"`` on a fixed-seed sample of the same tests (``--full``: all of them).
Fails on a test that fails patched (it passes unpatched: the failures list is deselected), on an ``internal error``
fallback, on a ``fastlora.patch`` error, or when a run fused no call at all. ``--update-list`` instead runs the
LoRA tests unpatched and rewrites ``unpatched_failures.txt``.

The tests run offline: ``HF_ENDPOINT`` points at a loopback server that answers 404 at once (PEFT's
``hub_online_once`` forces online mode, and huggingface_hub would retry a refused connection for minutes), with a
fresh ``HF_HOME``, so hub-bound tests fail fast and alike on every machine, and land in the failures list.

Usage::

    python tests/peft_suite/run.py --peft-tests ~/.cache/fastlora/peft-sdist/peft-0.21.2   # scripts/peft_tests.sh
"""

from __future__ import annotations

import argparse
import glob
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

from selection import FILES  # run as a script: this folder is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
UNPATCHED_FAILURES = os.path.join(HERE, "unpatched_failures.txt")
SLOW_TESTS = os.path.join(HERE, "slow_tests.txt")
INTERNAL_ERROR = "internal error"


class _NotFound(http.server.BaseHTTPRequestHandler):
    """Answers every request with 404 at once: the hub, offline."""

    def _answer(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_POST = do_PUT = _answer

    def log_message(self, *args):
        pass


def offline_hub() -> str:
    """Start the loopback 404 server (a daemon thread); returns its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def run_pytest(peft_dir: str, backend: str, options: list[str], workers: int, scratch: str, label: str) -> dict:
    """One pytest process over the LoRA tests; returns the summed summaries of its processes and its wall/CPU time."""
    summary = os.path.join(scratch, label)
    env = dict(
        os.environ,
        FASTLORA_PEFT_BACKEND=backend,
        FASTLORA_PEFT_SUMMARY=summary,
        PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])),
        HF_HOME=os.path.join(scratch, "hf_home"),
        FASTLORA_TUNING_CACHE=os.path.join(scratch, "tuning.json"),
    )
    files = [os.path.join("tests", name) for name in FILES]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-p", "fastlora_hook",
               "--fastlora-lora-only", "-W", "ignore", "--timeout=600", *options, *files]  # fmt: skip
    if workers > 1:
        command[4:4] = ["-n", str(workers)]
    print(f"[{label}] {' '.join(command[3:])}", flush=True)
    start, cpu_start = time.monotonic(), _children_cpu()
    log = summary + ".log"  # pytest's own output, to follow a run: tail -f
    with open(log, "w") as out:
        process = subprocess.run(command, cwd=peft_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    totals = _merge(sorted(glob.glob(summary + ".*.json")))
    totals.update(wall_s=time.monotonic() - start, cpu_s=_children_cpu() - cpu_start, exit_code=process.returncode)
    with open(log) as f:
        output = f.read()
    tail = output.strip().splitlines()[-1:] or ["(no output)"]
    print(f"[{label}] {tail[0]}  ({totals['wall_s']:.0f} s wall, {totals['cpu_s']:.0f} s CPU; log {log})", flush=True)
    if process.returncode not in (0, 1):  # 1: some tests failed; anything else: pytest itself could not run them
        print(output[-6000:])
    return totals


def _children_cpu() -> float:
    usage = os.times()
    return usage.children_user + usage.children_system


def _merge(paths: list[str]) -> dict:
    totals = {"durations": {}, "patch_calls": 0, "fused_calls": 0, "ran": 0, "layers_patched": Counter(), "layers_left_on_peft": Counter(),
              "calls_run_by_peft": Counter(), "internal_errors": {}, "patch_errors": {}, "failed": {}}  # fmt: skip
    for path in paths:
        with open(path) as f:
            part = json.load(f)
        for key, value in part.items():
            if isinstance(totals.get(key), Counter):
                totals[key].update(value)
            elif isinstance(totals.get(key), dict):
                totals[key].update(value)
            elif isinstance(totals.get(key), int):
                totals[key] += value
    return totals


def report(label: str, totals: dict) -> list[str]:
    """Print what fastlora did in one run; return the problems that fail CI."""
    print(f"[{label}] {totals['ran']} tests ran; {totals['patch_calls']} fastlora.patch calls; layers patched: "
          f"{dict(totals['layers_patched'])}; fused calls: {totals['fused_calls']}")  # fmt: skip
    for title, counter in (("layers left on PEFT", totals["layers_left_on_peft"]), ("calls run by PEFT", totals["calls_run_by_peft"])):
        print(f"[{label}] {title}: {sum(counter.values())}")
        for reason, n in counter.most_common():
            print(f"[{label}]   {n:6d}  {reason}")
    problems = []
    if totals["exit_code"] not in (0, 1):
        problems.append(f"pytest exited with {totals['exit_code']} (collection or usage error)")
    if totals["ran"] == 0:
        problems.append("no test ran")
    elif totals["fused_calls"] == 0:
        problems.append("no call took the fused path: the suite did not exercise fastlora")
    for test, reasons in totals["internal_errors"].items():
        problems.append(f"internal error fallback in {test}: {reasons}")
    for test, error in totals["patch_errors"].items():
        problems.append(f"fastlora.patch raised in {test}: {error}")
    for test, error in sorted(totals["failed"].items()):
        problems.append(f"passes unpatched, fails patched: {test}: {error}")
    return problems


def write_list(path: str, tests: dict, header: str) -> None:
    with open(path, "w") as f:
        f.write(header)
        for test in sorted(tests):
            f.write(f"{test}\n")


def write_slow_list(totals: dict, count: int) -> None:
    """Rewrite slow_tests.txt: the ``count`` slowest of the tests that passed unpatched, each with its seconds."""
    passed = {test: seconds for test, seconds in totals["durations"].items() if test not in totals["failed"]}
    slowest = sorted(passed.items(), key=lambda item: -item[1])[:count]
    share = sum(seconds for _, seconds in slowest) / max(sum(passed.values()), 1e-9)
    with open(SLOW_TESTS, "w") as f:
        f.write(f"# The {count} slowest LoRA tests (unpatched, `run.py --update-list --slow {count}`), "
                f"{share:.0%} of the run's test time: CI leaves them out, `--full` runs them. Seconds as measured then.\n")  # fmt: skip
        for test, seconds in slowest:
            f.write(f"{test}  # {seconds:.1f} s\n")
    print(f"wrote {SLOW_TESTS}: {count} tests, {share:.0%} of the test time")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peft-tests", required=True, help="the unpacked PEFT sdist (holding tests/)")
    parser.add_argument("--update-list", action="store_true", help="run unpatched and rewrite unpatched_failures.txt")
    parser.add_argument("--slow", type=int, default=0, help="with --update-list: rewrite slow_tests.txt with the N slowest")
    parser.add_argument("--full", action="store_true", help="run the slow tests too, and every test with torch")
    parser.add_argument("--torch-sample", type=int, default=400, help="tests run with backend torch (default 400)")
    parser.add_argument("--seed", type=int, default=20, help="the torch sample's seed")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (1: none)")
    args = parser.parse_args(argv)
    os.environ.update(HF_ENDPOINT=offline_hub(), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="2",
                      HF_HUB_DOWNLOAD_TIMEOUT="2", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    scratch = tempfile.mkdtemp(prefix="fastlora-peft-suite-")

    if args.update_list:
        totals = run_pytest(args.peft_tests, "", [], args.workers, scratch, "unpatched")
        if totals["exit_code"] not in (0, 1) or totals["ran"] == 0:
            print("unpatched run failed to run the tests; list left unchanged")
            return 1
        header = (f"# PEFT's LoRA tests that fail WITHOUT fastlora in this environment (offline, CPU), from "
                  f"`python tests/peft_suite/run.py --update-list`: {len(totals['failed'])} of the {len(totals['durations'])} selected.\n")  # fmt: skip
        write_list(UNPATCHED_FAILURES, totals["failed"], header)
        for reason, n in Counter(error for error in totals["failed"].values()).most_common(15):
            print(f"  {n:5d}  {reason}")
        print(f"wrote {UNPATCHED_FAILURES}: {len(totals['failed'])} tests")
        if args.slow:
            write_slow_list(totals, args.slow)
        return 0

    # "--option=value": pytest reads a value after a space as a path to test before the plugin's options exist.
    skip = [f"--fastlora-skip={UNPATCHED_FAILURES}"] + ([] if args.full else [f"--fastlora-skip={SLOW_TESTS}"])
    runs = [("cpp", "cpp", skip)]
    if args.full:
        runs.append(("torch", "torch", skip))
    elif args.torch_sample:
        runs.append((f"torch sample {args.torch_sample} seed {args.seed}", "torch",
                     skip + [f"--fastlora-sample={args.torch_sample}", f"--fastlora-seed={args.seed}"]))  # fmt: skip
    problems = []
    for label, backend, options in runs:
        totals = run_pytest(args.peft_tests, backend, options, args.workers, scratch, label.split()[0])
        problems += [f"[{label}] {problem}" for problem in report(label, totals)]
    if problems:
        print(f"\nPEFT suite with fastlora: {len(problems)} problems")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print("\nPEFT suite with fastlora: no test that passes unpatched fails patched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
