#!/usr/bin/env bash
# The GPU run in two steps of at most 8 minutes each (the GPU machine runs one command for at most 10 minutes,
# about 15 minutes in all). docs/gpu.md explains each step and what to read in its output.
#
#   step 1 (answers the most first): setup, `fastlora info`, the GPU tests (-x, a time limit per test and one for
#          the whole stage, junit XML into OUT_DIR, every Triton kernel on its first fitting config: a test-only
#          single-config switch, tests/single_config.py), then the core layer benchmark (Llama-3-8B shapes, r=16).
#   step 2 (the rest): the run-time path choices per op, shape and M bucket (written into kernels/dispatch_table.json
#          and OUT_DIR), then the other benchmark suites (training, memory, the full layer sweep) within a time budget.
#
# The static report of the compiled kernels needs no GPU: run it on any machine, not here
# (`python -m fastlora.bench.kernel_report --out bench/results/static`).
#
# Usage: bench/gpu_check.sh STEP [OUT_DIR] [extra `fastlora bench` options...]      STEP: 1 or 2
#   OUT_DIR defaults to $OUT (the GPU machine's output folder), else bench/results/<date>-step<STEP>.
#   Everything lands in OUT_DIR: log.txt (all output), junit-gpu.xml (step 1), report.md, results.json, the plots
#   (as plots.tar when more than 8 files would come back: the GPU machine returns 8), tuning-cache.json (the path
#   choices made), dispatch_table.json (step 2).
#   Time limits (seconds; defaults keep each step under 8 minutes, setup included):
#     FASTLORA_TEST_TIMEOUT (200) the GPU tests in all, FASTLORA_TEST_TIMEOUT_EACH (60) one test (pytest-timeout when
#     installed, else a traceback dump only), FASTLORA_CORE_BUDGET (150) the core benchmark, FASTLORA_DISPATCH_TIMEOUT
#     (180) the path choices, FASTLORA_BENCH_BUDGET (200) the rest of the benchmark. A benchmark stops starting cases
#     at its budget and lists what did not fit as not run; each stage is also killed at its budget plus a margin.
# Bring bitsandbytes (and pytest-timeout) as wheels in .whl/: `../shared/gpu/wheels.sh pytest-timeout==2.3.1`
# (the GPU machine has no network; bitsandbytes 0.50.2's wheel is 41.1 MiB (43,139,553 B) of the 64 MiB carry limit).
set -uo pipefail
cd "$(dirname "$0")/.."
step="${1:-}"
if [[ $step != 1 && $step != 2 ]]; then
  echo "usage: bench/gpu_check.sh 1|2 [OUT_DIR] [fastlora bench options]" >&2
  exit 2
fi
shift
out="${1:-${OUT:-bench/results/$(date -u +%Y%m%d-%H%M)-step$step}}"
shift || true
mkdir -p "$out"
log="$out/log.txt"
# tqdm redraws into a log file line by line: once every 30 s is enough to see progress.
export TQDM_MININTERVAL=30 PYTHONUNBUFFERED=1
export FASTLORA_TUNING_CACHE="${FASTLORA_TUNING_CACHE:-$out/tuning-cache.json}"
# Compiled Triton kernels persist in the work tree (git-ignored), so step 2 on a warm machine reuses step 1's.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/.triton-cache}"
margin=30

stage() { echo "== $1 ($(date -u +%FT%TZ))"; }

# The GPU machine returns at most 8 files from OUT: past that, the plots travel as one plots.tar.
pack_for_return() {
  local count
  count=$(find "$out" -maxdepth 1 -type f | wc -l)
  if (( count > 8 )) && compgen -G "$out/*.png" > /dev/null; then
    tar -C "$out" -cf "$out/plots.tar" $(cd "$out" && ls *.png) && rm -f "$out"/*.png
    echo "packed the plots into plots.tar ($count files were in $out; 8 come back)"
  fi
}

{
  stage "setup, step $step"
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastlora-site .whl/*.whl \
      && export PYTHONPATH="/tmp/fastlora-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
    # Without a usable setuptools, lay the package out by hand: kernels/ and bench/ install inside fastlora/.
    layout=/tmp/fastlora-layout/fastlora
    mkdir -p "$layout"
    for entry in fastlora/*; do ln -sfn "$PWD/$entry" "$layout/$(basename "$entry")"; done
    ln -sfn "$PWD/kernels" "$layout/kernels"
    ln -sfn "$PWD/bench" "$layout/bench"
    export PYTHONPATH="/tmp/fastlora-layout${PYTHONPATH:+:$PYTHONPATH}"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -m fastlora.cli info

  if [[ $step == 1 ]]; then
    stage "GPU tests (single config per kernel, -x)"
    each="${FASTLORA_TEST_TIMEOUT_EACH:-60}"
    if python3 -c "import pytest_timeout" 2>/dev/null; then
      per_test=(-p pytest_timeout --timeout "$each")
    else
      per_test=(-o "faulthandler_timeout=$each")  # no pytest-timeout: a stuck test prints its stacks at least
    fi
    FASTLORA_TEST_SINGLE_CONFIG=1 timeout -k 10 "${FASTLORA_TEST_TIMEOUT:-200}" python3 -m pytest -m gpu -x -q -rs \
      -p no:cacheprovider -p tests.single_config "${per_test[@]}" --junitxml="$out/junit-gpu.xml" tests
    echo "GPU tests exit status: $? (124: the stage's time limit)"

    stage "core layer benchmark"
    budget="${FASTLORA_CORE_BUDGET:-150}"
    timeout -k 10 $((budget + margin)) python3 -m fastlora.cli bench --device cuda --suite layers --model llama-3-8b \
      --tokens 16,512,4096 --ranks 16 --modes fwd+bwd --time-budget "$budget" --out "$out" "$@"
    echo "core benchmark exit status: $?"
  else
    stage "run-time path choices per op, shape and M bucket"
    timeout -k 10 "${FASTLORA_DISPATCH_TIMEOUT:-180}" python3 -m fastlora.bench.dispatch_shapes
    echo "dispatch exit status: $? (the table keeps every shape measured before a time-out)"
    python3 -m fastlora.cli info | sed -n '/^path choices/,$p'
    cp kernels/dispatch_table.json "$out/"

    stage "benchmark: training, memory and the full layer sweep"
    budget="${FASTLORA_BENCH_BUDGET:-200}"
    timeout -k 10 $((budget + margin)) python3 -m fastlora.cli bench --device cuda --suite all --time-budget "$budget" \
      --out "$out" "$@"
    echo "benchmark exit status: $?"
  fi
  pack_for_return
  stage "done, step $step"
} 2>&1 | tee "$log"
