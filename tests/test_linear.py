"""transfuse.ops.linear: transfuse's CPU GEMMs (csrc/cpu/gemm.cpp, gemm_bf16.cpp) and GEMV
(gemv.cpp) against reference.py's float64 product over awkward shapes, torch's F.linear for every call it does not take, gradients,
and bad input named."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import transfuse
from transfuse import reference
linear_module = importlib.import_module("transfuse.ops.linear")

from helpers import cpu_backends

pytestmark = pytest.mark.usefixtures("poison_allocations")

# (rows, n, k): every remainder of the 6-row tiles, blocks of 32 rows (AMX) with tails,
# 64-column panels with tails, k tails and several of the fp32 GEMM's 1536-column k blocks,
# leading dimensions
SHAPES = [((16,), 64, 256), ((17,), 65, 17), ((2, 9), 130, 513), ((19,), 1, 300), ((20,), 3, 5),
          ((3, 7), 129, 3100), ((23,), 200, 64), ((2, 33), 70, 100), ((96,), 64, 32)]


def kernel_calls(monkeypatch, own_gemm=True):
    """Counts the calls of transfuse._C.linear that returned a result (the GEMM ran); with
    own_gemm, on any CPU with the GEMMs, also where torch's run faster (own_gemm_rows)."""
    module = transfuse.backends.extension()[0]
    if module is None:
        pytest.skip("needs the C++ extension")
    if own_gemm:
        monkeypatch.setattr(linear_module, "own_gemm_rows", lambda: 1 << 62)
    calls, original = [0], module.linear

    def counting(*args):
        out = original(*args)
        calls[0] += out is not None
        return out
    monkeypatch.setattr(module, "linear", counting)
    return calls


# (rows, n, k) for the GEMV: rows 1-15 (every remainder of its 4-row tiles), n tails of its 4-row
# tiles and 16-row blocks, k tails of 16, leading dimensions
FEW_ROWS = [((1,), 1, 1), ((1,), 17, 300), ((2,), 33, 16), ((3,), 5, 17), ((1, 4), 64, 15),
            ((5,), 19, 130), ((2, 4), 70, 33), ((9,), 3, 64), ((15,), 35, 200)]


def within_fp32_accumulation(out, x, w, bias):
    """|out - exact| within fp32 accumulation over k terms, then one rounding to out's dtype."""
    exact = reference.linear(x.double(), w.double(), None if bias is None else bias.double())
    magnitude = x.double().abs() @ w.double().abs().T + (0 if bias is None else bias.double().abs())
    bound = (2 * x.shape[-1] * torch.finfo(torch.float32).eps * magnitude
             + exact.abs() * torch.finfo(out.dtype).eps + 1e-30)
    assert torch.isfinite(out).all() and ((out.double() - exact).abs() <= bound).all()


def linear_within_fp32_accumulation(shape, with_bias, dtype, inference_weight=False):
    """transfuse.ops.linear on the cpu backend of fresh inputs of shape (lead, n, k): the output's
    shape, dtype and values (within_fp32_accumulation). inference_weight: w an inference tensor
    (whose packed panels the GEMMs do not keep)."""
    lead, n, k = shape
    x, w = torch.randn(*lead, k).to(dtype), torch.randn(n, k).to(dtype)
    if inference_weight:
        with torch.inference_mode():
            w = w.clone()
    bias = torch.randn(n).to(dtype) if with_bias else None
    with torch.no_grad():
        out = transfuse.ops.linear(x, w, bias, backend="cpu")
    assert out.shape == (*lead, n) and out.dtype == dtype
    within_fp32_accumulation(out, x, w, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_gemm_within_fp32_accumulation_of_float64(shape, with_bias, dtype, monkeypatch):
    monkeypatch.setattr(linear_module, "MIN_WORK", 0)  # the small shapes too
    calls = kernel_calls(monkeypatch)
    linear_within_fp32_accumulation(shape, with_bias, dtype)
    if gemm_built_for(math.prod(shape[0]), dtype):
        assert calls[0] == 1  # the GEMM ran (elsewhere torch's F.linear does)


def test_cpu_gemm_bf16_rounds_its_fp32_results_as_torch(monkeypatch):
    """With two ones per row of w, each output of x @ w.T + bias is x[:, j] + x[:, j + 1] + bias[j]
    in fp32 (the products exact, the first sum too): the bf16 GEMM's outputs must equal torch's
    fp32 sums rounded to bf16 bit for bit, ties to even included, and a NaN in x gives NaN in all
    its row (its GELU epilogue: test_gelu_epilogue_within_its_error_of_float64)."""
    monkeypatch.setattr(linear_module, "MIN_WORK", 0)
    calls = kernel_calls(monkeypatch)
    if not transfuse.backends.extension()[0].cpu_gemm_bf16:
        pytest.skip("needs AVX512_BF16")
    rows, k = 40, 150  # 3 panels, the last partly outside n
    x, bias = torch.randn(rows, k).bfloat16(), torch.randn(k).bfloat16()
    x[7, 3] = float("nan")
    columns = torch.arange(k)
    w = torch.zeros(k, k)
    w[columns, columns] = w[columns, (columns + 1) % k] = 1
    with torch.no_grad():
        out = transfuse.ops.linear(x, w.bfloat16(), bias, backend="cpu")
    assert calls[0] == 1
    expected = ((x.float() + x.float()[:, (columns + 1) % k]) + bias.float()).bfloat16()
    expected[7] = float("nan")  # NaN times the zeros of w too
    assert torch.equal(out.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(out[finite], expected[finite])


@pytest.mark.parametrize("rows", [40, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_gemm_weights_kept_packed_follow_their_weights(dtype, rows, monkeypatch):
    """The GEMMs keep a weight's packed panels between calls (bindings/packed_weights.h): every
    call is within fp32 accumulation of the weight as it is then: repeated, after the weight is
    written in place, for new weights allocated where freed ones were, for views of one storage,
    and for an inference tensor and a transposed weight (packed per call; at 3 rows the
    inference tensor's runs the GEMV, the transposed view torch's); k spans several of the fp32
    GEMM's k blocks."""
    monkeypatch.setattr(linear_module, "MIN_WORK", 0)
    calls = kernel_calls(monkeypatch)
    if not gemm_built_for(rows, dtype):
        pytest.skip("needs AVX-512 or AVX2 (fp32) or AVX512_BF16 (bf16)")
    n, k = 130, 1700
    x = torch.randn(rows, k).to(dtype)

    def check(w):
        with torch.no_grad():
            within_fp32_accumulation(transfuse.ops.linear(x, w, None, backend="cpu"), x, w, None)

    w = torch.randn(n, k).to(dtype)
    for _ in range(2):
        check(w)
    w.copy_(torch.randn(n, k))  # in place: a new version
    check(w)
    w[5:9] = -w[5:9]
    check(w)
    for seed in range(4):  # freed and allocated again, likely at the same address
        del w
        torch.manual_seed(seed)
        w = torch.randn(n, k).to(dtype)
        check(w)
    both = torch.cat([w, torch.randn(n, k).to(dtype)])  # two views of one storage
    check(both[:n])
    check(both[n:])
    check(torch.randn(k, n).to(dtype).T)
    with torch.inference_mode():
        check(w.clone())
    assert calls[0] == (12 if rows > linear_module.FEW_ROWS else 11)  # transfuse's GEMMs


def gemm_built_for(rows, dtype):
    """Whether transfuse's GEMM runs `rows` rows of dtype on this CPU (fp32: AVX-512, or AVX2 up
    to cpu_gemm_max_rows; bf16: AVX512_BF16)."""
    module = transfuse.backends.extension()[0]
    return bool(module.cpu_gemm_bf16 if dtype == torch.bfloat16 else
                rows <= module.cpu_gemm_max_rows)


def few_rows_kernel_built(rows, dtype, kept=True):
    """Whether transfuse's GEMV (one row; up to 8 bf16 rows of an inference tensor's weight, kept
    False, or without AVX512_BF16; every bf16 call on a CPU with AVX2 but not AVX-512) or GEMMs
    (from 2 rows) run on this CPU for a call of `rows` <= FEW_ROWS rows."""
    module = transfuse.backends.extension()[0]
    return bool(module.cpu_gemv) and (dtype == torch.float32 or rows <= 8 or not module.cpu_gemm
                                      or (kept and bool(module.cpu_gemm_bf16)))


@pytest.mark.parametrize("inference_weight", [False, True], ids=["kept", "inference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", FEW_ROWS, ids=str)
def test_cpu_few_rows_within_fp32_accumulation_of_float64(shape, with_bias, dtype,
                                                          inference_weight, monkeypatch):
    """Up to FEW_ROWS (15) rows transfuse's kernels take every call on any CPU with AVX-512
    (own_gemm_rows aside: the larger GEMMs' measure), whatever the product's size: one row the
    GEMV, from 2 rows the GEMMs on their kept panels; an inference tensor's weight (never kept)
    the GEMV, up to 8 rows in bf16 (more: torch's). With AVX2 but not AVX-512 the same in fp32,
    and every bf16 call the GEMV."""
    calls = kernel_calls(monkeypatch, own_gemm=False)
    monkeypatch.setattr(linear_module, "own_gemm_rows", lambda: 0)
    linear_within_fp32_accumulation(shape, with_bias, dtype, inference_weight)
    rows = math.prod(shape[0])
    assert calls[0] == int(few_rows_kernel_built(rows, dtype, kept=not inference_weight))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gelu_epilogue_within_its_error_of_float64(dtype, activation, monkeypatch):
    """act(x @ w^T + b) with the GELU in the GEMM's epilogue: the fp32 accumulation's error
    through GELU (slope <= 1.13), GELU's own (2.5e-7 of Phi), one rounding to x's dtype (and,
    where torch's F.linear and F.gelu run instead, the rounding of z between them)."""
    monkeypatch.setattr(linear_module, "MIN_WORK", 0)
    calls = kernel_calls(monkeypatch)
    expected_calls = 0
    for lead, n, k in [((17,), 65, 17), ((2, 9), 130, 513), ((23,), 200, 64), ((3,), 37, 40),
                       ((1,), 37, 40)]:
        x, w, b = (torch.randn(*lead, k) * 0.3).to(dtype), torch.randn(n, k).to(dtype), \
            torch.randn(n).to(dtype)
        with torch.no_grad():
            out = transfuse.ops.linear(x, w, b, activation=activation, backend="cpu")
        rows = x.numel() // k
        kernel = (gemm_built_for(rows, dtype) if rows > linear_module.FEW_ROWS
                  else few_rows_kernel_built(rows, dtype))
        expected_calls += bool(kernel)
        z = reference.linear(x.double(), w.double(), b.double())
        exact = reference.linear(x.double(), w.double(), b.double(), activation)
        magnitude = x.double().abs() @ w.double().abs().T + b.double().abs()
        between = 0 if kernel else z.abs() * torch.finfo(dtype).eps  # F.linear's rounding
        bound = (1.2 * (2 * k * torch.finfo(torch.float32).eps * magnitude + between)
                 + 1e-6 * z.abs() + exact.abs() * torch.finfo(dtype).eps + 1e-6)
        assert out.dtype == dtype and ((out.double() - exact).abs() <= bound).all()
    assert calls[0] == expected_calls
    with pytest.raises(ValueError, match="activation must be one of"):
        transfuse.ops.linear(x, w, b, activation="relu")


def test_cpus_with_amx_keep_torchs_gemm(monkeypatch):
    """On a CPU with AMX torch's GEMMs ran faster than transfuse's (own_gemm_rows): every call
    of more than FEW_ROWS rows is F.linear there, as on a CPU without the GEMMs or beyond the rows
    they take (no extension call that would decline it); elsewhere transfuse's take the call."""
    calls = kernel_calls(monkeypatch, own_gemm=False)
    module = transfuse.backends.extension()[0]
    assert linear_module.own_gemm_rows() == (0 if module.cpu_amx else module.cpu_gemm_max_rows)
    for rows in (64, 200):
        x, w = torch.randn(rows, 128), torch.randn(256, 128)
        with torch.no_grad():
            out = transfuse.ops.linear(x, w, backend="cpu")
        within_fp32_accumulation(out, x, w, None)
    assert calls[0] == sum(not module.cpu_amx and rows <= module.cpu_gemm_max_rows
                           for rows in (64, 200))


@pytest.mark.parametrize("backend", ["reference"] + cpu_backends())
def test_calls_it_does_not_take_are_f_linear(backend, monkeypatch):
    """Beyond FEW_ROWS below the GEMMs' work, 9-15 bf16 rows of an inference tensor's weight
    (on a CPU with the AVX-512 GEMMs; with AVX2 alone the GEMV takes them), fp16, a transposed
    weight view up to FEW_ROWS, autograd and the other backends: torch's F.linear (the reference
    computes in float64), gradients included."""
    calls = kernel_calls(monkeypatch)
    w, bias = torch.randn(96, 80), torch.randn(96)
    with torch.inference_mode():
        w16_inference = w.bfloat16()
    cases = [(torch.randn(16, 80), w), (torch.randn(20, 80).bfloat16(), w.bfloat16()),
             (torch.randn(3, 80).half(), w.half()), (torch.randn(3, 80), w.T.contiguous().T)]
    if transfuse.backends.extension()[0].cpu_gemm or backend != "cpu":
        cases.append((torch.randn(12, 80).bfloat16(), w16_inference))
    for x, weight in cases:
        out = transfuse.ops.linear(x, weight, bias.to(x.dtype), backend=backend)
        expected = (reference.linear if backend == "reference" else F.linear)(
            x, weight, bias.to(x.dtype))
        assert torch.equal(out, expected)
    x = torch.randn(40, 80, requires_grad=True)
    out = transfuse.ops.linear(x, w, bias, backend=backend)
    out.square().sum().backward()
    dtype = torch.float64 if backend == "reference" else torch.float32  # the reference's own
    x2 = x.detach().to(dtype).requires_grad_()
    F.linear(x2, w.to(dtype), bias.to(dtype)).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad.float(), rtol=1e-5, atol=1e-5)
    assert calls[0] == 0


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_torch_compile_fullgraph_runs_the_custom_op(activation, monkeypatch):
    """Under torch.compile an inference call is the custom op transfuse::linear (Inductor would
    otherwise run its own GEMM): fullgraph, transfuse's GEMM inside, what eager gives."""
    monkeypatch.setattr(linear_module, "MIN_WORK", 0)
    calls = kernel_calls(monkeypatch)
    x, w, b = torch.randn(2, 20, 64), torch.randn(48, 64), torch.randn(48)

    def f(x):
        return transfuse.ops.linear(x, w, b, activation=activation, backend="cpu")
    with torch.no_grad():
        eager = f(x)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert calls[0] == (2 if gemm_built_for(40, torch.float32) else 0)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: transfuse.ops.linear("x", w), TypeError, "x must be a float torch.Tensor"),
    (lambda x, w: transfuse.ops.linear(x.long(), w), TypeError, "x must be a float"),
    (lambda x, w: transfuse.ops.linear(x, w[0]), TypeError, "weight must be a 2-D"),
    (lambda x, w: transfuse.ops.linear(x, w.double()), TypeError, "weight must have x's dtype"),
    (lambda x, w: transfuse.ops.linear(x, w[:, :5]), ValueError, "must equal weight's in_features"),
    (lambda x, w: transfuse.ops.linear(x, w, torch.ones(3)), ValueError, "bias must be None or"),
    (lambda x, w: transfuse.ops.linear(x, w, backend=3), TypeError, "backend must be a str"),
    (lambda x, w: transfuse.ops.linear(x, w, backend="nope"), ValueError, "backend must be one of"),
])
@pytest.mark.parametrize("rows", [1, 20], ids=["gemv-rows", "gemm-rows"])
def test_bad_input_names_the_argument(call, error, match, rows):
    with pytest.raises(error, match=match):
        call(torch.randn(rows, 8), torch.randn(6, 8))
