"""transfuse.ops.layer_norm / rms_norm: every backend against reference.py in float64."""
import pytest
import torch

import transfuse
from transfuse import reference

from helpers import assert_close_to_reference, backend_params, cpu_backends, cpu_only_unless

HIDDEN = [1, 7, 100, 1000, 4096, 8192]
# On GPU, the casting modes that only change the epilogue run at one hidden size (every block
# width is built by the llama mode and layer_norm; tests/triton_variants.py mirrors this)
GPU_RMS_HIDDEN = {"llama": HIDDEN, "gemma": [1000], "t5": [1000]}
ROWS = [1, 3, 17]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


pytestmark = pytest.mark.usefixtures("poison_allocations")


def make_inputs(rows, cols, dtype, device, *, weight_dtype=None, residual=True, bias=True,
                offset=0.0):
    """Random non-zero inputs with a mean offset (stresses the variance computation)."""
    weight_dtype = weight_dtype or dtype
    x = (torch.randn(rows, cols) * 2 + 0.5).to(dtype).to(device)
    r = torch.randn(rows, cols).to(dtype).to(device) if residual else None
    w = (torch.randn(cols) * 0.5 + 1 - offset).to(weight_dtype).to(device)
    b = torch.randn(cols).to(weight_dtype).to(device) if bias else None
    return x, r, w, b


def run(fn, inputs, backend, **kwargs):
    """fn on `inputs` (tensors or None) with autograd: (outputs, grads of a random projection)."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out = fn(*leaves, backend=backend, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)
    loss = sum((o.double() * torch.randn(o.shape, dtype=torch.float64).to(o.device)).sum()
               for o in outs)
    loss.backward()
    return outs, [t.grad if t is not None else None for t in leaves]


def check_against_reference(fn, inputs, backend, dtype, **kwargs):
    outs, grads = run(fn, inputs, backend, **kwargs)
    exact_outs, exact_grads = run(fn, [t.double() if t is not None else None for t in inputs],
                                  "reference", **kwargs)
    plain_outs, plain_grads = run(fn, inputs, "reference", **kwargs)
    fp32 = dtype == torch.float32
    names = ["y", "residual_out"]
    for name, out, exact, plain in zip(names, outs, exact_outs, plain_outs):
        scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
        assert out.dtype == plain.dtype, f"{name}: dtype {out.dtype}, expected {plain.dtype}"
        assert_close_to_reference(out, exact, None if fp32 else plain,
                                  atol=1e-5 * scale if fp32 else 1e-3 * scale, name=name)
    for name, grad, exact, plain in zip(["dx", "dresidual", "dweight", "dbias"], grads,
                                        exact_grads, plain_grads):
        if exact is None:
            continue
        assert grad is not None, f"{name}: missing gradient"
        assert grad.dtype == plain.dtype, f"{name}: dtype {grad.dtype}, expected {plain.dtype}"
        scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
        assert_close_to_reference(grad, exact, None if fp32 else plain,
                                  atol=2e-5 * scale if fp32 else 1e-2 * scale, name=name)


def layer_norm(x, r, w, b, *, backend, eps=1e-5):
    return transfuse.ops.layer_norm(x, w, b, eps, residual=r, backend=backend)


def rms_norm(x, r, w, *, backend, offset=0.0, casting_mode="llama", eps=1e-6):
    return transfuse.ops.rms_norm(x, w, eps, residual=r, offset=offset, casting_mode=casting_mode,
                                  backend=backend)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("cols", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_residual(backend, device, cols, dtype):
    for rows in ROWS:
        check_against_reference(layer_norm, make_inputs(rows, cols, dtype, device), backend, dtype)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("cols", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("casting_mode,offset", [("llama", 0.0), ("gemma", 1.0), ("t5", 0.0)])
def test_rms_norm_residual(backend, device, cols, dtype, casting_mode, offset):
    cpu_only_unless(cols in GPU_RMS_HIDDEN[casting_mode], device)
    for rows in ROWS:
        x, r, w, _ = make_inputs(rows, cols, dtype, device, bias=False, offset=offset)
        check_against_reference(rms_norm, (x, r, w), backend, dtype, offset=offset,
                                casting_mode=casting_mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cols", [17, 1000])
def test_cpu_residual_sum_rounds_as_torch(dtype, cols):
    """The residual output h = x + r of a 16-bit norm is torch's fp32 sum rounded to the dtype
    bit for bit (bf16: norm.cpp's one-pass add on AVX-512; fp16 and other CPUs: convert.cpp's
    rows): ties to even, subnormals, inf and NaN included; rows of 17 and 1000 leave vector
    tails."""
    x, r, w, b = make_inputs(8, cols, dtype, "cpu")
    tiny = torch.finfo(dtype).smallest_normal
    x[0] = x[0] * tiny  # subnormal sums
    r[0] = r[0] * tiny
    x[1, :3] = torch.tensor([float("inf"), float("nan"), -float("inf")])
    r[2] = x[2]  # exact doublings
    with torch.no_grad():
        _, h = transfuse.ops.layer_norm(x, w, b, residual=r, backend="cpu")
    expected = (x.float() + r.float()).to(dtype)
    assert torch.equal(h.isnan(), expected.isnan())
    assert torch.equal(h[~h.isnan()], expected[~expected.isnan()])


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True),
                                         (True, True)])
def test_layer_norm_without_residual_and_affine(backend, device, weight, bias):
    x, _, w, b = make_inputs(5, 100, torch.float32, device, residual=False)
    inputs = (x, None, w if weight else None, b if bias else None)
    check_against_reference(layer_norm, inputs, backend, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("casting_mode", ["llama", "t5", "gemma"])
@pytest.mark.parametrize("x_dtype,weight_dtype", [(torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float32),
                                                  (torch.float32, torch.bfloat16)], ids=str)
def test_rms_norm_mixed_dtypes(backend, device, casting_mode, x_dtype, weight_dtype):
    x, r, w, _ = make_inputs(4, 64, x_dtype, device, weight_dtype=weight_dtype, bias=False)
    check_against_reference(rms_norm, (x, r, w), backend, min(x_dtype, weight_dtype,
                            key=lambda d: torch.finfo(d).bits), casting_mode=casting_mode)


@pytest.mark.parametrize("backend,device", backend_params())
def test_largest_hidden_size(backend, device):
    x, r, w, b = make_inputs(2, 65536, torch.float32, device)
    check_against_reference(layer_norm, (x, r, w, b), backend, torch.float32)
    check_against_reference(rms_norm, (x, r, w), backend, torch.float32)


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_batch_and_leading_dims(backend, device):
    x = torch.randn(0, 3, 16, device=device)
    w = torch.randn(16, device=device, requires_grad=True)
    y, h = transfuse.ops.layer_norm(x, w, None, residual=torch.randn(0, 3, 16, device=device),
                                    backend=backend)
    assert y.shape == x.shape and h.shape == x.shape
    y.sum().backward()
    torch.testing.assert_close(w.grad, torch.zeros_like(w))  # no rows: zero weight gradient
    x = torch.randn(2, 3, 5, 16, device=device)
    y = transfuse.ops.rms_norm(x, w.detach(), backend=backend)
    torch.testing.assert_close(y, reference.rms_norm(x, w.detach()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", backend_params())
def test_non_contiguous_input(backend, device):
    x = torch.randn(64, 6, device=device).t()  # [6, 64], stride (1, 6)
    r = torch.randn(64, 6, device=device).t()
    w = torch.randn(64, device=device)
    y, h = transfuse.ops.rms_norm(x, w, residual=r, backend=backend)
    y_ref, h_ref = reference.rms_norm(x, w, residual=r)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's
@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("cols", [7, 100, 8208])  # 8208: the looped Triton kernels
def test_statistics_overflow_gives_nan_rows_not_zeros(backend, device, cols):
    """fp32 values near 1e30: the variance (sum of squares) overflows fp32. Every backend, the fp32
    reference included, gives that row NaN (as eager F.layer_norm does), not the zeros of
    rsqrt(inf) = 0; rows with large finite statistics stay right."""
    x, r, w, b = make_inputs(3, cols, torch.float32, device)
    x[1] *= 1e30
    x[2] *= 1e15  # squares near 1e31: finite
    for fn, args in ((layer_norm, (x, r, w, b)), (rms_norm, (x, r, w))):
        y, _ = fn(*args, backend=backend)
        y_fp32, _ = fn(*args, backend="reference")
        y_exact, _ = fn(*(t.double() for t in args), backend="reference")
        assert y[1].isnan().all() and y_fp32[1].isnan().all(), fn.__name__
        assert torch.isfinite(y_exact).all()
        rows = [0, 2]
        assert_close_to_reference(y[rows], y_exact[rows], None, name=fn.__name__,
                                  atol=1e-5 * max(1.0, y_exact[rows].abs().max().item()))


@pytest.mark.parametrize("backend", ["auto", "reference"] + cpu_backends())
def test_bad_input_names_the_argument(backend):
    x = torch.randn(4, 8)
    w = torch.randn(8)
    cases = [
        (lambda: transfuse.ops.layer_norm(x.int(), w, None, backend=backend), TypeError, "x"),
        (lambda: transfuse.ops.layer_norm([1.0, 2.0], w, None, backend=backend), TypeError, "x"),
        (lambda: transfuse.ops.layer_norm(x, torch.randn(7), None, backend=backend), ValueError,
         "weight"),
        (lambda: transfuse.ops.layer_norm(x, w, torch.randn(8).half(), backend=backend),
         TypeError, "bias"),
        (lambda: transfuse.ops.layer_norm(x, w.int(), None, backend=backend), TypeError, "weight"),
        (lambda: transfuse.ops.layer_norm(x, w, None, residual=torch.randn(4, 7), backend=backend),
         ValueError, "residual"),
        (lambda: transfuse.ops.layer_norm(x, w, None, residual=x.half(), backend=backend),
         TypeError, "residual"),
        (lambda: transfuse.ops.layer_norm(x, w, None, eps=-1.0, backend=backend), ValueError,
         "eps"),
        (lambda: transfuse.ops.layer_norm(x, w, None, eps=float("nan"), backend=backend),
         ValueError, "eps"),
        (lambda: transfuse.ops.rms_norm(x, w, eps=float("inf"), backend=backend), ValueError,
         "eps"),
        (lambda: transfuse.ops.rms_norm(x, w, eps="1e-6", backend=backend), TypeError, "eps"),
        (lambda: transfuse.ops.layer_norm(torch.randn(4, 0), None, None, backend=backend),
         ValueError, "x"),
        (lambda: transfuse.ops.rms_norm(x, None, backend=backend), TypeError, "weight"),
        (lambda: transfuse.ops.rms_norm(x, w, casting_mode="mistral", backend=backend),
         ValueError, "casting_mode"),
        (lambda: transfuse.ops.rms_norm(x, w, offset="1", backend=backend), TypeError, "offset"),
    ]
    if backend != "reference":
        cases.append((lambda: transfuse.ops.rms_norm(x.double(), w.double(), backend=backend),
                      TypeError, "x"))
    for call, error, name in cases:
        with pytest.raises(error, match=rf"\b{name}\b"):
            call()


def test_backend_selection(monkeypatch):
    x = torch.randn(2, 8)
    w = torch.randn(8)
    with pytest.raises(ValueError, match="backend"):
        transfuse.ops.rms_norm(x, w, backend="fastest")
    with pytest.raises(TypeError, match="backend must be a str"):
        transfuse.ops.layer_norm(x, w, None, backend=3)
    # a CPU tensor cannot run on the cuda backend: a clear error, not a crash
    with pytest.raises(ValueError, match="backend='cuda'"):
        transfuse.ops.rms_norm(x, w, backend="cuda")
    monkeypatch.setenv("TRANSFUSE_BACKEND", "reference")
    assert transfuse.backends.resolve("norm", None, x.device) == "reference"
    assert transfuse.backends.resolve("norm", "cpu", x.device) == "cpu" or cpu_backends() == []


def test_auto_on_cuda_without_cuda_build():
    """CUDA tensors where the extension has no CUDA: auto must name a GPU backend or say why."""
    try:
        backend = transfuse.backends.resolve("norm", "auto", torch.device("cuda"))
    except ValueError as error:
        assert "cuda" in str(error)
    else:
        assert backend in ("cuda", "triton", "reference")
    reason = transfuse.backends.missing_reason("cuda", "cuda")
    assert reason == "" or "CUDA" in reason or "transfuse._C" in reason


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    """The custom ops trace without a graph break (fake impls) and compute what eager mode does,
    gradients included (under compile autograd goes through transfuse::norm_backward)."""
    norm = transfuse.nn.FusedRMSNorm(32)
    ln = transfuse.nn.FusedLayerNorm(32)
    with torch.no_grad():
        norm.weight.normal_()
        ln.weight.normal_()
        ln.bias.normal_()

    def block(x, r):
        y, h = norm(x, r)
        return ln(y) * 2 + h

    def outputs_and_grads(fn):
        x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        r = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        params = [norm.weight, ln.weight, ln.bias]
        out = fn(x, r)
        grads = torch.autograd.grad((out * out).sum(), [x, r] + params)
        return [out.detach()] + list(grads)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    for got, expected in zip(outputs_and_grads(compiled), outputs_and_grads(block)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
