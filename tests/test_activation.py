"""transfuse.ops.bias_gelu, silu_mul and gelu_mul: every backend against reference.py in float64
(and eager F.gelu, F.silu)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import transfuse
from transfuse import reference

from helpers import assert_close_to_reference, backend_params, cpu_backends

HIDDEN = [1, 7, 100, 1000, 4096]
ROWS = [0, 1, 3, 17]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
APPROXIMATIONS = ["none", "tanh"]

pytestmark = pytest.mark.usefixtures("poison_allocations")


def make_inputs(rows, cols, dtype, device, *, bias=True):
    """Random inputs wide enough to reach GELU's saturated tails (|x + bias| up to about 15)."""
    x = (torch.randn(rows, cols) * 3).to(dtype).to(device)
    b = (torch.randn(cols) * 1.5).to(dtype).to(device) if bias else None
    return x, b


def run(inputs, backend, approximate):
    """bias_gelu with autograd on copies of `inputs`: (y, [dx, dbias]) for a random projection."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    y = transfuse.ops.bias_gelu(*leaves, approximate, backend=backend)
    torch.manual_seed(1)
    (y.double() * torch.randn(y.shape, dtype=torch.float64).to(y.device)).sum().backward()
    return y, [t.grad if t is not None else None for t in leaves]


def check_against_reference(inputs, backend, dtype, approximate):
    y, grads = run(inputs, backend, approximate)
    exact, exact_grads = run([t.double() if t is not None else None for t in inputs],
                             "reference", approximate)
    plain, plain_grads = run(inputs, "reference", approximate)
    fp32 = dtype == torch.float32
    assert y.dtype == dtype and y.shape == inputs[0].shape
    if y.numel() == 0:  # no rows: empty y and dx, zero dbias
        assert grads[0].shape == inputs[0].shape
        if inputs[1] is not None:
            torch.testing.assert_close(grads[1], torch.zeros_like(inputs[1]), rtol=0, atol=0)
        return
    if fp32:
        # elementwise: |y - gelu(z)| <= 1e-6 * max(1, |z|), z = x + bias
        z = inputs[0].double() if inputs[1] is None else inputs[0].double() + inputs[1].double()
        err = (y.double() - exact).abs() / z.abs().clamp_min(1)
        assert err.max().item() <= 1e-6, f"y: max scaled error {err.max():.3g}"
    scale = max(1.0, exact.abs().max().item())
    assert_close_to_reference(y, exact, None if fp32 else plain,
                              atol=1e-6 * scale if fp32 else 1e-3 * scale, name="y")
    for name, grad, exact_grad, plain_grad in zip(["dx", "dbias"], grads, exact_grads,
                                                  plain_grads):
        if exact_grad is None:
            continue
        assert grad is not None and grad.dtype == dtype, f"{name}: {grad}"
        scale = max(1.0, exact_grad.abs().max().item())
        assert_close_to_reference(grad, exact_grad, None if fp32 else plain_grad,
                                  atol=1e-5 * scale if fp32 else 1e-2 * scale, name=name)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("cols", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_bias_gelu_matches_reference(backend, device, cols, dtype, approximate):
    for i, rows in enumerate(ROWS):  # with and without bias in turn (a run-time flag)
        inputs = make_inputs(rows, cols, dtype, device, bias=i % 2 == 0)
        check_against_reference(inputs, backend, dtype, approximate)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's z^3
def test_dense_grid_fp32(backend, device, approximate):
    """gelu and gelu' of the kernels' own erf / exp over a dense fp32 grid of z (every 2^-13 on
    [-16, 16]) and far out: |error| <= 1e-6 * max(1, |z|) against float64."""
    grid = torch.arange(-2 ** 17, 2 ** 17 + 1, dtype=torch.float64) / 2 ** 13
    far = torch.tensor([20.0, 50.0, 1e3, 1e6, 1e15], dtype=torch.float64)
    z = torch.cat([grid, far, -far]).float().to(device)
    leaf = z.clone().requires_grad_(True)
    y = transfuse.ops.bias_gelu(leaf, approximate=approximate, backend=backend)
    y.backward(torch.ones_like(y))
    z64 = z.double().cpu().requires_grad_(True)
    y64 = F.gelu(z64, approximate=approximate)
    y64.backward(torch.ones_like(y64))
    limit = z64.detach().abs().clamp_min(1)
    y_err = ((y.double().cpu() - y64.detach()).abs() / limit).max().item()
    g_err = ((leaf.grad.double().cpu() - z64.grad).abs() / limit).max().item()
    print(f"{backend} {approximate}: max |gelu error| / max(1, |z|) = {y_err:.3g}, "
          f"gelu' {g_err:.3g}")
    assert y_err <= 1e-6 and g_err <= 1e-6
    # saturated tails exactly: gelu(z) = z far right, 0 far left (not z * 1e-7 for huge z)
    tails = torch.cat([far, torch.tensor([3e38], dtype=torch.float64)]).float().to(device)
    torch.testing.assert_close(transfuse.ops.bias_gelu(tails, approximate=approximate,
                                                       backend=backend), tails, rtol=0, atol=0)
    assert (transfuse.ops.bias_gelu(-tails, approximate=approximate, backend=backend) == 0).all()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0 = NaN
def test_special_values(backend, device):
    z = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0], device=device)
    for approximate in APPROXIMATIONS:
        y = transfuse.ops.bias_gelu(z, approximate=approximate, backend=backend)
        # against float64: torch 2.13's vectorized float32 exact GELU gives NaN at +inf
        expected = F.gelu(z.double(), approximate=approximate).float()
        torch.testing.assert_close(y, expected, equal_nan=True)


@pytest.mark.parametrize("backend,device", backend_params())
def test_strided_and_leading_dims(backend, device):
    x = torch.randn(64, 6, device=device).t()  # [6, 64], stride (1, 6)
    b = torch.randn(64, device=device)
    x_before = x.clone()
    y = transfuse.ops.bias_gelu(x, b, backend=backend)
    assert y.is_contiguous() and y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)  # x is not modified
    torch.testing.assert_close(y, F.gelu(x + b), rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 3, 5, 32, device=device)[..., ::2]  # [2, 3, 5, 16], every other column
    b = torch.randn(16, device=device, dtype=torch.float16)
    check_against_reference((x.half(), b), backend, torch.float16, "tanh")
    check_against_reference((x, None), backend, torch.float32, "none")


@pytest.mark.parametrize("backend,device", backend_params())
def test_empty_and_partial_grads(backend, device):
    x = torch.randn(0, 3, 16, device=device, requires_grad=True)
    b = torch.randn(16, device=device, requires_grad=True)
    y = transfuse.ops.bias_gelu(x, b, backend=backend)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(b.grad, torch.zeros_like(b))  # no rows: zero bias gradient
    # only the bias requires grad, then only x
    x = torch.randn(4, 16, device=device)
    y = transfuse.ops.bias_gelu(x, b, "tanh", backend=backend)
    b.grad = None
    y.sum().backward()
    b_ref = b.detach().clone().requires_grad_(True)
    F.gelu(x + b_ref, approximate="tanh").sum().backward()
    torch.testing.assert_close(b.grad, b_ref.grad, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    y = transfuse.ops.bias_gelu(x, b.detach(), backend=backend)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.gelu(x + b.detach()).sum(), x)[0],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "reference"] + cpu_backends())
def test_bad_input_names_the_argument(backend):
    x = torch.randn(4, 8)
    b = torch.randn(8)
    call = transfuse.ops.bias_gelu
    cases = [
        (lambda: call(x.int(), b, backend=backend), TypeError, "x"),
        (lambda: call([1.0, 2.0], b, backend=backend), TypeError, "x"),
        (lambda: call(torch.tensor(1.0), None, backend=backend), ValueError, "x"),
        (lambda: call(x, torch.randn(7), backend=backend), ValueError, "bias"),
        (lambda: call(x, torch.randn(2, 8), backend=backend), ValueError, "bias"),
        (lambda: call(x, b.half(), backend=backend), TypeError, "bias"),
        (lambda: call(x, b.numpy(), backend=backend), TypeError, "bias"),
        (lambda: call(x, torch.randn(8, device="meta"), backend=backend), ValueError, "bias"),
        (lambda: call(x, b, "erf", backend=backend), ValueError, "approximate"),
        (lambda: call(x, b, None, backend=backend), TypeError, "approximate"),
        (lambda: call(x, b, backend=3), TypeError, "backend"),
        (lambda: call(x, b, backend="fastest"), ValueError, "backend"),
    ]
    if backend != "reference":
        cases.append((lambda: call(x.double(), b.double(), backend=backend), TypeError, "x"))
    for fn, error, name in cases:
        with pytest.raises(error, match=rf"\b{name}\b"):
            fn()


def test_backend_selection(monkeypatch):
    x = torch.randn(2, 8)
    assert transfuse.backends.resolve("bias_gelu", None, x.device) in ("cpu", "reference")
    with pytest.raises(ValueError, match="backend='cuda'"):
        transfuse.ops.bias_gelu(x, backend="cuda")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        y = transfuse.ops.bias_gelu(x.double(), torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(y, F.gelu(x.double() + 1))  # float64: the reference backend
    monkeypatch.setenv("TRANSFUSE_BACKEND", "reference")
    assert transfuse.backends.resolve("bias_gelu", None, x.device) == "reference"


def test_torch_compile_fullgraph():
    """The custom ops trace without a graph break (fake impls) and compute what eager mode does,
    gradients included (under compile autograd goes through transfuse::bias_gelu_backward)."""
    linear = torch.nn.Linear(32, 48)

    def block(x):
        h = transfuse.ops.bias_gelu(x @ linear.weight.t(), linear.bias)
        return transfuse.ops.bias_gelu(h, approximate="tanh") * 2

    def outputs_and_grads(fn):
        x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        out = fn(x)
        grads = torch.autograd.grad((out * out).sum(), [x, linear.weight, linear.bias])
        return [out.detach()] + list(grads)

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    for got, expected in zip(outputs_and_grads(compiled), outputs_and_grads(block)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_reference_is_eager():
    """reference.bias_gelu is F.gelu(x + bias) (what eager computes): bit for bit in float32,
    within an ulp (or the smallest normal, in the subnormal tail) in fp16/bf16: on some CPUs
    eager's half-precision GELU is not its float32 GELU rounded once (torch 2.13 on AVX-512
    differs for z near -4, where fp32's 1 + erf loses digits)."""
    for dtype in DTYPES:
        x, b = make_inputs(5, 33, dtype, "cpu")
        half = dtype != torch.float32
        rtol, atol = (torch.finfo(dtype).eps, torch.finfo(dtype).tiny) if half else (0.0, 0.0)
        for approximate in APPROXIMATIONS:
            torch.testing.assert_close(reference.bias_gelu(x, b, approximate),
                                       F.gelu(x + b, approximate=approximate), rtol=rtol,
                                       atol=atol)


# ------------------------------------------------------------------------------------------------
# silu_mul and gelu_mul: act(gate) * up
# ------------------------------------------------------------------------------------------------

# activation -> the public op computing act(gate) * up, and eager's act
GATED = {
    "silu": (lambda gate, up, backend: transfuse.ops.silu_mul(gate, up, backend=backend), F.silu),
    "gelu": (lambda gate, up, backend: transfuse.ops.gelu_mul(gate, up, backend=backend), F.gelu),
    "gelu_tanh": (lambda gate, up, backend: transfuse.ops.gelu_mul(gate, up, "tanh",
                                                                   backend=backend),
                  lambda g: F.gelu(g, approximate="tanh")),
}


def make_gate_up(rows, cols, dtype, device, *, joint):
    """gate and up [rows, cols] reaching the activations' tails (|gate| up to about 15); joint:
    the two halves of one [rows, 2 cols] tensor (rows 2 cols apart), as a joint gate-up GEMM
    gives."""
    if joint:
        both = (torch.randn(rows, 2 * cols) * 3).to(dtype).to(device)
        return both[:, :cols], both[:, cols:]
    return tuple((torch.randn(rows, cols) * 3).to(dtype).to(device) for _ in range(2))


def run_gated(gate, up, backend, activation):
    """act(gate) * up with autograd on copies: (y, [dgate, dup]) for a random projection of y."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (gate, up)]
    y = GATED[activation][0](*leaves, backend)
    torch.manual_seed(1)
    (y.double() * torch.randn(y.shape, dtype=torch.float64).to(y.device)).sum().backward()
    return y, [t.grad for t in leaves]


def check_gated(gate, up, backend, activation):
    dtype = gate.dtype
    y, grads = run_gated(gate, up, backend, activation)
    exact, exact_grads = run_gated(gate.double(), up.double(), "reference", activation)
    plain, plain_grads = run_gated(gate, up, "reference", activation)
    fp32 = dtype == torch.float32
    assert y.dtype == dtype and y.shape == gate.shape and y.is_contiguous()
    for name, out, ref, eager in zip(["y", "dgate", "dup"], [y] + grads, [exact] + exact_grads,
                                     [plain] + plain_grads):
        assert out.dtype == dtype and out.shape == gate.shape, name
        if out.numel() == 0:
            continue
        scale = max(1.0, ref.abs().max().item())
        assert_close_to_reference(out, ref, None if fp32 else eager,
                                  atol=2e-6 * scale if fp32 else 1e-3 * scale, name=name)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("cols", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", list(GATED))
def test_gated_mul_matches_reference(backend, device, cols, dtype, activation):
    for i, rows in enumerate(ROWS):  # separate tensors and the halves of one in turn
        check_gated(*make_gate_up(rows, cols, dtype, device, joint=i % 2 == 1), backend,
                    activation)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("activation", list(GATED))
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's exp(inf), -inf * 0
def test_gated_mul_layouts_and_tails(backend, device, activation):
    # leading dimensions, a transposed gate (copied to contiguous rows), the halves of a 3-D joint
    both = torch.randn(2, 5, 2 * 48, device=device)
    check_gated(both[..., :48], both[..., 48:], backend, activation)
    check_gated(torch.randn(48, 6, device=device).t(), torch.randn(6, 48, device=device),
                backend, activation)
    # saturated tails and special values: act(g) = g far right, (-)0 far left, as eager's
    g = torch.tensor([1e3, 88.0, 100.0, -1e3, -200.0, -12.0, 0.0, float("inf"), -float("inf"),
                      float("nan")], device=device)
    op, eager = GATED[activation]
    y = op(g, torch.ones_like(g), backend)
    torch.testing.assert_close(y, eager(g.double()).float(), equal_nan=True)


@pytest.mark.parametrize("backend", ["auto", "reference"] + cpu_backends())
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gated_mul_bad_input_names_the_argument(backend, activation):
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    op = GATED[activation][0]

    def call(gate, up, backend):
        return op(gate, up, backend)
    cases = [
        (lambda: call(g.int(), u, backend=backend), TypeError, "gate"),
        (lambda: call([1.0], u, backend=backend), TypeError, "gate"),
        (lambda: call(g, u.numpy(), backend=backend), TypeError, "up"),
        (lambda: call(g, u.half(), backend=backend), TypeError, "up"),
        (lambda: call(g, torch.randn(4, 7), backend=backend), ValueError, "up"),
        (lambda: call(g, torch.randn(8), backend=backend), ValueError, "up"),
        (lambda: call(torch.tensor(1.0), torch.tensor(2.0), backend=backend), ValueError, "gate"),
        (lambda: call(g, torch.randn(4, 8, device="meta"), backend=backend), ValueError, "up"),
        (lambda: call(g, u, backend=3), TypeError, "backend"),
    ]
    if backend != "reference":
        cases.append((lambda: call(g.double(), u.double(), backend=backend), TypeError, "gate"))
    if activation == "gelu":
        cases += [(lambda: transfuse.ops.gelu_mul(g, u, "erf", backend=backend), ValueError,
                   "approximate"),
                  (lambda: transfuse.ops.gelu_mul(g, u, None, backend=backend), TypeError,
                   "approximate")]
    for fn, error, name in cases:
        with pytest.raises(error, match=rf"\b{name}\b"):
            fn()


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_mul_torch_compile_fullgraph(activation):
    """Traced without a graph break, the same outputs and gradients as eager mode."""
    op = GATED[activation][0]

    def mlp(x, w):
        gate, up = (x @ w.t()).chunk(2, dim=-1)
        return op(gate, up, None) * 2

    def outputs_and_grads(fn):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 16, generator=generator).requires_grad_(True)
        w = torch.randn(64, 16, generator=generator).requires_grad_(True)
        out = fn(x, w)
        return [out.detach(), *torch.autograd.grad((out * out).sum(), [x, w])]

    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    for got, expected in zip(outputs_and_grads(compiled), outputs_and_grads(mlp)):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
