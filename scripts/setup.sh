#!/usr/bin/env bash
# Installs fastlora and what its tests and benchmarks need into the current Python, idempotently.
# torch comes first and pinned when missing: an unpinned `torch` requirement would pull a multi-GB CUDA build
# here, while `torch==2.13.0` is a CPU build on this machine's local disk. An existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${FASTLORA_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q -e ".[test,bench]" 2>&1 | grep -v -E "^(WARNING: Running pip as|\[notice\])" || true
"$PY" -c "import fastlora, torch, peft, bitsandbytes, transformers; print(f'fastlora {fastlora.__version__} ready: torch {torch.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}, transformers {transformers.__version__}')"
