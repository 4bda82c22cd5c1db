"""The CUDA attention forward paths that tests/test_attention.py's small shapes do not reach, on a
GPU (backend="cuda", forward only, so no Triton kernel is compiled): the unmasked tensor-core
kernel, GQA decoding and its split-KV kernel (one query row over long keys), and the sliding
window / softcap options on tensor cores. Each against the float64 reference with the
FlashAttention rule (twice plain PyTorch's error at the same precision, plus a small atol)."""
import pytest
import torch

import transfuse
from transfuse import reference

from helpers import assert_close_to_reference

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poison_allocations")]

HALF = [torch.bfloat16, torch.float16]


def check(shape, dtype, **kwargs):
    batch, heads_q, heads_kv, seq_q, seq_kv, head_dim = shape
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    q = torch.randn(batch, heads_q, seq_q, head_dim, device="cuda", generator=g).to(dtype)
    k = torch.randn(batch, heads_kv, seq_kv, head_dim, device="cuda", generator=g).to(dtype)
    v = torch.randn(batch, heads_kv, seq_kv, head_dim, device="cuda", generator=g).to(dtype)
    with torch.no_grad():
        out = transfuse.ops.attention(q, k, v, backend="cuda", **kwargs)
        exact = reference.attention(q.double(), k.double(), v.double(), **kwargs)
        plain = reference.attention(q, k, v, **kwargs)
    scale = max(1.0, exact.abs().max().item())
    assert_close_to_reference(out, exact, plain, atol=2e-3 * scale, name=f"out {shape}")


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 256, 256, 128), (1, 4, 4, 300, 517, 64),
                                   (1, 4, 2, 129, 129, 96)],
                         ids=lambda s: "b{}h{}/{}q{}k{}d{}".format(*s))
def test_unmasked_tensor_core_forward(shape, dtype, causal):
    check(shape, dtype, causal=causal)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("seq_kv", [1000, 4096, 32768])
def test_gqa_decode_and_split_kv(seq_kv, dtype):
    # one query row, Hq=32 over Hkv=8 (GQA 4): the decode kernel, split over keys when long
    check((2, 32, 8, 1, seq_kv, 128), dtype, causal=True)
    check((1, 32, 8, 4, seq_kv, 128), dtype, causal=True)   # a few rows (speculative decoding)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("option", [dict(window=64), dict(window=64, causal=True),
                                    dict(softcap=30.0), dict(softcap=30.0, causal=True)],
                         ids=["window", "window-causal", "softcap", "softcap-causal"])
def test_window_and_softcap_on_tensor_cores(option, dtype):
    check((1, 8, 4, 333, 333, 128), dtype, **option)
    check((1, 8, 2, 1, 2048, 64), dtype, **option)          # decoding with the options
