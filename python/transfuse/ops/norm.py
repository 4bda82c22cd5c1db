"""LayerNorm and RMSNorm with the residual add fused in.

Flow: layer_norm / rms_norm validate their inputs and pick a backend. Under torch.compile they
call the custom op `transfuse::norm` (fake impl for tracing, autograd through
`transfuse::norm_backward`); in eager mode they run the same kernels without the custom op's
dispatch, through `_EagerNorm` (same context and backward) when autograd needs a graph.
The `reference` backend is plain PyTorch, differentiated by autograd.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, reference
from . import _backend, _library
from ..reference import CASTING_MODES

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (torch.float64,) + KERNEL_DTYPES


@functools.lru_cache(maxsize=None)
def _kernel(backend, direction):
    """The launcher of `backend` for direction "forward" or "backward" (looked up once)."""
    if backend == "triton":
        from transfuse.kernels import norm as triton_norm
        return getattr(triton_norm, f"norm_{direction}")
    return getattr(backends.extension()[0], f"norm_{direction}")  # a function of transfuse._C


def _run_forward(x, weight, bias, residual, eps, weight_offset, rms, normalized_dtype, out_dtype,
                 backend):
    return _kernel(backend, "forward")(x, weight, bias, residual, eps, weight_offset, rms,
                                       normalized_dtype, out_dtype)


@_library.op("norm")
def _norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor],
          eps: float, weight_offset: float, rms: bool, normalized_dtype: torch.dtype,
          out_dtype: torch.dtype, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (y, x + residual or empty, mean [rows] or empty, rstd [rows])"""
    return _run_forward(x, weight, bias, residual, eps, weight_offset, rms, normalized_dtype,
                        out_dtype, backend)


@_norm.register_fake
def _(x, weight, bias, residual, eps, weight_offset, rms, normalized_dtype, out_dtype, backend):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty(rows, dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=out_dtype),
            x.new_empty(x.shape) if residual is not None else x.new_empty(0),
            stats if not rms else x.new_empty(0, dtype=torch.float32),
            torch.empty_like(stats))


def _run_backward(dy, dresidual_out, h, weight, mean, rstd, weight_offset, rms, has_bias, backend):
    return _kernel(backend, "backward")(dy, dresidual_out, h, weight, mean, rstd, weight_offset,
                                        rms, has_bias)


@_library.op("norm_backward")
def _norm_backward(dy: Tensor, dresidual_out: Optional[Tensor], h: Tensor, weight: Optional[Tensor],
                   mean: Tensor, rstd: Tensor, weight_offset: float, rms: bool, has_bias: bool,
                   backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """-> (dx [= dresidual], dweight or empty, dbias or empty)"""
    return _run_backward(dy, dresidual_out, h, weight, mean, rstd, weight_offset, rms, has_bias,
                         backend)


@_norm_backward.register_fake
def _(dy, dresidual_out, h, weight, mean, rstd, weight_offset, rms, has_bias, backend):
    cols = h.shape[-1]
    params = weight if weight is not None else h  # dweight and dbias take weight's dtype, else h's
    dweight = params.new_empty(cols if weight is not None else 0)
    dbias = params.new_empty(cols if has_bias else 0)
    return torch.empty_like(h), dweight, dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, eps, weight_offset, rms, _, _, backend = inputs
    _, residual_out, mean, rstd = output
    h = x if residual is None else residual_out
    ctx.save_for_backward(h, weight, mean, rstd)
    ctx.attrs = (weight_offset, rms, bias is not None, residual is not None, backend)


def _backward_with(run_backward):
    def backward(ctx, dy, dresidual_out, _dmean, _drstd):
        h, weight, mean, rstd = ctx.saved_tensors
        weight_offset, rms, has_bias, has_residual, backend = ctx.attrs
        dx, dweight, dbias = run_backward(dy, dresidual_out if has_residual else None, h, weight,
                                          mean, rstd, weight_offset, rms, has_bias, backend)
        return (dx, dweight if weight is not None else None, dbias if has_bias else None,
                dx if has_residual else None, None, None, None, None, None, None)
    return backward


_norm.register_autograd(_backward_with(_norm_backward), setup_context=_setup_context)


class _EagerNorm(torch.autograd.Function):
    """The same forward, context and backward as the custom op's autograd, without the custom
    op's dispatch (about 40 us a call on CPU); used outside torch.compile."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _run_forward(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2], output[3])
        return output

    backward = staticmethod(_backward_with(_run_backward))


def _check_tensor(name, t, *, like, shape=None, dtypes=KERNEL_DTYPES, optional=True):
    if t is None:
        if optional:
            return
        raise TypeError(f"{name} must be a tensor, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have a floating dtype in {dtypes}, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but x is on {like.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_inputs(x, weight, bias, residual, backend_dtypes=KERNEL_DTYPES):
    _check_tensor("x", x, like=None, dtypes=backend_dtypes, optional=False)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension, got shape "
                         f"{tuple(x.shape)}")
    cols = x.shape[-1]
    _check_tensor("weight", weight, like=x, shape=(cols,), dtypes=backend_dtypes)
    _check_tensor("bias", bias, like=x, shape=(cols,), dtypes=backend_dtypes)
    if weight is not None and bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}")
    _check_tensor("residual", residual, like=x, shape=x.shape, dtypes=(x.dtype,))


def _check_eps(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a number, got {eps!r}")
    if not 0 <= eps < math.inf:  # also false for NaN
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return float(eps)


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None, *, backend=None):
    """LayerNorm over the last dimension of x (+ residual): F.layer_norm(x + residual, ...).

    Statistics in fp32; y in x's dtype. A row whose variance overflows fp32 (values near 1e19
    and above) gives NaN on every backend, as eager F.layer_norm does, never zeros.
    Returns y, or (y, x + residual) when residual is given.
    """
    name = _backend_for(x, backend)
    eps = _check_eps(eps)
    if name == "reference":
        _check_inputs(x, weight, bias, residual, REFERENCE_DTYPES)
        return reference.layer_norm(x, weight, bias, eps, residual)
    y, residual_out, _, _ = _call(x, weight, bias, residual, eps, 0.0, False, torch.float32,
                                  x.dtype, name)
    return y if residual is None else (y, residual_out)


def rms_norm(x, weight, eps=1e-6, residual=None, offset=0.0, *, casting_mode="llama",
             backend=None):
    """RMSNorm over the last dimension of x (+ residual): y = x_hat * (offset + weight).

    casting_mode reproduces the casts of the HF modules: "llama" (LlamaRMSNorm, Mistral, Qwen2),
    "gemma" (GemmaRMSNorm, with offset=1.0), "t5" (T5LayerNorm); see reference.rms_norm_dtypes.
    A row whose mean square overflows fp32 gives NaN on every backend (the HF modules give zeros
    there: rsqrt(inf) = 0). Returns y, or (y, x + residual) when residual is given.
    """
    name = _backend_for(x, backend)
    eps = _check_eps(eps)
    if not isinstance(weight, Tensor):
        _check_tensor("weight", weight, like=None, optional=False)
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"offset must be a number, got {offset!r}")
    if name == "reference":
        _check_inputs(x, weight, None, residual, REFERENCE_DTYPES)
        return reference.rms_norm(x, weight, eps, residual, offset, casting_mode)
    dtypes = reference.rms_norm_dtypes if torch.compiler.is_compiling() else _rms_norm_dtypes
    normalized_dtype, out_dtype = dtypes(x.dtype, weight.dtype, casting_mode)
    y, residual_out, _, _ = _call(x, weight, None, residual, eps, float(offset), True,
                                  normalized_dtype, out_dtype, name)
    return y if residual is None else (y, residual_out)


# 0.4 us a call saved; not under torch.compile (Dynamo warns of an lru_cache, and traces it once)
_rms_norm_dtypes = functools.lru_cache(maxsize=None)(reference.rms_norm_dtypes)


def _call(x, weight, bias, residual, *args):
    """The custom op under torch.compile; in eager mode the same kernels without its dispatch:
    through _EagerNorm when autograd needs a graph, else directly.

    The binding of the cpu and cuda kernels validates its inputs in C++; the Python checks run
    before the Triton kernels and under torch.compile (whose kernels see fake tensors), and after
    any failure, so that the error is worded alike on every backend."""
    if torch.compiler.is_compiling():
        _check_inputs(x, weight, bias, residual)
        return _norm(x, weight, bias, residual, *args)
    if args[-1] == "triton":
        _check_inputs(x, weight, bias, residual)
    try:
        if torch.is_grad_enabled() and (
                x.requires_grad or (weight is not None and weight.requires_grad)
                or (bias is not None and bias.requires_grad)
                or (residual is not None and residual.requires_grad)):
            return _EagerNorm.apply(x, weight, bias, residual, *args)
        # no backward will follow: the C++ kernels need not save mean and rstd
        return _kernel(args[-1], "forward")(x, weight, bias, residual, *args[:-1], False)
    except Exception:
        _check_inputs(x, weight, bias, residual)
        raise


def _backend_for(x, backend):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")
    name = _backend.resolve("norm", backend, x.device)
    if x.dtype == torch.float64 and not (backend or backends.environment_backend()):
        backends.warn_once(("norm", "float64"), "transfuse: the norm kernels take float32, "
                           "float16 and bfloat16; float64 inputs run on the reference backend")
        return "reference"
    return name

