#!/usr/bin/env bash
# Run the TensorFlow-free runtime tests under both interpreter packages.
#
# 1. Write fixtures (converted students and TensorFlow trajectories) with the
#    main environment, which has TensorFlow.
# 2. Run tests/test_runtime_*.py with ai-edge-litert in the main environment.
# 3. Build a second venv with tflite-runtime 2.14 and numpy < 2 (that wheel
#    fails with numpy 2) and run the same tests there.
#
# Environment:
#   PYTHON                 main interpreter (default: python3)
#   DSLO_TFLITE_VENV       venv for tflite-runtime (default: /tmp/dslo-tflite-venv)
#   DSLO_RUNTIME_FIXTURES  reuse this fixture directory instead of writing one
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${DSLO_TFLITE_VENV:-/tmp/dslo-tflite-venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore

if [ -z "${DSLO_RUNTIME_FIXTURES:-}" ]; then
    DSLO_RUNTIME_FIXTURES="$(mktemp -d /tmp/dslo-runtime-fixtures.XXXXXX)"
    trap 'rm -rf "$DSLO_RUNTIME_FIXTURES"' EXIT
    echo "writing runtime fixtures to $DSLO_RUNTIME_FIXTURES"
    "$PYTHON" -m tests.make_runtime_fixtures "$DSLO_RUNTIME_FIXTURES"
fi
export DSLO_RUNTIME_FIXTURES

echo "runtime tests with ai-edge-litert"
DSLO_RUNTIME=ai-edge-litert "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_runtime_*.py

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# The device dependencies from pyproject.toml, with the numpy that
# tflite-runtime 2.14 needs.
"$VENV/bin/python" -m pip install -q "tflite-runtime==2.14.0" "numpy<2" \
    "paho-mqtt>=2.0,<3" "click>=8.1" "safetensors>=0.4" "packaging>=22" \
    "tomli>=2.0; python_version < '3.11'" "pytest>=8"

echo "runtime tests with tflite-runtime 2.14"
PYTHONPATH="$PWD" DSLO_RUNTIME=tflite-runtime "$VENV/bin/python" -m pytest -q \
    -p no:cacheprovider tests/test_runtime_*.py
