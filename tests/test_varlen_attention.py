"""transfuse.ops.varlen_attention (packed sequences, FlashAttention's varlen layout): every backend
against reference.py in float64, forward and backward, and against the padded op per sequence."""
import pytest
import torch

import transfuse
from transfuse import reference

from helpers import assert_close_to_reference, backend_params, cpu_only_unless

pytestmark = pytest.mark.usefixtures("poison_allocations")

# (query lengths, key lengths or None for the same, heads_q, heads_kv, head_dim): the issue's
# lengths {1, 2, 17, 128, 129, 1000} mixed in one batch, an empty sequence, Sq != Skv per
# sequence, GQA and MQA, head dims 16 to 256.
CASES = [
    ([1, 2, 17, 128, 129, 0], None, 4, 2, 64),
    ([17, 1000, 1], None, 2, 1, 32),
    ([5, 129, 17, 1], [7, 140, 17, 30], 4, 4, 128),
    ([3, 33], None, 2, 2, 256),
    ([9, 20], None, 4, 1, 16),
    ([8, 30, 2], [1, 31, 2], 2, 2, 80),
]
HALF_DTYPES = [torch.float16, torch.bfloat16]

# On a GPU each distinct Triton build is a JIT compile of about 1.5 s out of a short lease (see
# tests/test_attention.py, whose gpu runs build every flag value of the padded layout; this file's
# gpu runs build the packed layout's, mirrored in tests/triton_variants.py): fp32 with head dim 16
# (the only BLOCK_D 16 build of the gpu runs) and bf16 D 64, each causal or not (a runtime
# argument). The other parameter sets differ from those builds in a combination of values the
# padded gpu runs build (softcap, dropout, masks, head dims) and run on CPU only.
GPU_CASES = [CASES[4]]
GPU_HALF_DTYPES = [torch.bfloat16]


def case_id(case):
    lengths_q, lengths_k, heads_q, heads_kv, dim = case
    k = "" if lengths_k is None else "k" + "-".join(map(str, lengths_k))
    return f"q{'-'.join(map(str, lengths_q))}{k}h{heads_q}/{heads_kv}d{dim}"


def offsets(lengths, device):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(device)


def make_inputs(case, dtype, device, mask_kind="none"):
    lengths_q, lengths_k, heads_q, heads_kv, dim = case
    lengths_k = lengths_q if lengths_k is None else lengths_k
    g = torch.Generator().manual_seed(5)
    q = torch.randn(sum(lengths_q), heads_q, dim, generator=g).to(dtype).to(device)
    k = torch.randn(sum(lengths_k), heads_kv, dim, generator=g).to(dtype).to(device)
    v = torch.randn(sum(lengths_k), heads_kv, dim, generator=g).to(dtype).to(device)
    batch, max_q, max_k = len(lengths_q), max(lengths_q), max(lengths_k)
    mask = None
    if mask_kind == "bool":  # [B, 1, 1, max_k]: the last keys of each sequence hidden
        mask = torch.ones(batch, 1, 1, max_k, dtype=torch.bool)
        for b, n in enumerate(lengths_k):
            mask[b, ..., max(1, n * 2 // 3):] = False
    elif mask_kind == "bias":  # T5-style position bias [1, Hq, max_q, max_k], learned
        mask = torch.randn(1, heads_q, max_q, max_k, generator=g).to(dtype)
    layout = (offsets(lengths_q, device), offsets(lengths_k, device), max_q, max_k)
    return (q, k, v, None if mask is None else mask.to(device)), layout


def run(inputs, layout, backend, **kwargs):
    """varlen_attention with autograd: (output, grads of q, k, v and a float mask)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point())
              for t in inputs]
    q, k, v, mask = leaves
    out = transfuse.ops.varlen_attention(q, k, v, *layout, mask=mask, backend=backend, **kwargs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * probe.to(out.device)).sum().backward()
    return out, [t.grad if t is not None and t.requires_grad else None for t in leaves]


def check_against_reference(inputs, layout, backend, dtype, **kwargs):
    """Kernel vs float64 reference (fp32: 1e-4 of the output's scale, 2e-4 for gradients;
    fp16/bf16: the FlashAttention rule against the reference at the same precision)."""
    wide = [None if t is None else t.double() if t.is_floating_point() else t for t in inputs]
    out, grads = run(inputs, layout, backend, **kwargs)
    exact, exact_grads = run(wide, layout, "reference", **kwargs)
    plain, plain_grads = run(inputs, layout, "reference", **kwargs)
    fp32 = dtype == torch.float32
    assert out.dtype == dtype and out.shape == inputs[0].shape
    for name, g, e, p, tol in zip(("out", "dq", "dk", "dv", "dmask"), (out, *grads),
                                  (exact, *exact_grads), (plain, *plain_grads),
                                  (1e-4, 2e-4, 2e-4, 2e-4, 2e-4)):
        if e is None:
            assert g is None, f"{name}: unexpected gradient"
            continue
        scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
        assert_close_to_reference(g, e, None if fp32 else p,
                                  atol=tol * scale if fp32 else 1e-2 * scale, name=name)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("backend,device", backend_params())
def test_mixed_lengths(backend, device, case, causal):
    cpu_only_unless(case in GPU_CASES, device)
    inputs, layout = make_inputs(case, torch.float32, device)
    check_against_reference(inputs, layout, backend, torch.float32, causal=causal)


@pytest.mark.parametrize("option", [dict(window=5), dict(window=5, causal=True),
                                    dict(softcap=2.0, causal=True), dict(scale=0.3),
                                    dict(dropout_p=0.25, dropout_seed=99),
                                    dict(dropout_p=0.25, dropout_seed=99, causal=True)],
                         ids=["window", "window-causal", "softcap", "scale", "dropout",
                              "dropout-causal"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_options(backend, device, option):
    cpu_only_unless(False, device)
    inputs, layout = make_inputs(([1, 17, 40, 0, 9], None, 4, 2, 32), torch.float32, device)
    check_against_reference(inputs, layout, backend, torch.float32, **option)


@pytest.mark.parametrize("mask_kind", ["bool", "bias"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_masks(backend, device, mask_kind):
    """A bool mask per sequence and a learned bias read at local positions (it gets its grad)."""
    cpu_only_unless(False, device)
    inputs, layout = make_inputs(([6, 17, 1], [9, 17, 4], 2, 1, 32), torch.float32, device,
                                 mask_kind)
    check_against_reference(inputs, layout, backend, torch.float32, causal=True)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_half_precision(backend, device, dtype):
    cpu_only_unless(dtype in GPU_HALF_DTYPES, device)
    inputs, layout = make_inputs(([1, 17, 129, 64], None, 4, 2, 64), dtype, device)
    check_against_reference(inputs, layout, backend, dtype, causal=True)


@pytest.mark.parametrize("backend,device", backend_params())
def test_equals_the_padded_op_per_sequence(backend, device):
    """Each sequence alone through transfuse.ops.attention (as batch entry b for the dropout
    draw) gives the packed call's rows, to fp32 rounding."""
    cpu_only_unless(False, device)
    case = ([3, 1, 40, 17], [5, 1, 40, 20], 4, 2, 64)
    (q, k, v, _), layout = make_inputs(case, torch.float32, device)
    cu_q, cu_k = layout[0].tolist(), layout[1].tolist()
    options = dict(causal=True, window=11, dropout_p=0.1, dropout_seed=7)
    packed = transfuse.ops.varlen_attention(q, k, v, *layout, backend=backend, **options)
    for b in range(len(cu_q) - 1):
        rows, keys = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        as_batch = [torch.zeros(b + 1, t.shape[1], n, t.shape[2], device=device)
                    for t, n in ((q, cu_q[b + 1] - cu_q[b]), (k, cu_k[b + 1] - cu_k[b]),
                                 (v, cu_k[b + 1] - cu_k[b]))]
        for padded, t, span in zip(as_batch, (q, k, v), (rows, keys, keys)):
            padded[b] = t[span].transpose(0, 1)
        alone = transfuse.ops.attention(*as_batch, backend=backend, **options)[b]
        torch.testing.assert_close(packed[rows], alone.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params())
def test_strided_inputs_in_the_transformers_layout(backend, device):
    """q/k/v as transformers' padding-free path hands them over: [1, H, T, D] -> [T, H, D]."""
    cpu_only_unless(False, device)
    (q, k, v, _), layout = make_inputs(([7, 20], None, 4, 2, 32), torch.float32, device)
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v)]
    assert not strided[0].is_contiguous()
    expected = transfuse.ops.varlen_attention(q, k, v, *layout, causal=True, backend=backend)
    actual = transfuse.ops.varlen_attention(*strided, *layout, causal=True, backend=backend)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    (q, k, v, _), layout = make_inputs(([5, 19, 1], None, 4, 2, 32), torch.float32, "cpu")

    def f(q, k, v):
        return transfuse.ops.varlen_attention(q, k, v, *layout, causal=True).sin().sum()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(f(*leaves), leaves)
    actual = torch.autograd.grad(compiled(*leaves), leaves)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_reference_is_the_padded_reference_per_sequence():
    (q, k, v, bias), layout = make_inputs(([4, 9], [6, 9], 2, 1, 16), torch.float64, "cpu",
                                          "bias")
    out = reference.varlen_attention(q, k, v, layout[0], layout[1], bias, causal=True)
    alone = reference.attention(q[4:].transpose(0, 1)[None], k[6:].transpose(0, 1)[None],
                                v[6:].transpose(0, 1)[None], bias[..., :9, :9], causal=True)
    torch.testing.assert_close(out[4:], alone[0].transpose(0, 1))


# ------------------------------------------------------------------------------------ bad input

def _bad(**changes):
    (q, k, v, _), (cu_q, cu_k, max_q, max_k) = make_inputs(([2, 3], None, 4, 2, 16),
                                                           torch.float32, "cpu")
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
                max_seqlen_k=max_k)
    args.update(changes)
    return args


@pytest.mark.parametrize("args,error,match", [
    (lambda: _bad(cu_seqlens_q=torch.tensor([0, 2, 5])), ValueError, "cu_seqlens_q must be int32"),
    (lambda: _bad(cu_seqlens_k=torch.tensor([1, 2, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must start at 0"),
    (lambda: _bad(cu_seqlens_q=torch.tensor([0, 3, 2, 5], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 2, 2, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_q must be non-decreasing"),
    (lambda: _bad(cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must end at the number of packed tokens \(5\)"),
    (lambda: _bad(cu_seqlens_k=torch.tensor([0, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_k must have cu_seqlens_q's length"),
    (lambda: _bad(cu_seqlens_q=torch.zeros(2, 3, dtype=torch.int32)), ValueError,
     "cu_seqlens_q must be 1-D"),
    (lambda: _bad(cu_seqlens_q=[0, 2, 5]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    (lambda: _bad(max_seqlen_q=2), ValueError, r"max_seqlen_q \(2\) is less than"),
    (lambda: _bad(max_seqlen_k=-1), ValueError, "max_seqlen_k must be"),
    (lambda: _bad(max_seqlen_k=3.0), TypeError, "max_seqlen_k must be an int"),
    (lambda: _bad(q=torch.randn(1, 4, 5, 16)), ValueError, r"q must be 3-D \[total_tokens"),
    (lambda: _bad(k=torch.randn(5, 3, 16), v=torch.randn(5, 3, 16)), ValueError,
     "k's number of heads"),
    (lambda: _bad(mask=torch.ones(3, 1, 1, 3, dtype=torch.bool)), ValueError, "mask of shape"),
    (lambda: _bad(window=-1), ValueError, "window must be"),
    (lambda: _bad(scale=float("inf")), ValueError, "scale must be > 0.0 and finite"),
    (lambda: _bad(scale=0.0), ValueError, "scale must be"),
    (lambda: _bad(softcap=float("inf")), ValueError, "softcap must be >= 0.0 and finite"),
    (lambda: _bad(softcap=float("nan")), ValueError, "softcap must be"),
    (lambda: _bad(backend=3), TypeError, "backend must be a str or None"),
    (lambda: _bad(dropout_p=0.1, dropout_seed="abc"), TypeError, "dropout_seed must be an int"),
])
def test_bad_input_names_the_argument(args, error, match):
    kwargs = args()
    with pytest.raises(error, match=match):
        transfuse.ops.varlen_attention(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"),
                                       **kwargs)
