#!/usr/bin/env bash
# One call on a lent GPU (no network, nothing installable): build for the present GPU, C++ CUDA
# tests, kernels checked against PyTorch then timed, then the `gpu` tests in stages under one
# deadline. Results as they come under $OUT (default benchmarks/results/gpu-<device>).
#   bash benchmarks/gpu_quick.sh              # on the GPU machine, under 9 minutes
#   bash benchmarks/gpu_quick.sh --dry-run    # on a CPU: tiny shapes, Triton interpreter, seconds
# See benchmarks/README.md for the stages, their estimated times and the files written.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -u benchmarks/gpu_quick.py "$@"
