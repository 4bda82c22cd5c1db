"""transfuse.ops.rotary: every backend against reference.py in float64 and transformers'
apply_rotary_pos_emb, forward and backward."""
import pytest
import torch

import transfuse
from transfuse import reference

from helpers import assert_close_to_reference, backend_params, cpu_backends, cpu_only_unless

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, q heads, k heads, seq, head_dim): decoding (one position), GQA, MQA, odd lengths
SHAPES = [(1, 9, 3, 1, 64), (2, 4, 4, 17, 16), (3, 8, 1, 5, 128), (1, 2, 2, 129, 256),
          (2, 3, 1, 7, 2), (1, 5, 5, 3, 80), (0, 2, 2, 3, 8), (2, 2, 1, 0, 8)]
# the shapes the gpu runs keep: two head-dim buckets of the Triton kernel, 3 builds each
# (tests/triton_variants.py counts them)
GPU_SHAPES = [SHAPES[0], SHAPES[2]]

pytestmark = pytest.mark.usefixtures("poison_allocations")


def angles(batch, seq, head_dim, dtype, device, *, per_sequence):
    """cos and sin as transformers' rotary embeddings build them (halves repeated), for positions
    that differ per sequence (per_sequence: [batch, seq, D]) or are shared ([1, seq, D])."""
    rows = batch if per_sequence else 1
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    positions = torch.randint(0, 4096, (rows, seq, 1)).double()
    freqs = torch.cat([positions * inv_freq] * 2, dim=-1)
    return freqs.cos().to(dtype).to(device), freqs.sin().to(dtype).to(device)


def heads(batch, count, seq, head_dim, dtype, device):
    """[batch, count, seq, head_dim] as a projection's output is viewed: the transpose of a
    contiguous [batch, seq, count, head_dim]."""
    return torch.randn(batch, seq, count, head_dim).to(dtype).to(device).transpose(1, 2)


def run(q, k, cos, sin, backend):
    """rotary with autograd on copies: (q_out, k_out, dq, dk) for random projections."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k)]
    q_out, k_out = transfuse.ops.rotary(*leaves, cos, sin, backend=backend)
    torch.manual_seed(1)
    loss = sum((t.double() * torch.randn(t.shape, dtype=torch.float64).to(t.device)).sum()
               for t in (q_out, k_out))
    loss.backward()
    return [q_out, k_out] + [t.grad for t in leaves]


def check(q, k, cos, sin, backend):
    dtype = q.dtype
    outs = run(q, k, cos, sin, backend)
    exact = run(q.double(), k.double(), cos.double(), sin.double(), "reference")
    plain = run(q, k, cos, sin, "reference")
    fp32 = dtype == torch.float32
    for name, out, ref, eager, like in zip(["q_out", "k_out", "dq", "dk"], outs, exact, plain,
                                           [q, k, q, k]):
        assert out.dtype == dtype and out.shape == like.shape, name
        assert out.is_contiguous() or name in ("dq", "dk"), name
        if out.numel() == 0:
            continue
        scale = max(1.0, ref.abs().max().item())
        assert_close_to_reference(out, ref, None if fp32 else eager,
                                  atol=1e-6 * scale if fp32 else 1e-3 * scale, name=name)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, device, shape, dtype):
    cpu_only_unless(shape in GPU_SHAPES, device)
    batch, q_heads, k_heads, seq, head_dim = shape
    q = heads(batch, q_heads, seq, head_dim, dtype, device)
    k = heads(batch, k_heads, seq, head_dim, dtype, device)
    for per_sequence in (False, True):
        check(q, k, *angles(batch, seq, head_dim, dtype, device, per_sequence=per_sequence),
              backend)


@pytest.mark.parametrize("backend,device", backend_params())
def test_layouts_and_general_angles(backend, device):
    # contiguous q, a k sliced from a wider tensor, 2-D cos / sin, and angles whose halves differ
    # (the backward is the transpose, not the rotation by -angle, there)
    q = torch.randn(2, 3, 5, 64, device=device)
    k = torch.randn(2, 5, 1, 96, device=device).transpose(1, 2)[..., 16:80]
    cos, sin = torch.randn(5, 64, device=device), torch.randn(5, 64, device=device)
    check(q, k, cos, sin, backend)
    check(q, k, cos.unsqueeze(0).expand(2, 5, 64), sin.unsqueeze(0), backend)


@pytest.mark.parametrize("backend", ["reference"] + [b for b in cpu_backends() if b == "cpu"])
def test_float32_is_transformers_bit_for_bit(backend):
    """In float32 the reference and the C++ kernel (no fused multiply-add) compute transformers'
    apply_rotary_pos_emb bit for bit."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    for head_dim in (16, 64, 80):
        q = heads(2, 6, 7, head_dim, torch.float32, "cpu")
        k = heads(2, 2, 7, head_dim, torch.float32, "cpu")
        cos, sin = angles(2, 7, head_dim, torch.float32, "cpu", per_sequence=True)
        for got, expected in zip(transfuse.ops.rotary(q, k, cos, sin, backend=backend),
                                 apply_rotary_pos_emb(q, k, cos, sin)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_angle_gradients_run_the_reference():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    cos, sin = torch.randn(1, 3, 8, requires_grad=True), torch.randn(1, 3, 8)
    with pytest.warns(RuntimeWarning, match="no gradient"):
        q_out, k_out = transfuse.ops.rotary(q, k, cos, sin)
    (q_out.sum() + k_out.sum()).backward()
    expected = torch.autograd.grad(sum(t.sum() for t in reference.rotary(q, k, cos, sin)), cos)[0]
    torch.testing.assert_close(cos.grad, expected)


@pytest.mark.parametrize("backend", ["auto", "reference"] + cpu_backends())
def test_bad_input_names_the_argument(backend):
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    call = transfuse.ops.rotary
    cases = [
        (lambda: call(q.int(), k, cos, sin, backend=backend), TypeError, "q"),
        (lambda: call(q.numpy(), k, cos, sin, backend=backend), TypeError, "q"),
        (lambda: call(q, k.half(), cos, sin, backend=backend), TypeError, "k"),
        (lambda: call(q, k, cos.half(), sin, backend=backend), TypeError, "cos"),
        (lambda: call(q, k, cos, [0.0], backend=backend), TypeError, "sin"),
        (lambda: call(q[0], k, cos, sin, backend=backend), ValueError, "q"),
        (lambda: call(q, torch.randn(1, 2, 4, 8), cos, sin, backend=backend), ValueError, "k"),
        (lambda: call(q, k, torch.randn(2, 3, 8), sin, backend=backend), ValueError, "cos"),
        (lambda: call(q, k, cos, torch.randn(1, 3, 6), backend=backend), ValueError, "sin"),
        (lambda: call(q[..., :7], k[..., :7], cos[..., :7], sin[..., :7], backend=backend),
         ValueError, "head_dim"),
        (lambda: call(q, k, cos, torch.randn(1, 3, 8, device="meta"), backend=backend),
         ValueError, "sin"),
        (lambda: call(q, k, cos, sin, backend=3), TypeError, "backend"),
    ]
    if backend != "reference":
        cases.append((lambda: call(q.double(), k.double(), cos.double(), sin.double(),
                                   backend=backend), TypeError, "q"))
    for fn, error, name in cases:
        with pytest.raises(error, match=rf"\b{name}\b"):
            fn()


def test_torch_compile_fullgraph():
    """Traced without a graph break, the same outputs and gradients as eager mode."""
    cos, sin = angles(2, 5, 16, torch.float32, "cpu", per_sequence=True)

    def block(q, k):
        q_out, k_out = transfuse.ops.rotary(q, k, cos, sin)
        return q_out * 2, k_out + 1

    def outputs_and_grads(fn):
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(2, 4, 5, 16, generator=generator).requires_grad_(True)
        k = torch.randn(2, 2, 5, 16, generator=generator).requires_grad_(True)
        q_out, k_out = fn(q, k)
        grads = torch.autograd.grad((q_out * q_out).sum() + (k_out * k_out).sum(), [q, k])
        return [q_out.detach(), k_out.detach(), *grads]

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for got, expected in zip(outputs_and_grads(compiled), outputs_and_grads(block)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
