"""Random shapes and dtypes (hypothesis) against the reference: the int8 ops match reference.py
(integers exactly), or raise a ValueError/TypeError naming the argument."""
import pytest
import torch

import transfuse
from transfuse import reference

from helpers import cpu_backends

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@pytest.mark.parametrize("backend", cpu_backends())
@settings(max_examples=40, deadline=None)
@given(leading=st.lists(st.integers(0, 5), max_size=2), n=st.integers(1, 70),
       k=st.integers(1, 140), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       mode=st.sampled_from(["w8a8", "w8a16"]), with_bias=st.booleans())
def test_int8_ops_match_reference_on_random_inputs(backend, leading, n, k, dtype, mode, with_bias):
    x = (torch.randn(*leading, k) * 3).to(dtype)
    q, scale = transfuse.ops.quantize_per_token(x, backend=backend)
    expected_q, expected_scale = reference.quantize_per_token(x)
    assert torch.equal(q, expected_q) and torch.equal(scale, expected_scale)
    w, w_scale = reference.quantize_per_token(torch.randn(n, k))
    bias = torch.randn(n).to(dtype) if with_bias else None
    out = transfuse.ops.int8_linear(x, w, w_scale, bias, mode, backend=backend)
    expected = reference.int8_linear(x, w, w_scale, bias, mode)
    assert out.shape == (*leading, n) and out.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    scale = max(1.0, expected.double().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(out.double(), expected.double(), rtol=0, atol=tolerance * scale)


@settings(max_examples=30, deadline=None)
@given(k_x=st.integers(1, 9), k_w=st.integers(1, 9), n_scale=st.integers(1, 5),
       w_dtype=st.sampled_from([torch.int8, torch.float32]))
def test_int8_linear_rejects_mismatches_with_a_named_error(k_x, k_w, n_scale, w_dtype):
    x, w = torch.randn(3, k_x), torch.zeros(4, k_w, dtype=w_dtype)
    try:
        out = transfuse.ops.int8_linear(x, w, torch.ones(n_scale))
    except (ValueError, TypeError) as error:
        assert any(name in str(error) for name in ("x", "w_int8", "w_scale")), str(error)
    else:
        assert k_x == k_w and n_scale == 4 and w_dtype == torch.int8 and out.shape == (3, 4)
