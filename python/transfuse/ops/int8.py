"""Int8 quantized matmul: per-token quantization and the int8 linear layer (w8a8, w8a16).

Flow: the wrappers validate, flatten x to [m, k] and pick a backend; every backend exposes the
same four kernels (kernels/int8.py for Triton, transfuse._C for the C++/CUDA extension,
reference.py for plain PyTorch): quantize_per_token, int8_matmul (the raw int32 product),
int8_linear_w8a8 (int8 GEMM with the dequantizing epilogue) and int8_linear_w8a16 (weight-only).
The extension also has the whole int8_linear call (checks, quantization, GEMM or GEMV): in eager
mode without autograd, int8_linear is that one C++ call (per-call cost, decoding). Routing where
a backend has no fast kernel for a shape: w8a16 with m > 16 runs on Triton on CUDA and, on CPU,
as a matmul over blocks of dequantized weight rows (the C++ kernel is a GEMV).

Backward: the int8 weights and their scales are frozen (a w_scale that requires grad is refused
with a ValueError rather than left without a gradient); dx = (dy * s_w) @ w (the activation
quantization of w8a8 passes the gradient straight through, as bitsandbytes does), dbias = sum of
dy. Under torch.compile the forward is the custom op transfuse::int8_linear (fake impl for
tracing).

Non-finite activations: a row of x holding NaN or inf is quantized to scale NaN and q = 0 on
every backend, so its w8a8 outputs are NaN (w8a16 computes with x as it is: NaN or +-inf, as a
float matmul gives). k = 0 gives zeros (+ bias), as F.linear does.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from . import _backend, _library

MODES = ("w8a8", "w8a16")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = KERNEL_DTYPES + (torch.float64,)
MAX_K = 133_000  # k * 127 * 127 must stay below 2^31 for an exact int32 accumulator (= C++ kMaxK)


_NO_INT8_DOT = ("transfuse: this CPU has no int8 dot-product instruction (AVX512-VNNI or "
                "AVX-VNNI), and transfuse's AVX2 int8 GEMM for such CPUs needs AVX2 without "
                "AVX-512: w8a8 runs its exact int8 product through fp32 GEMMs (an int8 GEMV for "
                "a few rows), about as fast as a float linear layer; int8 saves memory")


@functools.lru_cache(maxsize=None)
def _cpu_has_fast_int8():
    module = backends.extension()[0]
    return bool(module.cpu_int8_dot or module.cpu_int8_avx2)


def _warn_if_int8_is_slow():
    """Once: w8a8 on a CPU with neither an int8 dot product nor the AVX2 int8 GEMM is no faster
    than float."""
    if not _cpu_has_fast_int8():
        backends.warn_once(("int8", "no int8 dot"), _NO_INT8_DOT)


@functools.lru_cache(maxsize=None)
def _kernel(backend, name):
    if backend == "reference":
        return getattr(reference, name)
    if backend == "triton":
        from transfuse.kernels import int8 as triton_int8
        return getattr(triton_int8, name)
    return getattr(backends.extension()[0], name)  # a function of transfuse._C


def _linear_forward(x, w, w_scale, bias, mode, backend):
    """x [m, k] contiguous -> [m, n] in x's dtype (bias has x's dtype)."""
    if backend in ("cpu", "cuda"):
        if mode == "w8a8" and backend == "cpu":
            _warn_if_int8_is_slow()
        out = _kernel(backend, "int8_linear")(x, w, w_scale, bias, mode)
        if out is not None:
            return out
        backend = "triton"  # what the C++ op leaves: CUDA w8a16 beyond the GEMV, empty products
    if backend == "reference" or x.numel() == 0 or w.shape[0] == 0:
        return reference.int8_linear(x, w, w_scale, bias, mode)
    if mode == "w8a8":
        x_q, x_scale = _kernel(backend, "quantize_per_token")(x)
        return _kernel(backend, "int8_linear_w8a8")(x_q, x_scale, w, w_scale, bias, x.dtype)
    return _kernel(backend, "int8_linear_w8a16")(x, w, w_scale, bias)


def _grad_x(dy, w, w_scale, dtype):
    return ((dy.float() * w_scale) @ w.float()).to(dtype)


@_library.op("int8_linear")
def _int8_linear(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor], mode: str,
                 backend: str) -> Tensor:
    return _linear_forward(x, w, w_scale, bias, mode, backend)


@_int8_linear.register_fake
def _(x, w, w_scale, bias, mode, backend):
    return x.new_empty(x.shape[0], w.shape[0])


def _setup_context(ctx, inputs, output):
    x, w, w_scale, bias, _mode, _backend = inputs
    ctx.save_for_backward(w, w_scale)
    ctx.x_dtype = x.dtype
    ctx.bias_grad = bias is not None and bias.requires_grad


def _backward(ctx, dy):
    w, w_scale = ctx.saved_tensors
    dx = _grad_x(dy, w, w_scale, ctx.x_dtype) if ctx.needs_input_grad[0] else None
    dbias = dy.sum(0) if ctx.bias_grad else None
    return dx, None, None, dbias, None, None


_int8_linear.register_autograd(_backward, setup_context=_setup_context)


class _EagerInt8Linear(torch.autograd.Function):
    """The custom op's forward and backward without its dispatch, outside torch.compile."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _linear_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def _check_float(name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension")


def _check_weight(x, w_int8, w_scale, bias, mode):
    """Every call (cheap checks first: this runs once per linear layer per decoding step)."""
    if not isinstance(w_int8, Tensor) or w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise TypeError("w_int8 must be a 2-D int8 tensor [out_features, in_features], got "
                        f"{getattr(w_int8, 'dtype', type(w_int8).__name__)}")
    n, k = w_int8.shape
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal w_int8's in_features "
                         f"({k})")
    if k > MAX_K:
        raise ValueError(f"in_features {k} exceeds {MAX_K}: the int32 accumulator could overflow")
    if not isinstance(w_scale, Tensor) or w_scale.dtype != torch.float32 or w_scale.shape != (n,):
        raise TypeError(f"w_scale must be a float32 tensor of shape ({n},), got "
                        f"{getattr(w_scale, 'dtype', None)} {tuple(getattr(w_scale, 'shape', ()))}")
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError("bias must be a float tensor or None")
        if bias.shape != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    device = x.device
    if w_int8.device != device or w_scale.device != device or (
            bias is not None and bias.device != device):
        for name, t in (("w_int8", w_int8), ("w_scale", w_scale), ("bias", bias)):
            if t is not None and t.device != device:
                raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if w_scale.requires_grad and torch.is_grad_enabled():
        raise ValueError("w_scale must not require grad: the int8 weight and its scales are "
                         "frozen (int8_linear gives no gradient for them)")


def _check_backend(backend):
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")


def _rows(x):
    """x [..., k] as a [rows, k] view or copy (reshape(-1, k) cannot infer rows when k = 0)."""
    if x.dim() == 2:
        return x
    k = x.shape[-1]
    return x.reshape(-1, k) if k else x.reshape(math.prod(x.shape[:-1]), 0)


def _backend_for(x, backend, case):
    """case: what `auto` chooses for (backends.AUTO_ORDER)."""
    if not isinstance(x, Tensor):
        _check_float("x", x)
    _check_backend(backend)
    name = _backend.resolve(case, backend, x.device)
    if name != "reference" and x.dtype == torch.float64:
        backends.warn_once(("int8", "float64"), "transfuse: the int8 kernels take float32, "
                           "float16 and bfloat16; float64 inputs run on the reference backend")
        return "reference"
    return name


def quantize_per_token(x, *, backend=None):
    """(x_int8, scale): per-row symmetric int8 over the last dimension, scale = absmax / 127 in
    fp32 (1 for a row of zeros, and for the rows of a zero-width x), x_int8 =
    round-half-even(x / scale). A row holding NaN or inf gets scale NaN and x_int8 = 0 (so that
    int8_linear's w8a8 output for it is NaN). Any leading shape."""
    _check_float("x", x)
    name = _backend_for(x, backend, "quantize")
    x2 = _rows(x.detach()).contiguous()
    if x2.shape[0] == 0 or x2.shape[1] == 0 or name == "reference":
        q, scale = reference.quantize_per_token(x2)
    else:
        q, scale = _kernel(name, "quantize_per_token")(x2)
    return q.view(x.shape), scale.view(x.shape[:-1])


def int8_matmul(a, b, *, backend=None):
    """a [m, k] int8 @ b [n, k] int8 transposed, accumulated exactly in int32 -> [m, n]."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dtype != torch.int8 or t.dim() != 2:
            raise TypeError(f"{name} must be a 2-D int8 tensor")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same k, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[1] > MAX_K:
        raise ValueError(f"k {a.shape[1]} exceeds {MAX_K}: the int32 accumulator could overflow")
    if b.device != a.device:
        raise ValueError(f"b is on {b.device} but a is on {a.device}")
    _check_backend(backend)
    case = backends.sized("int8", 2 * a.shape[0] * b.shape[0] * a.shape[1])
    name = _backend.resolve(case, backend, a.device)
    if 0 in a.shape or 0 in b.shape:
        name = "reference"
    return _kernel(name, "int8_matmul")(a.contiguous(), b.contiguous())


def int8_linear(x, w_int8, w_scale, bias=None, mode="w8a8", *, backend=None):
    """x @ (w_int8 * w_scale[:, None])^T + bias, in x's dtype; x [..., k], w_int8 [n, k].

    w8a8: x is quantized per token on the fly; int8 x int8 -> int32, then the fp32 epilogue
    acc * s_x * s_w + bias. w8a16: weight-only; x stays in its dtype and the int8 weight is
    converted inside the kernel (for memory-bound decoding). Differentiable with respect to x
    and bias (the weight and w_scale are frozen: a w_scale requiring grad raises ValueError).
    A row of x holding NaN or inf gives NaN outputs in w8a8 (its scale is NaN); k = 0 gives
    bias (or zeros), as F.linear.
    """
    if mode == "w8a16":
        case = "int8_weight_only"
    else:  # (x's rows times the weight's elements; malformed arguments are checked after)
        case = backends.sized("int8", 2 * x.numel() // max(x.shape[-1], 1) * w_int8.numel()
                              if isinstance(x, Tensor) and x.dim() and isinstance(w_int8, Tensor)
                              else 0)
    name = _backend_for(x, backend, case)
    if (name == "cpu" or name == "cuda") and not torch.compiler.is_compiling():
        # the whole call in C++ (checks included) when autograd needs no graph: per-call cost
        try:
            if not (torch.is_grad_enabled() and (x.requires_grad or w_scale.requires_grad or (
                    bias is not None and bias.requires_grad))):
                if mode == "w8a8" and name == "cpu":
                    _warn_if_int8_is_slow()
                out = _kernel(name, "int8_linear")(x, w_int8, w_scale, bias, mode)
                if out is not None:
                    return out
                name = "triton"  # what it leaves (see _linear_forward): not asked of C++ again
        except Exception:
            _check_float("x", x)  # words the error as the other backends do
            _check_weight(x, w_int8, w_scale, bias, mode)
            raise
    _check_float("x", x)
    _check_weight(x, w_int8, w_scale, bias, mode)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    x2 = _rows(x).contiguous()
    args = (x2, w_int8.contiguous(), w_scale.contiguous(), bias, mode, name)
    if torch.compiler.is_compiling():
        out = _int8_linear(*args)
    elif torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        out = _EagerInt8Linear.apply(*args)
    else:
        out = _linear_forward(*args)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], w_int8.shape[0])

