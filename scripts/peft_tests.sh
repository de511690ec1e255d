#!/usr/bin/env bash
# PEFT's own LoRA tests, from the sdist of the installed PEFT version, with fastlora patched into every PEFT model
# (tests/peft_suite/run.py; docs/peft-suite.md). Extra arguments go to run.py (--full, --update-list, ...).
#   1. fetch peft-<version>.tar.gz from the package registry once (cached in $FASTLORA_PEFT_SDIST_CACHE,
#      default ~/.cache/fastlora/peft-sdist) and unpack it;
#   2. supply the tests/__init__.py and tests/conftest.py the sdist lacks;
#   3. install the test-only packages its LoRA test files import;
#   4. run them patched (cpp, then a torch sample) and compare with tests/peft_suite/unpatched_failures.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
repo=$(pwd)
version=$("$PY" -c "import importlib.metadata as m; print(m.version('peft'))")
cache=${FASTLORA_PEFT_SDIST_CACHE:-$HOME/.cache/fastlora/peft-sdist}
mkdir -p "$cache"
sdist="$cache/peft-$version.tar.gz"
if [ ! -f "$sdist" ]; then
  "$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation "peft==$version" -d "$cache" 2>&1 \
    | grep -v -E "^(WARNING|\[notice\])" || true
  [ -f "$sdist" ] || { echo "peft_tests.sh: could not download the sdist of peft $version" >&2; exit 1; }
fi
tree="$cache/peft-$version"
if [ ! -d "$tree/tests" ]; then
  tar -xzf "$sdist" -C "$cache"
fi
touch "$tree/tests/__init__.py"
cp tests/peft_suite/peft_conftest.py "$tree/tests/conftest.py"
# Imported at module level by the LoRA test files (testing_common.py, test_mixed.py, test_tuners_utils.py, ...).
"$PY" -m pip install -q "parameterized==0.9.0" "diffusers==0.42.1" 2>&1 | grep -v -E "^(WARNING|\[notice\])" || true
"$PY" "$repo/tests/peft_suite/run.py" --peft-tests "$tree" "$@"
