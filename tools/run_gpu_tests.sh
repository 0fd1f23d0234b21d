#!/usr/bin/env bash
# Every gpu-marked test on this (GPU) machine; fails if any fails or skips; writes docs/gpu-tests.json
# (or --out FILE). See tools/run_gpu_tests.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" tools/run_gpu_tests.py "$@"
