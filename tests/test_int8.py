"""transfuse.ops.quantize_per_token / int8_matmul / int8_linear: every backend against
reference.py (integers exactly, dequantized outputs within 1e-6 of a float64 epilogue)."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import transfuse
from transfuse import reference

from helpers import backend_params, cpu_backends, cpu_only_unless

pytestmark = pytest.mark.usefixtures("poison_allocations")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (m, n, k): m 0, 1, decode-sized and prefill-sized; n and k with tails for any tile size; k = 1
# (where torch._int_mm on CPU is wrong, see bindings/int8.cpp).
SHAPES = [(0, 7, 16), (1, 1, 1), (4, 3, 1), (1, 130, 300), (5, 7, 15), (16, 64, 16),
          (17, 130, 100), (100, 64, 300)]
# and on CPU tensors only (no new Triton variants for the GPU tests): the CPU GEMV's token groups
CPU_SHAPES = [(7, 70, 1030)]


def shape_id(shape):
    return "m{}n{}k{}".format(*shape)


def activations(m, k, dtype, device):
    """Rows of several magnitudes (up to 1e4), a row of zeros, and a few outliers."""
    g = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 4, max(m, 1))[:m, None]
    if m > 2:
        x[2] = 0.0
        x[1, k // 2] = 3e4
    return x.to(dtype).to(device)


def quantized_weight(n, k, device):
    w, scale = reference.quantize_per_token(torch.randn(n, k) * 0.05)
    return w.to(device), scale.to(device)


def subnormal_spacing(dtype):
    return torch.finfo(dtype).tiny * torch.finfo(dtype).eps


def assert_epilogue_close(out, acc_part, bias, rel=1e-6):
    """|out - exact| <= rel * (|acc * s_x * s_w| + |bias|) elementwise (fp32), or one rounding of
    out's dtype (fp16/bf16) of the exact float64 result."""
    exact = acc_part + (0 if bias is None else bias.double())
    if out.dtype == torch.float32:
        bound = rel * (acc_part.abs() + (0 if bias is None else bias.double().abs())) + 1e-30
    else:
        bound = exact.abs() * torch.finfo(out.dtype).eps + subnormal_spacing(out.dtype)
    err = (out.double() - exact).abs()
    assert torch.isfinite(out).all(), "non-finite output (unwritten?)"
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, bound {bound.max().item():.3g}"


# ---------------------------------------------------------------------------- kernels vs reference

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_quantize_per_token_is_exact(backend, device, dtype):
    for m, k in [(0, 8), (1, 1), (3, 7), (17, 300), (40, 1000)]:
        x = activations(m, k, dtype, device)
        q, scale = transfuse.ops.quantize_per_token(x, backend=backend)
        expected_q, expected_scale = reference.quantize_per_token(x)
        assert q.dtype == torch.int8 and scale.dtype == torch.float32
        assert torch.equal(scale, expected_scale), f"scale, m={m} k={k}"
        assert torch.equal(q, expected_q), f"q, m={m} k={k}"
    x = activations(6, 32, dtype, device).view(2, 3, 32)
    q, scale = transfuse.ops.quantize_per_token(x, backend=backend)
    assert q.shape == (2, 3, 32) and scale.shape == (2, 3)


@pytest.mark.parametrize("backend,device", backend_params())
def test_quantize_rounds_half_to_even_and_gives_zero_rows_scale_one(backend, device):
    tiny = torch.finfo(torch.float32).tiny * 2 ** -20  # a subnormal: absmax / 127 underflows
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5], [0.0] * 6, [tiny] + [0.0] * 5],
                     device=device)
    q, scale = transfuse.ops.quantize_per_token(x, backend=backend)
    assert q[0].tolist() == [127, 0, 2, 2, 0, -2] and scale.tolist() == [1.0, 1.0, 1.0]
    assert q[1].tolist() == [0] * 6 and q[2].tolist() == [0] * 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", backend_params())
def test_rows_with_nan_or_inf_get_scale_nan_and_nan_w8a8_outputs(backend, device, dtype):
    """A row holding NaN or inf (anywhere: first element, a tail tile) is quantized to scale NaN
    and q = 0 on every backend, as the reference does, so its w8a8 outputs are NaN; w8a16 gives
    what the float64 matmul gives (NaN or +-inf). Finite rows are unaffected."""
    nan, inf = float("nan"), float("inf")
    x = activations(6, 300, torch.float32, "cpu")
    x[0, 7], x[1, 299], x[3, 0], x[4, 0], x[4, 150] = nan, inf, -inf, inf, nan
    x = x.to(dtype).to(device)
    finite = torch.tensor([False, False, True, False, False, True], device=device)
    q, scale = transfuse.ops.quantize_per_token(x, backend=backend)
    expected_q, expected_scale = reference.quantize_per_token(x)
    assert torch.equal(scale.isnan(), ~finite) and torch.equal(expected_scale.isnan(), ~finite)
    assert torch.equal(scale[finite], expected_scale[finite])
    assert torch.equal(q, expected_q) and (q[~finite] == 0).all()
    if dtype != torch.float32:
        return  # the GEMMs take the scales as they are: checked once
    w, w_scale = quantized_weight(5, 300, device)
    bias = torch.randn(5).to(dtype).to(device)
    for mode in ("w8a8", "w8a16"):
        out = transfuse.ops.int8_linear(x, w, w_scale, bias, mode, backend=backend)
        exact = reference.int8_linear(x, w, w_scale, bias, mode)
        assert torch.equal(out.isnan(), exact.isnan()), mode
        assert torch.equal(out.isinf(), exact.isinf()), mode
        assert torch.isfinite(out[finite]).all(), mode
    assert out.isnan().any()  # w8a16 also sees the NaN rows
    out = transfuse.ops.int8_linear(x, w, w_scale, bias, "w8a8", backend=backend)
    assert out[~finite].isnan().all()


@pytest.mark.parametrize("backend", ["reference"] + cpu_backends())
def test_zero_width_x_gives_zeros_plus_bias_as_f_linear(backend):
    """k = 0: quantize_per_token gives [..., 0] int8 and scale 1 per row; int8_linear gives what
    F.linear gives (bias, or zeros), in both modes, with an empty gradient for x."""
    x = torch.randn(2, 3, 0, requires_grad=True)
    q, scale = transfuse.ops.quantize_per_token(x, backend=backend)
    assert q.shape == (2, 3, 0) and q.dtype == torch.int8 and torch.equal(scale, torch.ones(2, 3))
    w, w_scale = torch.zeros(4, 0, dtype=torch.int8), torch.rand(4)
    bias = torch.randn(4, requires_grad=True)
    for mode in ("w8a8", "w8a16"):
        out = transfuse.ops.int8_linear(x, w, w_scale, bias, mode, backend=backend)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w.float(), bias),
                                   rtol=0, atol=0)
        out.sum().backward()
        assert x.grad.shape == x.shape
        assert torch.equal(transfuse.ops.int8_linear(x, w, w_scale, None, mode, backend=backend),
                           torch.zeros(2, 3, 4))


def test_w_scale_requiring_grad_is_refused():
    """The int8 weight and its scales are frozen: a w_scale that requires grad would silently get
    no gradient, so int8_linear refuses it (ValueError naming w_scale) while grad is enabled."""
    w, w_scale = quantized_weight(6, 8, "cpu")
    w_scale.requires_grad_(True)
    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match="w_scale must not require grad"):
        transfuse.ops.int8_linear(x, w, w_scale)
    with torch.no_grad():
        out = transfuse.ops.int8_linear(x, w, w_scale)
    torch.testing.assert_close(out, reference.int8_linear(x, w, w_scale.detach()))


@pytest.mark.parametrize("backend,device", backend_params())
def test_int8_matmul_is_exact(backend, device):
    g = torch.Generator().manual_seed(0)
    # every row count of a 6-row tile, weight panels of 64 rows with tails, k not a multiple of 4
    # and, on CPU tensors, past 4 rows the GEMV's token groups (up to k / 128 rows: int8_vnni.cpp)
    cpu_gemv = [(5, 7, 700), (11, 66, 1500), (16, 37, 2100)] if device == "cpu" else []
    for m, n, k in [(1, 1, 1), (3, 5, 1), (5, 7, 15), (17, 130, 100), (64, 64, 64), (8, 70, 67),
                    (9, 65, 262), (1, 200, 130), (2, 3, 5), (4, 129, 64)] + cpu_gemv:
        a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(device)
        b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
        acc = transfuse.ops.int8_matmul(a, b, backend=backend)
        assert acc.dtype == torch.int32 and torch.equal(acc, reference.int8_matmul(a, b))
    # sums beyond 2^24, where an fp32 accumulator would round
    a = torch.full((3, 1100), 127, dtype=torch.int8, device=device)
    b = torch.full((5, 1100), 127, dtype=torch.int8, device=device)
    b[1, 0] = 126
    acc = transfuse.ops.int8_matmul(a, b, backend=backend)
    assert torch.equal(acc, reference.int8_matmul(a, b)) and acc[0, 0].item() == 1100 * 127 * 127
    # -128 * -128 over several chunks of k (bindings/int8.cpp's fp32 path, 1024 columns each,
    # taken on CPUs without VNNI past the GEMV's 15 rows; and through the GEMV)
    for rows in (17, 5):
        a = torch.full((rows, 2100), -128, dtype=torch.int8, device=device)
        b = torch.randint(-128, 128, (3, 2100), generator=g, dtype=torch.int8).to(device)
        b[0] = -128
        acc = transfuse.ops.int8_matmul(a, b, backend=backend)
        assert torch.equal(acc, reference.int8_matmul(a, b))
        assert acc[0, 0].item() == 2100 * 128 * 128


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + CPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,device", backend_params())
def test_w8a8_epilogue_within_1e6_of_float64(backend, device, shape, dtype, with_bias):
    cpu_only_unless(shape in SHAPES, device)
    m, n, k = shape
    x = activations(m, k, dtype, device)
    w, w_scale = quantized_weight(n, k, device)
    bias = torch.randn(n).to(dtype).to(device) if with_bias else None
    out = transfuse.ops.int8_linear(x, w, w_scale, bias, "w8a8", backend=backend)
    assert out.shape == (m, n) and out.dtype == dtype
    x_q, x_scale = reference.quantize_per_token(x)
    acc_part = (reference.int8_matmul(x_q, w).double() * x_scale.double()[:, None]
                * w_scale.double())
    assert_epilogue_close(out, acc_part, bias)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + CPU_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend,device", backend_params())
def test_w8a16_matches_float64(backend, device, shape, dtype, with_bias):
    cpu_only_unless(shape in SHAPES, device)
    m, n, k = shape
    x = activations(m, k, dtype, device) / 100
    w, w_scale = quantized_weight(n, k, device)
    bias = torch.randn(n).to(dtype).to(device) if with_bias else None
    out = transfuse.ops.int8_linear(x, w, w_scale, bias, "w8a16", backend=backend)
    assert out.shape == (m, n) and out.dtype == dtype
    exact = reference.int8_linear(x.double(), w, w_scale, bias, "w8a16")
    # fp32 accumulation over k terms: k * eps32 * sum |x w s|, then the rounding of the result
    magnitude = (x.double().abs() @ w.double().abs().T) * w_scale.double()
    bound = (4 * k * torch.finfo(torch.float32).eps * magnitude
             + 2 * exact.abs() * torch.finfo(dtype).eps + subnormal_spacing(dtype))
    err = (out.double() - exact).abs()
    assert torch.isfinite(out).all() and (err <= bound).all(), f"max error {err.max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", cpu_backends())
def test_cpu_gemms_over_every_tile_remainder(backend, dtype):
    """The CPU GEMMs (AVX512-VNNI or AMX w8a8, AVX-512 w8a16 beyond 48 rows; without an int8 dot
    product w8a8 on AVX2 runs the AVX2 int8 GEMM, in tiles of 4 rows x 16 columns, groups of 4
    of k, blocks of 64 rows, and elsewhere the fp32 GEMM) in tiles of 6 rows (blocks of 32 on
    AMX) x 64 columns, steps of 64 columns of k and (w8a16) blocks of 1536: every row remainder,
    column tails, k tails and several k blocks, against the float64 epilogue (w8a8) and the
    float64 product (w8a16)."""
    for m, n, k in [(50, 70, 17), (51, 65, 513), (52, 1, 256), (53, 129, 257), (54, 64, 600),
                    (55, 3, 5), (7, 130, 300), (96, 64, 128), (56, 70, 3100), (97, 65, 70)]:
        x = activations(m, k, dtype, "cpu")
        w, w_scale = quantized_weight(n, k, "cpu")
        bias = torch.randn(n).to(dtype)
        out = transfuse.ops.int8_linear(x, w, w_scale, bias, "w8a8", backend=backend)
        x_q, x_scale = reference.quantize_per_token(x)
        assert_epilogue_close(out, reference.int8_matmul(x_q, w).double()
                              * x_scale.double()[:, None] * w_scale.double(), bias)
        x = x / 100
        out = transfuse.ops.int8_linear(x, w, w_scale, bias, "w8a16", backend=backend)
        exact = reference.int8_linear(x.double(), w, w_scale, bias, "w8a16")
        magnitude = (x.double().abs() @ w.double().abs().T) * w_scale.double()
        bound = (4 * k * torch.finfo(torch.float32).eps * magnitude
                 + 2 * exact.abs() * torch.finfo(dtype).eps + subnormal_spacing(dtype))
        assert ((out.double() - exact).abs() <= bound).all(), (m, n, k)


def test_cpu_weights_kept_packed_follow_their_weights():
    """The CPU GEMMs keep a weight's packed panels between calls (bindings/packed_weights.h; for
    w8a8 the VNNI GEMM's, for w8a16 of bf16 x the bf16 GEMM's, two packings of one weight): every
    call, the modes alternating, equals the float64 reference of the weight as it is then:
    repeated, after the weight is written in place, for new weights allocated where freed ones
    were, for views of one storage, and for an inference tensor (packed per call, or for few rows
    the GEMV)."""
    m, n, k = 40, 130, 300  # beyond the GEMVs' tokens: the packed panels

    def check(w, w_scale, x):
        out = transfuse.ops.int8_linear(x, w, w_scale, None, "w8a8", backend="cpu")
        x_q, x_scale = reference.quantize_per_token(x)
        assert_epilogue_close(out, reference.int8_matmul(x_q, w).double()
                              * x_scale.double()[:, None] * w_scale.double(), None)
        x16 = (x / 100).bfloat16()
        out = transfuse.ops.int8_linear(x16, w, w_scale, None, "w8a16", backend="cpu")
        exact = reference.int8_linear(x16.double(), w, w_scale, None, "w8a16")
        magnitude = (x16.double().abs() @ w.double().abs().T) * w_scale.double()
        bound = (4 * k * torch.finfo(torch.float32).eps * magnitude
                 + 2 * exact.abs() * torch.finfo(torch.bfloat16).eps)
        assert ((out.double() - exact).abs() <= bound).all()

    x = activations(m, k, torch.float32, "cpu")
    w, w_scale = quantized_weight(n, k, "cpu")
    for _ in range(2):
        check(w, w_scale, x)
    w.copy_(quantized_weight(n, k, "cpu")[0])  # in place: a new version
    check(w, w_scale, x)
    w[5:9] = -w[5:9]
    check(w, w_scale, x)
    for seed in range(4):  # freed and allocated again, likely at the same address
        del w
        torch.manual_seed(seed)
        w, w_scale = quantized_weight(n, k, "cpu")
        check(w, w_scale, x)
    both = torch.cat([w, quantized_weight(n, k, "cpu")[0]])  # two views of one storage
    check(both[:n], w_scale, x)
    check(both[n:], w_scale, x)
    with torch.inference_mode():
        check(w.clone(), w_scale, x)
        check(w.clone(), w_scale, x[:3])
    check(w, w_scale, x[:3])  # few rows over kept panels


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("backend,device", backend_params())
def test_leading_dims_and_gradients(backend, device, mode):
    """x [..., k]; dx = (dy * s_w) @ w (straight through the activation quantization), dbias."""
    w, w_scale = quantized_weight(24, 40, device)
    x = torch.randn(2, 3, 40, device=device, requires_grad=True)
    bias = torch.randn(24, device=device, requires_grad=True)
    out = transfuse.ops.int8_linear(x, w, w_scale, bias, mode, backend=backend)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, reference.int8_linear(x.detach(), w, w_scale, bias.detach(),
                                                          mode), rtol=1e-5, atol=1e-5)
    dy = torch.randn(2, 3, 24, device=device)
    out.backward(dy)
    dequantized = w.double() * w_scale.double()[:, None]
    torch.testing.assert_close(x.grad.double(), dy.double() @ dequantized, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias.grad, dy.sum((0, 1)))


def test_float64_runs_on_the_reference_with_a_warning():
    w, w_scale = quantized_weight(4, 8, "cpu")
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="float64"):
        out = transfuse.ops.int8_linear(x, w, w_scale, backend="auto")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference.int8_linear(x, w, w_scale))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    w, w_scale = quantized_weight(16, 32, "cpu")
    bias = torch.randn(16)

    def f(x):
        return transfuse.ops.int8_linear(x, w, w_scale, bias, "w8a8").sin().sum()
    x = torch.randn(5, 32, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    expected = torch.autograd.grad(f(x), x)[0]
    actual = torch.autograd.grad(compiled(x), x)[0]
    torch.testing.assert_close(actual, expected)


# ------------------------------------------------------------------------------------ bad input

def _linear_args(**changes):
    w, w_scale = quantized_weight(6, 8, "cpu")
    args = dict(x=torch.randn(3, 8), w_int8=w, w_scale=w_scale, bias=None, mode="w8a8")
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,error,match", [
    (dict(x=torch.randn(3, 9)), ValueError, "x's last dimension"),
    (dict(x=torch.ones(3, 8, dtype=torch.int32)), TypeError, "x must be"),
    (dict(w_int8=torch.ones(6, 8)), TypeError, "w_int8 must be"),
    (dict(w_scale=torch.ones(5)), TypeError, "w_scale must be"),
    (dict(w_scale=torch.ones(6, dtype=torch.float16)), TypeError, "w_scale must be"),
    (dict(bias=torch.ones(7)), ValueError, "bias must have shape"),
    (dict(mode="w4a16"), ValueError, "mode must be one of"),
    (dict(backend=3), TypeError, "backend must be a str"),
])
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        transfuse.ops.int8_linear(**_linear_args(**changes))


def test_bad_matmul_input_names_the_argument():
    a = torch.ones(2, 4, dtype=torch.int8)
    with pytest.raises(TypeError, match="b must be"):
        transfuse.ops.int8_matmul(a, torch.ones(3, 4))
    with pytest.raises(ValueError, match="same k"):
        transfuse.ops.int8_matmul(a, torch.ones(3, 5, dtype=torch.int8))
    with pytest.raises(TypeError, match="x must be"):
        transfuse.ops.quantize_per_token(torch.ones(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError, match="backend must be a str"):
        transfuse.ops.int8_matmul(a, a, backend=3)
    with pytest.raises(TypeError, match="backend must be a str"):
        transfuse.ops.quantize_per_token(torch.ones(2, 3), backend=3)


def test_cpu_without_int8_dot_says_so_once():
    """Without VNNI, and without the AVX2 int8 GEMM (AVX-512 without VNNI, or no AVX2), the CPU's
    w8a8 product runs as exact fp32 GEMMs: `info` reports it, and the first w8a8 call on the cpu
    backend warns (once) that int8 is no faster than float here; with the AVX2 int8 GEMM no call
    warns."""
    module, _ = transfuse.backends.extension()
    if module is None:
        pytest.skip("needs the C++ extension")
    report = transfuse.info()
    assert report["cpu_int8_dot"] == bool(module.cpu_int8_dot)
    assert report["cpu_int8_avx2"] == bool(module.cpu_int8_avx2)
    assert not (module.cpu_int8_dot and module.cpu_int8_avx2)
    transfuse.backends._warned.discard(("int8", "no int8 dot"))
    x, (w, w_scale) = torch.randn(8, 32), transfuse.ops.quantize_per_token(torch.randn(16, 32))
    if module.cpu_int8_dot or module.cpu_int8_avx2:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            transfuse.ops.int8_linear(x, w, w_scale, backend="cpu")
        return
    with pytest.warns(RuntimeWarning, match="no int8 dot-product instruction"):
        transfuse.ops.int8_linear(x, w, w_scale, backend="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transfuse.ops.int8_linear(x, w, w_scale, backend="cpu")


@pytest.mark.parametrize("rows", [1, 5, 70])
@pytest.mark.parametrize("backend", cpu_backends())
def test_w8a8_with_weights_of_minus_128(backend, rows):
    """The AVX2 int8 GEMM negates weights by x's sign and so refuses a weight holding -128 (its
    negation does not fit a byte): such a weight takes another exact path, every row and column
    as the reference gives them; x_q of -128 (int8_matmul's a) it takes, as 128 * w."""
    g = torch.Generator().manual_seed(1)
    n, k = 37, 300
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    w[3, 7] = w[36, 299] = -128
    w_scale = torch.rand(n, generator=g) / 100
    x = torch.randn(rows, k, generator=g)
    out = transfuse.ops.int8_linear(x, w, w_scale, None, "w8a8", backend=backend)
    x_q, x_scale = reference.quantize_per_token(x)
    assert_epilogue_close(out, reference.int8_matmul(x_q, w).double()
                          * x_scale.double()[:, None] * w_scale.double(), None)
    a = torch.randint(-128, 128, (rows, k), generator=g, dtype=torch.int8)
    a[:, :5] = -128
    for b in (w, w.clamp(min=-127)):
        assert torch.equal(transfuse.ops.int8_matmul(a, b, backend=backend),
                           reference.int8_matmul(a, b))


@pytest.mark.filterwarnings("ignore:transfuse. this CPU has no int8 dot")
@pytest.mark.parametrize("rows", [1, 16, 17])  # 17: past the GEMV, w8a16 over dequantized blocks
@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_eager_call_takes_any_layout_and_casts_bias(backend, mode, rows):
    """Without autograd, int8_linear on the C++ backend is one call into the extension (its
    reshape, layout and bias cast done there): a permuted 3-D x and a float16 bias give the
    reference's result, and the same as the autograd path."""
    w, w_scale = quantized_weight(24, 40, "cpu")
    x = torch.randn(40, rows, 2).permute(2, 1, 0)  # [2, rows, 40], not contiguous
    bias = torch.randn(24, dtype=torch.float16)
    with torch.no_grad():
        out = transfuse.ops.int8_linear(x, w, w_scale, bias, mode, backend=backend)
    expected = reference.int8_linear(x.contiguous(), w, w_scale, bias.float(), mode)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with_grad = transfuse.ops.int8_linear(x.clone().requires_grad_(), w, w_scale, bias, mode,
                                          backend=backend)
    torch.testing.assert_close(with_grad.detach(), out, rtol=0, atol=0)


def test_a_packed_weights_cache_of_zero_bytes_packs_per_call():
    """TRANSFUSE_PACKED_WEIGHTS_MB=0 (read once per process): nothing kept, every GEMM call packs
    its panels itself, with the same values as the kept ones."""
    script = """
import torch, transfuse
torch.manual_seed(0)
w = torch.randint(-127, 128, (130, 300), dtype=torch.int8)
s = torch.rand(130) / 100
for dtype, mode in ((torch.float32, "w8a8"), (torch.bfloat16, "w8a16")):
    x = torch.randn(40, 300).to(dtype)
    print(transfuse.ops.int8_linear(x, w, s, None, mode, backend="cpu").float().sum().item())
wf = torch.randn(130, 300)
print(transfuse.ops.linear(torch.randn(40, 300), wf, None, backend="cpu").sum().item())
"""
    runs = []
    for megabytes in ("0", "2048"):
        env = dict(os.environ, TRANSFUSE_PACKED_WEIGHTS_MB=megabytes)
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, check=True)
        runs.append(done.stdout.split())
    assert len(runs[0]) == 3 and runs[0] == runs[1]
