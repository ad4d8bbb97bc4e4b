#!/usr/bin/env bash
# The GPU check, one command for the first machine with a GPU (under 8 minutes on one):
# the CUDA-only tests, then the measurements into results/gpu.md and results/gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p results
"$PY" -m pytest -q -rs tests/test_encoder_device.py 2>&1 | tee results/gpu-tests.txt
tests=${PIPESTATUS[0]}
"$PY" -m benchmarks.gpu_check "$@"
check=$?
echo "tests exit $tests, check exit $check"
exit $(( tests || check ))
