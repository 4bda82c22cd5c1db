"""transfuse.ops.attention: every backend against reference.py in float64, forward and backward."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import transfuse
from transfuse import reference

from helpers import assert_close_to_reference, backend_params, cpu_only_unless

pytestmark = pytest.mark.usefixtures("poison_allocations")

# (batch, heads_q, heads_kv, seq_q, seq_kv, head_dim): the lengths {1, 17, 128, 129, 1000},
# head dims {16, 64, 80, 128, 256} and GQA ratios 1, 2, 4 and all (MQA), Sq < Skv and Sq > Skv.
SHAPES = [
    (2, 4, 4, 17, 17, 64),
    (1, 4, 2, 1, 129, 80),
    (2, 4, 1, 128, 128, 16),
    (1, 8, 2, 129, 17, 128),
    (1, 2, 2, 17, 1000, 256),
    (1, 2, 1, 1000, 129, 32),
    (1, 2, 2, 1, 1, 96),
]
MASKS = ["none", "padding", "bool", "additive", "bias_grad"]
HALF_DTYPES = [torch.float16, torch.bfloat16]
HALF_SHAPES = [(2, 4, 2, 17, 129, 64), (1, 2, 1, 128, 128, 128), (1, 4, 4, 1, 300, 80)]

# On a GPU each distinct Triton build (kernel x constexprs x dtypes x tile) that the tests launch
# is a JIT compile of about 1.5 s, out of a short lease (tests/test_triton_compile.py bounds their
# number; tests/triton_variants.py mirrors the lists below). The gpu runs keep the parameters that
# compile every kernel's every flag value, head-dim block, tile and dtype at least once, and those
# that reuse these builds (causal, window and scale are runtime arguments: free); the others would
# compile builds that differ from those only in a combination of such values, and run on CPU
# (under the interpreter) only. Which builds what:
#   fp32, padding mask: head dims 64 (also mask kinds padding / bool, window, scale), 80 and 96
#     (BLOCK_D 128, EVEN_D false), 256, 32 (causal Sq > Skv: rows that see no key); softcap
#     (D 64); dropout + additive mask (D 32); additive bias with its gradient, rows all finfo.min
#     (D 32, the _lse_fix path)
#   bf16 D 128 and fp16 D 64 (padding mask); fp16 and bf16 additive bias with its gradient (D 32)
#   head dim 16, bf16 D 64 and the packed layout: tests/test_varlen_attention.py
GPU_SHAPES = [s for s in SHAPES if s[-1] in (32, 64, 80, 96, 256)]
GPU_MASKS = ["padding", "bool"]
GPU_HALF = [(HALF_SHAPES[1], torch.bfloat16), (HALF_SHAPES[0], torch.float16)]
GPU_HALF_BIAS_DTYPES = HALF_DTYPES


def shape_id(shape):
    b, hq, hkv, sq, skv, d = shape
    return f"b{b}h{hq}/{hkv}q{sq}k{skv}d{d}"


def make_mask(kind, batch, heads, seq_q, seq_kv, dtype, device):
    """A mask of `kind` with a few keys hidden from every row (never all of them)."""
    g = torch.Generator().manual_seed(3)
    if kind == "none":
        return None
    if kind == "padding":  # [B, 1, 1, Skv]: the last keys of sequence 0 are padding
        mask = torch.ones(batch, 1, 1, seq_kv, dtype=torch.bool)
        mask[0, ..., max(1, seq_kv * 2 // 3):] = False
    elif kind == "bool":  # full [B, Hq, Sq, Skv]
        mask = torch.rand(batch, heads, seq_q, seq_kv, generator=g) > 0.3
        mask[..., 0] = True
    elif kind == "additive":  # [B, 1, Sq, Skv], with finfo.min where hidden (as transformers)
        mask = torch.randn(batch, 1, seq_q, seq_kv, generator=g)
        mask[torch.rand(mask.shape, generator=g) < 0.2] = torch.finfo(dtype).min
        mask[..., 0] = 0.0
        mask = mask.to(dtype)
    else:  # "bias_grad": T5's position bias [1, H, Sq, Skv], learned
        mask = torch.randn(1, heads, seq_q, seq_kv, generator=g).to(dtype)
    return mask.to(device)


def make_inputs(shape, dtype, device, mask_kind="none"):
    batch, heads_q, heads_kv, seq_q, seq_kv, head_dim = shape
    q = torch.randn(batch, heads_q, seq_q, head_dim).to(dtype).to(device)
    k = torch.randn(batch, heads_kv, seq_kv, head_dim).to(dtype).to(device)
    v = torch.randn(batch, heads_kv, seq_kv, head_dim).to(dtype).to(device)
    return q, k, v, make_mask(mask_kind, batch, heads_q, seq_q, seq_kv, dtype, device)


def run(inputs, backend, **kwargs):
    """attention with autograd: (output, grads of q, k, v and a float mask that requires grad)."""
    mask_grad = kwargs.pop("mask_grad", False)
    leaves = [None if t is None else t.detach().clone().requires_grad_(i < 3 or mask_grad)
              for i, t in enumerate(inputs)]
    q, k, v, mask = leaves
    out = transfuse.ops.attention(q, k, v, mask=mask, backend=backend, **kwargs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * probe.to(out.device)).sum().backward()
    return out, [t.grad if t is not None and t.requires_grad else None for t in leaves]


def check_against_reference(inputs, backend, dtype, *, grads=True, **kwargs):
    """Kernel vs float64 reference (fp32: 1e-4 of the output's scale; fp16/bf16: the
    FlashAttention rule against the reference at the same precision)."""
    wide = [None if t is None else (t.double() if t.is_floating_point() else t) for t in inputs]
    if grads:
        out, grad = run(inputs, backend, **kwargs)
        exact, exact_grad = run(wide, "reference", **kwargs)
        plain, plain_grad = run(inputs, "reference", **kwargs)
    else:
        with torch.no_grad():
            out, exact, plain = (transfuse.ops.attention(*ts[:3], mask=ts[3], backend=b, **kwargs)
                                 for ts, b in ((inputs, backend), (wide, "reference"),
                                               (inputs, "reference")))
        grad = exact_grad = plain_grad = []
    fp32 = dtype == torch.float32
    assert out.dtype == dtype and out.shape == inputs[0].shape
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    assert_close_to_reference(out, exact, None if fp32 else plain,
                              atol=1e-4 * scale if fp32 else 2e-3 * scale, name="out")
    for name, g, e, p in zip(("dq", "dk", "dv", "dmask"), grad, exact_grad, plain_grad):
        if e is None:
            assert g is None, f"{name}: unexpected gradient"
            continue
        assert g is not None and g.shape == e.shape and g.dtype == p.dtype, name
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        assert_close_to_reference(g, e, None if fp32 else p,
                                  atol=2e-4 * scale if fp32 else 1e-2 * scale, name=name)


# ---------------------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,device", backend_params())
def test_shapes_with_padding(backend, device, shape, causal):
    cpu_only_unless(shape in GPU_SHAPES, device)
    inputs = make_inputs(shape, torch.float32, device, "padding")
    check_against_reference(inputs, backend, torch.float32, causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("backend,device", backend_params())
def test_mask_kinds(backend, device, mask_kind, causal):
    cpu_only_unless(mask_kind in GPU_MASKS, device)
    inputs = make_inputs((2, 4, 2, 33, 70, 64), torch.float32, device, mask_kind)
    check_against_reference(inputs, backend, torch.float32, causal=causal,
                            mask_grad=mask_kind == "bias_grad")


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("shape", HALF_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,device", backend_params())
def test_half_precision(backend, device, shape, dtype):
    cpu_only_unless((shape, dtype) in GPU_HALF, device)
    inputs = make_inputs(shape, dtype, device, "padding")
    check_against_reference(inputs, backend, dtype, causal=True)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_half_precision_bias_grad(backend, device, dtype):
    cpu_only_unless(dtype in GPU_HALF_BIAS_DTYPES, device)
    inputs = make_inputs((1, 2, 2, 40, 40, 32), dtype, device, "bias_grad")
    check_against_reference(inputs, backend, dtype, mask_grad=True)


# The CPU forward's bf16 products (csrc/cpu/attention_bf16.cpp, on CPUs with AVX512_BF16; the fp32
# tiles elsewhere): head dims odd (33), of one pair chunk (16), of 2 and 4 vector blocks (96, 256);
# key tiles with an odd count (129 = 128 + 1, 7); query tiles past whole 6-row blocks (71, 40, 5
# rows, at least the 4 below which dot products run); GQA; causal, window, softcap, additive mask.
BF16_PRODUCT_CASES = [((1, 4, 2, 71, 129, 33), "padding", dict(causal=True)),
                      ((2, 2, 2, 5, 7, 16), "none", {}),
                      ((1, 2, 1, 40, 200, 96), "none", dict(window=9, softcap=2.0)),
                      ((1, 2, 2, 20, 150, 256), "additive", {})]


@pytest.mark.parametrize("shape,mask_kind,options", BF16_PRODUCT_CASES,
                         ids=[shape_id(case[0]) for case in BF16_PRODUCT_CASES])
def test_cpu_bf16_products(shape, mask_kind, options):
    inputs = make_inputs(shape, torch.bfloat16, "cpu", mask_kind)
    check_against_reference(inputs, "cpu", torch.bfloat16, **options)


@pytest.mark.parametrize("option", [dict(window=9), dict(window=9, causal=True),
                                    dict(softcap=2.0), dict(softcap=2.0, causal=True),
                                    dict(scale=0.3), dict(scale=1.0)],
                         ids=["window", "window-causal", "softcap", "softcap-causal", "scale0.3",
                              "scale1"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_window_softcap_scale(backend, device, option):
    inputs = make_inputs((1, 4, 2, 37, 53, 64), torch.float32, device, "padding")
    check_against_reference(inputs, backend, torch.float32, **option)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_dropout_matches_reference_with_the_same_seed(backend, device, causal):
    inputs = make_inputs((2, 2, 1, 29, 45, 32), torch.float32, device, "additive")
    check_against_reference(inputs, backend, torch.float32, causal=causal, dropout_p=0.25,
                            dropout_seed=1234)


def test_dropout_draws_a_fresh_mask_per_call_and_keeps_the_expected_fraction():
    q, k, v, _ = make_inputs((1, 2, 2, 64, 64, 16), torch.float32, "cpu")
    torch.manual_seed(0)
    a = transfuse.ops.attention(q, k, v, dropout_p=0.5, backend="reference")
    b = transfuse.ops.attention(q, k, v, dropout_p=0.5, backend="reference")
    assert not torch.equal(a, b)
    bits = reference.dropout_keep(77, 4, 8, 128, 256)
    kept = (bits >= reference.dropout_threshold(0.3)).double().mean().item()
    assert abs(kept - 0.7) < 0.01


@pytest.mark.parametrize("backend,device", backend_params())
def test_rows_without_visible_keys_give_zeros(backend, device):
    # on a GPU its D 16 call would compile a build for itself; rows that see no key run there in
    # test_shapes_with_padding's causal Sq > Skv shape
    cpu_only_unless(False, device)
    q, k, v, _ = make_inputs((2, 2, 2, 9, 12, 32), torch.float32, device)
    mask = torch.ones(2, 1, 9, 12, dtype=torch.bool, device=device)
    mask[0, :, 3] = False       # one query row sees nothing
    mask[1] = False             # a whole sequence sees nothing
    inputs = (q, k, v, mask)
    check_against_reference(inputs, backend, torch.float32)
    out = transfuse.ops.attention(q, k, v, mask=mask, backend=backend)
    assert torch.equal(out[0, :, 3], torch.zeros_like(out[0, :, 3]))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    # causal with a window that leaves the first rows of a long-key call nothing
    check_against_reference(make_inputs((1, 2, 2, 5, 40, 16), torch.float32, device), backend,
                            torch.float32, causal=True, window=3)


@pytest.mark.parametrize("backend,device", backend_params())
def test_rows_whose_keys_all_carry_finfo_min_match_fp32_eager(backend, device):
    """Such rows (left padding under an additive mask) get uniform weights in fp32, as in eager;
    their lse = m + log(l) rounds to m, which the backward must not take for the normalizer."""
    q, k, v, bias = make_inputs((2, 2, 1, 9, 300, 32), torch.float32, device, "bias_grad")
    bias = bias.expand(2, 2, 9, 300).clone()
    bias[0, :, 3] = torch.finfo(torch.float32).min
    bias[1] = torch.finfo(torch.float32).min
    inputs = (q, k, v, bias)
    for causal in (False, True):
        out, grads = run(inputs, backend, causal=causal, mask_grad=True)
        plain, plain_grads = run(inputs, "reference", causal=causal, mask_grad=True)
        if not causal:
            torch.testing.assert_close(out[1], v[1].mean(1, keepdim=True).expand(2, 9, 32))
        for name, g, e in zip(("out", "dq", "dk", "dv", "dmask"), (out, *grads),
                              (plain, *plain_grads)):
            scale = max(1.0, e.abs().max().item())
            assert_close_to_reference(g, e, None, atol=2e-4 * scale, name=name)


@pytest.mark.parametrize("backend,device", backend_params())
def test_strided_inputs_in_the_transformers_layout(backend, device):
    """q/k/v as transformers hands them over: [B, S, H, D] transposed to [B, H, S, D]."""
    # on a GPU it would compile an fp32 no-mask D 64 build for itself; strides are runtime values
    cpu_only_unless(False, device)
    batch, seq, heads, dim = 2, 21, 4, 64
    q, k, v = (torch.randn(batch, seq, heads, dim, device=device).transpose(1, 2)
               for _ in range(3))
    assert not q.is_contiguous()
    check_against_reference((q, k, v, None), backend, torch.float32, causal=True)
    out = transfuse.ops.attention(q, k, v, causal=True, backend=backend)
    assert out.transpose(1, 2).is_contiguous()  # so transformers' transpose back is free
    # a last dimension that is not contiguous is copied
    check_against_reference((q.transpose(2, 3).contiguous().transpose(2, 3), k, v, None),
                            backend, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_inputs(backend, device):
    for shape in [(0, 2, 2, 5, 7, 16), (1, 2, 2, 0, 7, 16)]:
        q, k, v, _ = make_inputs(shape, torch.float32, device)
        out = transfuse.ops.attention(q, k, v, backend=backend)
        assert out.shape == q.shape


def test_head_dim_above_the_kernels_runs_on_the_reference_with_a_warning():
    q, k, v, _ = make_inputs((1, 1, 1, 3, 4, 320), torch.float32, "cpu")
    with pytest.warns(RuntimeWarning, match="head_dim up to 256"):
        out = transfuse.ops.attention(q, k, v, backend="cpu")
    torch.testing.assert_close(out, reference.attention(q, k, v))


def test_reference_matches_sdpa():
    q, k, v, mask = make_inputs((2, 4, 2, 7, 11, 16), torch.float64, "cpu", "bool")
    for causal in (False, True):
        expected = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask & torch.ones(7, 11, dtype=torch.bool).tril(4) if causal
            else mask, enable_gqa=True)
        torch.testing.assert_close(reference.attention(q, k, v, mask, causal), expected)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    q, k, v, bias = make_inputs((1, 4, 2, 19, 23, 32), torch.float32, "cpu", "bias_grad")
    def f(q, k, v, bias):
        return transfuse.ops.attention(q, k, v, mask=bias, causal=True).sin().sum()
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]
    expected = torch.autograd.grad(f(*leaves), leaves)
    actual = torch.autograd.grad(compiled(*leaves), leaves)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_memory_does_not_grow_with_seq_q_times_seq_kv():
    """B=1, H=8, S=8192, D=64, fp32 on CPU: the scores alone would be 2 GiB; the kernel must
    stay under 64 MB above the inputs (peak RSS, in a fresh process)."""
    script = textwrap.dedent("""
        import resource, torch, transfuse
        q, k, v = (torch.randn(1, 8, 8192, 64) for _ in range(3))
        transfuse.ops.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend="cpu")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = transfuse.ops.attention(q, k, v, causal=True, backend="cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert torch.isfinite(out).all()
        print((after - before) / 1024)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=True)
    extra_mb = float(result.stdout.strip().splitlines()[-1])
    assert extra_mb < 64, f"attention used {extra_mb:.0f} MB above its inputs"


# ------------------------------------------------------------------------------------ bad input

def _bad(**changes):
    q, k, v, _ = make_inputs((2, 4, 2, 5, 6, 16), torch.float32, "cpu")
    args = dict(q=q, k=k, v=v)
    args.update(changes)
    return args


def test_a_call_with_default_arguments_equals_the_general_path():
    """attention(q, k, v) with the other arguments at their defaults takes a short path to the
    kernel when no graph is recorded (per-call cost); it gives what the general path gives, and
    leaves inputs it does not take (a last dimension with stride != 1) to it."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 3, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g),
               torch.randn(2, 2, 9, 16, generator=g))
    with torch.inference_mode():
        for causal in (False, True):
            short = transfuse.ops.attention(q, k, v, causal=causal)
            general = transfuse.ops.attention(q, k, v, causal=causal, scale=16 ** -0.5)
            assert torch.equal(short, general)
        strided = torch.randn(2, 4, 16, 3, generator=g).transpose(-1, -2)
        torch.testing.assert_close(transfuse.ops.attention(strided, k, v),
                                   reference.attention(strided, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args,error,match", [
    (lambda: _bad(k=torch.randn(2, 3, 6, 16), v=torch.randn(2, 3, 6, 16)), ValueError,
     "k's number of heads"),
    (lambda: _bad(k=torch.randn(2, 2, 6, 32), v=torch.randn(2, 2, 6, 32)), ValueError,
     "k must have q's head_dim"),
    (lambda: _bad(v=torch.randn(2, 2, 7, 16)), ValueError, "v must have k's shape"),
    (lambda: _bad(k=torch.randn(3, 2, 6, 16)), ValueError, "k must have q's batch"),
    (lambda: _bad(q=torch.randn(4, 5, 16)), ValueError, "q must be 4-D"),
    (lambda: _bad(v=torch.randn(2, 2, 6, 16).half()), TypeError, "v must have q's dtype"),
    (lambda: _bad(q=torch.ones(2, 4, 5, 16, dtype=torch.int32)), TypeError, "q must be float"),
    (lambda: _bad(k="k"), TypeError, "k must be a torch.Tensor"),
    (lambda: _bad(mask=torch.ones(2, 4, 5, 7, dtype=torch.bool)), ValueError,
     "mask of shape .* does not broadcast"),
    (lambda: _bad(mask=torch.ones(3, 1, 1, 6, dtype=torch.bool)), ValueError, "mask of shape"),
    (lambda: _bad(mask=torch.ones(2, 1, 1, 6, dtype=torch.int64)), TypeError, "mask must be bool"),
    (lambda: _bad(causal=1), TypeError, "causal must be a bool"),
    (lambda: _bad(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (lambda: _bad(window=-2), ValueError, "window must be"),
    (lambda: _bad(window=2.5), TypeError, "window must be an int"),
    (lambda: _bad(softcap=-1.0), ValueError, "softcap must be"),
    (lambda: _bad(scale="x"), TypeError, "scale must be a number"),
    (lambda: _bad(backend="nope"), ValueError, "backend must be one of"),
    # scale finite and > 0; softcap finite and >= 0 (0 = off)
    (lambda: _bad(scale=float("inf")), ValueError, "scale must be > 0.0 and finite"),
    (lambda: _bad(scale=float("nan")), ValueError, "scale must be"),
    (lambda: _bad(scale=0.0), ValueError, "scale must be"),
    (lambda: _bad(scale=-0.25), ValueError, "scale must be"),
    (lambda: _bad(scale=True), TypeError, "scale must be a number"),
    (lambda: _bad(softcap=float("inf")), ValueError, "softcap must be >= 0.0 and finite"),
    (lambda: _bad(softcap=float("nan")), ValueError, "softcap must be"),
    (lambda: _bad(softcap=None), TypeError, "softcap must be a number"),
    (lambda: _bad(backend=3), TypeError, "backend must be a str or None"),
    (lambda: _bad(dropout_p=0.1, dropout_seed="abc"), TypeError, "dropout_seed must be an int"),
    (lambda: _bad(dropout_seed=1.5), TypeError, "dropout_seed must be an int"),
])
def test_bad_input_names_the_argument(args, error, match):
    kwargs = args()
    with pytest.raises(error, match=match):
        transfuse.ops.attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), **kwargs)
