#!/usr/bin/env bash
# The main job: set up, then run the benchmark suite on the built-in default model. Extra arguments go to
# `fastlora bench` (e.g. --device cuda --suite layers --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m fastlora.cli bench "$@"
