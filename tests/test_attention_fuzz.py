"""Random shapes, dtypes, masks and options (hypothesis) against the reference: attention matches
reference.py, or raises a ValueError/TypeError naming the argument; never a crash or garbage."""
import pytest
import torch

import transfuse
from transfuse import reference

from helpers import cpu_backends

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@st.composite
def attention_inputs(draw):
    batch, group = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    heads_kv = draw(st.integers(1, 2))
    seq_q, seq_kv = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    head_dim = draw(st.sampled_from([1, 8, 16, 24, 64, 80, 96, 128]))
    dtype = draw(st.sampled_from(list(TOLERANCE)))
    heads_q = heads_kv * group
    q = torch.randn(batch, heads_q, seq_q, head_dim).to(dtype)
    k, v = (torch.randn(batch, heads_kv, seq_kv, head_dim).to(dtype) for _ in range(2))
    mask_kind = draw(st.sampled_from(["none", "bool", "additive", "padding"]))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(batch, 1, seq_q, seq_kv) > 0.3
    elif mask_kind == "additive":
        mask = torch.randn(1, heads_q, seq_q, seq_kv).to(dtype)
    elif mask_kind == "padding":
        mask = torch.ones(batch, 1, 1, seq_kv, dtype=torch.bool)
        mask[0, ..., draw(st.integers(0, seq_kv - 1)):] = False
    options = dict(causal=draw(st.booleans()), window=draw(st.sampled_from([0, 0, 5])),
                   softcap=draw(st.sampled_from([0.0, 0.0, 3.0])))
    return q, k, v, mask, options


@pytest.mark.parametrize("backend", cpu_backends())
@settings(max_examples=40, deadline=None)
@given(inputs=attention_inputs())
def test_attention_matches_reference_on_random_inputs(backend, inputs):
    q, k, v, mask, options = inputs
    out = transfuse.ops.attention(q, k, v, mask=mask, backend=backend, **options)
    wide = [t if t is None or not t.is_floating_point() else t.double() for t in (q, k, v, mask)]
    expected = reference.attention(*wide[:3], wide[3], **options)
    assert out.shape == q.shape and out.dtype == q.dtype
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=TOLERANCE[q.dtype] * scale)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_attention_rejects_mismatched_inputs_with_a_named_error(data):
    q = torch.randn(2, 4, 5, 16)
    k = torch.randn(data.draw(st.sampled_from([2, 3])), data.draw(st.sampled_from([1, 2, 3])),
                    6, data.draw(st.sampled_from([16, 8])))
    mask_shape = data.draw(st.sampled_from([(2, 1, 1, 6), (2, 1, 1, 7), (5, 6), (3, 4, 5, 6)]))
    mask = torch.zeros(mask_shape)
    try:
        out = transfuse.ops.attention(q, k, k.clone(), mask=mask)
    except (ValueError, TypeError) as error:
        assert any(name in str(error) for name in ("k", "mask", "v", "q")), str(error)
    else:
        assert k.shape[0] == 2 and q.shape[1] % k.shape[1] == 0 and k.shape[3] == 16
        assert torch.isfinite(out).all()
