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
