"""pytest-benchmark view of the CPU norm figures (the same cases `transfuse bench` times):

    pytest benchmarks/test_norm_cpu_benchmark.py \
        --benchmark-json benchmarks/results/norm-cpu-pytest-benchmark.json

Each benchmark's extra_info holds the floor: bytes moved / measured copy bandwidth.
"""
import pytest
import torch

from transfuse.bench import (copy_bandwidth_gbps, dispatch_cases, keep_freed_memory_mapped,
                             norm_cases)

DEVICE = torch.device("cpu")
ALLOCATOR = keep_freed_memory_mapped()
CASES = norm_cases(DEVICE, torch.float32, 4096, [1024]) + dispatch_cases(DEVICE)
PARAMS = [pytest.param(case, label, id=f"{case.op}-{case.shape}-{label}")
          for case in CASES for label in case.impls]


@pytest.fixture(scope="session")
def bandwidth_gbps():
    return copy_bandwidth_gbps(DEVICE, repeat=20)


@pytest.mark.parametrize("case,label", PARAMS)
def test_norm(benchmark, bandwidth_gbps, case, label):
    benchmark.group = f"{case.op} {case.shape} {case.dtype}"
    benchmark.extra_info.update(bytes=case.bytes, copy_bandwidth_GBps=bandwidth_gbps,
                                allocator=ALLOCATOR,
                                floor_ms=case.bytes / bandwidth_gbps / 1e6)
    benchmark(case.impls[label])
