#!/usr/bin/env bash
# One call on a GPU machine (torch with CUDA and nvcc already there, no package index):
# build the CUDA extension, run the C++ CUDA tests, `pytest -m gpu` and the GPU benchmarks.
# Logs and results go under $OUT (default benchmarks/results/gpu), to be committed with the
# device named.       usage: OUT=/some/dir bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"9.0a"} MAX_JOBS=${MAX_JOBS:-16}
status=0
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  TRANSFUSE_REQUIRE_EXTENSION=1 python -m pip install -v --no-build-isolation --no-deps --no-index -e . 2>&1 | tail -n 40
  python -m transfuse.cli info
} >"$OUT/build.log" 2>&1 || status=1
{
  cmake -S . -B build/cmake-gpu -G Ninja && cmake --build build/cmake-gpu && ctest --test-dir build/cmake-gpu --output-on-failure
} >"$OUT/ctest.log" 2>&1 || status=1
python -m pytest -m gpu -q -p no:cacheprovider tests >"$OUT/pytest-gpu.log" 2>&1 || status=1
python -m transfuse.cli bench --device cuda --out "$OUT" >"$OUT/bench.log" 2>&1 || status=1
tail -n 5 "$OUT"/*.log
exit $status
