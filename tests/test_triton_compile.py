"""Every Triton kernel variant that the GPU tests and benchmarks launch compiles for CUDA sm_80
and sm_90, on a machine without a GPU (tests/triton_variants.py finds the variants by running the
launchers on fake CUDA tensors and compiles them with triton.compile for each target; no launch).

The interpreter tests cannot catch what only the GPU compiler rejects (triton 3.6 refused the int8
tl.dot without out_dtype=tl.int32). By default a representative subset is compiled (every kernel,
every constexpr value, dtype and launch option that occurs, at least once); TRANSFUSE_COMPILE_ALL=1
(the GPU-versions CI leg) compiles every variant."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("triton_variants.py")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=1800)


def test_every_triton_variant_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton")
    args = ["--compile", "--targets", "80,90"]
    if os.environ.get("TRANSFUSE_COMPILE_ALL") == "1":
        args.append("--all")
    result = _run(*args)
    print(result.stdout[-4000:])
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert "compiled" in result.stdout


def test_the_gpu_tests_launch_a_bounded_number_of_variants():
    """The JIT compiles of `pytest -m gpu` must fit the lease (about 1.5 s each on the GPU
    machine): a new test parameter that adds many variants shows up here."""
    result = _run("--groups", "gpu-tests")
    assert result.returncode == 0, result.stderr[-5000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("distinct variants:"))
    count = int(line.split()[2])
    assert count <= MAX_GPU_TEST_VARIANTS, line


MAX_GPU_TEST_VARIANTS = 260  # 245 after issue 10 (was about 400)
