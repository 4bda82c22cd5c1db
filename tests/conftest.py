"""Test setup: Triton kernels run under the interpreter on CPU tensors when there is no GPU, and
tests marked `gpu` are skipped without one."""
import os

import torch

if not torch.cuda.is_available():
    # must be set before triton.jit decorates the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poison_allocations():
    """torch.empty (in Python and in C++ bindings) fills new memory with NaN while on."""
    import torch.utils.deterministic as deterministic
    previous = deterministic.fill_uninitialized_memory, torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    yield
    deterministic.fill_uninitialized_memory = previous[0]
    torch.use_deterministic_algorithms(previous[1])


@pytest.fixture
def no_pause_between_sides(monkeypatch):
    """transfuse bench's model rows sleep before each side's turn (bench.SETTLE_S) so that thread
    pools go idle before it is timed; tests of what the rows hold do without it (on 2 cores a
    minute of sleep per model command)."""
    from transfuse import bench
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
