"""Random shapes, dtypes, layouts and options against the reference (hypothesis): the norm ops
either match reference.py or raise a ValueError/TypeError, never crash or return garbage."""
import pytest
import torch

import transfuse
from transfuse import reference

from helpers import cpu_backends

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@st.composite
def norm_inputs(draw):
    leading = draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))
    cols = draw(st.integers(1, 300))
    dtype = draw(st.sampled_from(DTYPES))
    weight_dtype = draw(st.sampled_from([dtype, torch.float32]))
    transposed = draw(st.booleans()) and len(leading) >= 1
    shape = (*leading, cols)
    x = torch.randn(shape[::-1] if transposed else shape).to(dtype)
    if transposed:  # a non-contiguous view of the same shape
        x = x.permute(*range(x.dim() - 1, -1, -1))
    residual = torch.randn(shape).to(dtype) if draw(st.booleans()) else None
    weight = torch.randn(cols).to(weight_dtype) if draw(st.booleans()) else None
    bias = torch.randn(cols).to(weight_dtype) if draw(st.booleans()) else None
    return x, residual, weight, bias, draw(st.sampled_from(reference.CASTING_MODES))


def compare(out, expected, dtype):
    outs = out if isinstance(out, tuple) else (out,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    for got, want in zip(outs, expecteds):
        assert got.shape == want.shape and got.dtype == want.dtype
        scale = max(1.0, want.double().abs().max().item()) if want.numel() else 1.0
        torch.testing.assert_close(got.double(), want.double(), rtol=0,
                                   atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("backend", cpu_backends())
@settings(max_examples=60, deadline=None)
@given(inputs=norm_inputs())
def test_norms_match_reference_on_random_inputs(backend, inputs):
    x, residual, weight, bias, casting_mode = inputs
    expected = reference.layer_norm(x, weight, bias, 1e-5, residual)
    compare(transfuse.ops.layer_norm(x, weight, bias, 1e-5, residual, backend=backend), expected,
            x.dtype)
    if weight is not None:
        expected = reference.rms_norm(x, weight, 1e-6, residual, 0.0, casting_mode)
        compare(transfuse.ops.rms_norm(x, weight, 1e-6, residual, casting_mode=casting_mode,
                                       backend=backend), expected, x.dtype)
