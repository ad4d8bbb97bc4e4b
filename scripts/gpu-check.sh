#!/usr/bin/env bash
# The GPU check, one command for the first machine with a GPU (under 8 minutes on one):
# the tests that need or name CUDA (the rest of tests/test_encoder_device.py runs fp16 on
# the CPU, in CI, and took most of the 309 s the whole file took on an H200), then the
# measurements into results/gpu.md and results/gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p results
"$PY" -m pytest -q -rs --durations=0 -k cuda tests/test_encoder_device.py 2>&1 \
    | tee results/gpu-tests.txt
tests=${PIPESTATUS[0]}
"$PY" -m benchmarks.gpu_check "$@"
check=$?
echo "tests exit $tests, check exit $check"
exit $(( tests || check ))
