"""Bias + GELU: the epilogue of a linear layer (BERT's intermediate layer after its GEMM).

Flow: bias_gelu validates its inputs and picks a backend (op family "activation"). Under
torch.compile it calls the custom op `transfuse::bias_gelu` (fake impl for tracing, autograd
through `transfuse::bias_gelu_backward`); in eager mode it runs the same kernels without the
custom op's dispatch, through `_EagerBiasGelu` (same context and backward) when autograd needs a
graph. The `reference` backend is plain PyTorch, differentiated by autograd.

Backward: dz = dy * gelu'(z) with z recomputed from x and bias (the kernels'); dx = dz, and
dbias = dz summed over the leading dimensions (a torch sum, as eager's broadcast add gives).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from . import _backend, _library

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
APPROXIMATIONS = ("none", "tanh")


@functools.lru_cache(maxsize=None)
def _kernel(backend, direction):
    """The launcher of `backend` for direction "forward" or "backward" (looked up once)."""
    if backend == "triton":
        from transfuse.kernels import activation as triton_activation
        return getattr(triton_activation, f"bias_gelu_{direction}")
    return getattr(backends.extension()[0], f"bias_gelu_{direction}")  # a function of transfuse._C


def _matrix(t):
    """t [..., cols] as a contiguous [rows, cols] tensor (t itself when it is one already)."""
    if t.dim() == 2 and t.is_contiguous():
        return t
    cols = t.shape[-1]
    rows = t.numel() // cols if cols else math.prod(t.shape[:-1])
    return t.contiguous().view(rows, cols)


def _run_forward(x, bias, approximate, backend):
    x2 = _matrix(x)
    y = _kernel(backend, "forward")(x2, None if bias is None else bias.contiguous(), approximate)
    return y if x2 is x else y.view(x.shape)


def _run_backward(dy, x, bias, approximate, backend):
    x2 = _matrix(x)
    dx = _kernel(backend, "backward")(_matrix(dy), x2,
                                      None if bias is None else bias.contiguous(), approximate)
    return dx if x2 is x else dx.view(x.shape)


@_library.op("bias_gelu")
def _bias_gelu(x: Tensor, bias: Optional[Tensor], approximate: str, backend: str) -> Tensor:
    """-> gelu(x + bias), a new contiguous tensor of x's shape and dtype"""
    return _run_forward(x, bias, approximate, backend)


@_bias_gelu.register_fake
def _(x, bias, approximate, backend):
    return x.new_empty(x.shape)


@_library.op("bias_gelu_backward")
def _bias_gelu_backward(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str,
                        backend: str) -> Tensor:
    """-> dz = dy * gelu'(x + bias), of x's shape"""
    return _run_backward(dy, x, bias, approximate, backend)


@_bias_gelu_backward.register_fake
def _(dy, x, bias, approximate, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.attrs = (approximate, backend)


def _backward_with(run_backward):
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        approximate, backend = ctx.attrs
        dz = run_backward(dy, x, bias, approximate, backend)
        dbias = None
        if bias is not None and ctx.needs_input_grad[1]:
            dbias = _matrix(dz).sum(0)
        return dz, dbias, None, None
    return backward


_bias_gelu.register_autograd(_backward_with(_bias_gelu_backward), setup_context=_setup_context)


class _EagerBiasGelu(torch.autograd.Function):
    """The same forward, context and backward as the custom op's autograd, without the custom
    op's dispatch; used outside torch.compile."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _run_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward_with(_run_backward))


def _check_inputs(x, bias, approximate, dtypes):
    if x.dtype not in dtypes:
        raise TypeError(f"x must have a floating dtype in {dtypes}, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the last one is bias's), got a "
                         "0-d tensor")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype ({x.dtype}), got {bias.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        if bias.shape != x.shape[-1:]:
            raise ValueError(f"bias must have shape ({x.shape[-1]},), got {tuple(bias.shape)}")
    if not isinstance(approximate, str):
        raise TypeError(f"approximate must be a str, got {approximate!r}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")


def _dtypes_for(backend):
    if backend == "reference":
        return (torch.float64,) + KERNEL_DTYPES
    return KERNEL_DTYPES


def bias_gelu(x, bias=None, approximate="none", *, backend=None):
    """gelu(x + bias) over x [..., N] with bias [N] of x's dtype (or None): F.gelu(x + bias,
    approximate=approximate), "none" (exact, erf) or "tanh".

    As eager computes it: z = x + bias rounded to x's dtype, GELU in fp32, rounded once. Returns
    a new tensor (contiguous, x's shape and dtype); x may be non-contiguous or empty.
    """
    name = _backend_for(x, backend)
    _check_inputs(x, bias, approximate, _dtypes_for(name))
    if name == "reference":
        return reference.bias_gelu(x, bias, approximate)
    return _call(x, bias, approximate, name)


def _call(x, bias, approximate, backend):
    """The custom op under torch.compile; in eager mode the same kernels without its dispatch:
    through _EagerBiasGelu when autograd needs a graph, else directly."""
    if torch.compiler.is_compiling():
        return _bias_gelu(x, bias, approximate, backend)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _EagerBiasGelu.apply(x, bias, approximate, backend)
    return _run_forward(x, bias, approximate, backend)


def _backend_for(x, backend):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")
    name = _backend.resolve("activation", backend, x.device)
    if x.dtype == torch.float64 and not (backend or backends.environment_backend()):
        backends.warn_once(("activation", "float64"), "transfuse: the bias_gelu kernels take "
                           "float32, float16 and bfloat16; float64 inputs run on the reference "
                           "backend")
        return "reference"
    return name

