#!/usr/bin/env bash
# The GPU run in one command: install what the GPU machine lacks, print `fastlora info`, run the GPU-marked
# tests, then the full GPU benchmark. Everything lands in OUT_DIR: log.txt (all output), report.md,
# results.json and the PNG plots (8 files at most, as the GPU machine returns).
#
# Usage: bench/gpu_check.sh [OUT_DIR] [extra `fastlora bench` options...]
#   OUT_DIR defaults to $OUT (the GPU machine's output folder), else bench/results/<date>.
#   FASTLORA_GPU_STAGES (default "tests,dispatch,static,bench") picks the stages, e.g. "tests,dispatch,static" for
#   a first 10-minute call and "bench" for a second; the static stage compiles every shipped Hopper config and writes
#   the compiled code's figures (OUT_DIR/static/report.md) next to what the other stages measure; FASTLORA_TEST_TIMEOUT (s, default 150) caps the tests;
#   FASTLORA_BENCH_BUDGET (s, default 420) is the benchmark's --time-budget: no case or run starts after it, so a
#   10-minute call still ends with a report (what did not fit is listed in it as not run).
#   The dispatch stage measures the run-time path choices (fastlora.tuning: every Triton path and the torch/cuBLAS
#   composite, per op, shape and M bucket) for the benchmark's layer shapes and writes this GPU's choices into
#   kernels/dispatch_table.json, copied to OUT_DIR as well: commit it so users on this GPU start from measured
#   choices. The choices also land in OUT_DIR/tuning-cache.json, which the benchmark stage then reuses.
# Bring bitsandbytes as a wheel in .whl/ (../shared/gpu/wheels.sh downloads it): the GPU machine has no network.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/$(date -u +%Y%m%d-%H%M)}}"
shift || true
mkdir -p "$out"
log="$out/log.txt"
# tqdm redraws into a log file line by line: once every 30 s is enough to see progress.
export TQDM_MININTERVAL=30 PYTHONUNBUFFERED=1
export FASTLORA_TUNING_CACHE="${FASTLORA_TUNING_CACHE:-$out/tuning-cache.json}"

{
  echo "== setup ($(date -u +%FT%TZ))"
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

  stages=",${FASTLORA_GPU_STAGES:-tests,dispatch,static,bench},"
  if [[ $stages == *,tests,* ]]; then
    echo "== GPU tests ($(date -u +%FT%TZ))"
    timeout "${FASTLORA_TEST_TIMEOUT:-150}" python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests
    echo "GPU tests exit status: $?"
  fi

  if [[ $stages == *,dispatch,* ]]; then
    echo "== run-time path choices per op, shape and M bucket ($(date -u +%FT%TZ))"
    timeout "${FASTLORA_DISPATCH_TIMEOUT:-360}" python3 -m fastlora.bench.dispatch_shapes
    echo "dispatch exit status: $? (the table keeps every shape measured before a time-out)"
    python3 -m fastlora.cli info | sed -n '/^path choices/,$p'
    cp kernels/dispatch_table.json "$out/"
  fi

  if [[ $stages == *,static,* ]]; then
    echo "== static report of the compiled kernels ($(date -u +%FT%TZ))"
    timeout "${FASTLORA_STATIC_TIMEOUT:-240}" python3 -m fastlora.bench.kernel_report --quiet --out "$out/static"
    echo "static report exit status: $?"
  fi

  if [[ $stages == *,bench,* ]]; then
    echo "== GPU benchmark ($(date -u +%FT%TZ))"
    python3 -m fastlora.cli bench --device cuda --suite all --time-budget "${FASTLORA_BENCH_BUDGET:-420}" --out "$out" "$@"
    echo "benchmark exit status: $? ($(date -u +%FT%TZ))"
  fi
} 2>&1 | tee "$log"
