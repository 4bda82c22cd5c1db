"""Every Triton kernel variant that the GPU tests and benchmarks launch compiles for CUDA sm_80
and sm_90, on a machine without a GPU (tests/triton_variants.py finds the variants by running the
launchers on fake CUDA tensors and compiles them with triton.compile for each target; no launch).

The interpreter tests cannot catch what only the GPU compiler rejects (triton 3.6 refused the int8
tl.dot without out_dtype=tl.int32). How much is compiled (TRANSFUSE_COMPILE): "kernels" (default,
both CI legs, the newest triton and the GPU machine's 3.6: one variant of each kernel, about a
minute on 2 cores), "flags" (every kernel with every constexpr value, dtype and launch option
that occurs: 83 variants, about 5 minutes), "all" (every variant, about 11 minutes), by hand or
as `python tests/triton_variants.py --compile [--all]`."""
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
    scope = os.environ.get("TRANSFUSE_COMPILE", "kernels")
    flags = {"kernels": ["--per-kernel"], "flags": [], "all": ["--all"]}
    if scope not in flags:
        raise ValueError(f"TRANSFUSE_COMPILE must be one of {sorted(flags)}, got {scope!r}")
    args = ["--compile", "--targets", "80,90", *flags[scope]]
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


# 245 before (norm 85, int8 48, attention 112: 33 forward, 35 dQ, 33 dK/dV, 11 delta; the varlen
# tests not counted), 175 after (attention 42 with varlen: causal / window as runtime arguments,
# one delta build per dtype, the attention gpu runs limited to the parameters that build
# something new, see tests/test_attention.py)
# 400 before issue 10; 245 after the norm and int8 cuts, 175 after attention's; 187 with
# silu_mul (6: a dtype and direction each; gelu_mul since shares them, its activation a run-time
# argument) and rotary (6: two head-dim buckets, three dtypes),
# about 20 s more of JIT compiles on the GPU machine
MAX_GPU_TEST_VARIANTS = 190
