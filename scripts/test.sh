#!/usr/bin/env bash
# The whole test suite on this machine (set-up included). Extra arguments go to pytest.
#   1. everything but the Triton interpreter tests (and the full differential matrix, sampled instead), on 2 workers;
#   2. the Triton kernels on CPU tensors under TRITON_INTERPRET=1 (read when Triton loads, so its own process);
#   3. the pytest-benchmark layer cases, each checked and run once (--benchmark-disable).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
"$PY" -m pytest -n 2 -q -p no:cacheprovider tests -m "not interpreter and not full_matrix" "$@"
TRITON_INTERPRET=1 "$PY" -m pytest -q -p no:cacheprovider tests -m interpreter "$@"
"$PY" -m pytest -q -p no:cacheprovider bench --benchmark-disable
