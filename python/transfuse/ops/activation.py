"""Activations: bias + GELU, the epilogue of a linear layer (BERT's intermediate layer after its
GEMM), and act(gate) * up, the gate of a gated MLP: silu_mul (SwiGLU: Llama, Mistral, Qwen2) and
gelu_mul (GeGLU: ModernBERT, Gemma), one op "gated_mul" with the activation as an argument.

Flow: bias_gelu (silu_mul and gelu_mul alike) validates its inputs and picks a backend (op
family "activation"). Under torch.compile it calls the custom op `transfuse::bias_gelu` (fake
impl for tracing, autograd through `transfuse::bias_gelu_backward`); in eager mode it runs the
same kernels without the custom op's dispatch, through `_EagerBiasGelu` (same context and
backward) when autograd needs a graph. The `reference` backend is plain PyTorch, differentiated by autograd.

Backward: dz = dy * gelu'(z) with z recomputed from x and bias (the kernels'); dx = dz, and
dbias = dz summed over the leading dimensions (a torch sum, as eager's broadcast add gives).
gated_mul's: dgate = dy * up * act'(gate), dup = dy * act(gate) (the kernels').
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, reference
from . import _backend, _library

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
APPROXIMATIONS = ("none", "tanh")


@functools.lru_cache(maxsize=None)
def _kernel(backend, direction, name="bias_gelu"):
    """The launcher of `backend` for op `name`, direction "forward" or "backward" (looked up
    once)."""
    if backend == "triton":
        from transfuse.kernels import activation as triton_activation
        return getattr(triton_activation, f"{name}_{direction}")
    return getattr(backends.extension()[0], f"{name}_{direction}")  # a function of transfuse._C


def _matrix(t):
    """t [..., cols] as a contiguous [rows, cols] tensor (t itself when it is one already)."""
    if t.dim() == 2 and t.is_contiguous():
        return t
    cols = t.shape[-1]
    rows = t.numel() // cols if cols else math.prod(t.shape[:-1])
    return t.contiguous().view(rows, cols)


def _rows(t):
    """t [..., cols] as [rows, cols] with contiguous rows (a view where the strides allow)."""
    cols = t.shape[-1]
    rows = t.numel() // cols if cols else math.prod(t.shape[:-1])
    t2 = t.reshape(rows, cols)
    return t2 if t2.stride(-1) == 1 or cols <= 1 else t2.contiguous()


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


def _backend_for(x, backend, op="bias_gelu", argument="x"):
    if not isinstance(x, Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(x).__name__}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")
    name = _backend.resolve(op, backend, x.device)
    if x.dtype == torch.float64 and not (backend or backends.environment_backend()):
        backends.warn_once((op, "float64"), f"transfuse: the {op} kernels take float32, "
                           "float16 and bfloat16; float64 inputs run on the reference backend")
        return "reference"
    return name


# ------------------------------------------------------------------------------------------------
# silu_mul and gelu_mul: act(gate) * up
# ------------------------------------------------------------------------------------------------

GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _run_gated_mul(gate, up, activation, backend):
    """The kernel over gate and up as they lie (rows evenly apart, each contiguous: a joint
    GEMM's halves in place); other layouts are copied to contiguous rows first."""
    kernel = _kernel(backend, "forward", "gated_mul")
    if backend == "triton":  # (its launchers take [rows, cols])
        return kernel(_rows(gate), _rows(up), activation).view(gate.shape)
    try:
        return kernel(gate, up, activation)
    except (ValueError, TypeError):
        _check_gated_mul(gate, up, KERNEL_DTYPES)  # a bad input: its error, named in Python
        return kernel(gate.contiguous(), up.contiguous(), activation)


def _run_gated_mul_backward(dy, gate, up, activation, backend):
    dgate, dup = _kernel(backend, "backward", "gated_mul")(_matrix(dy), _rows(gate), _rows(up),
                                                           activation)
    return dgate.view(gate.shape), dup.view(gate.shape)


@_library.op("gated_mul")
def _gated_mul_op(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    """-> act(gate) * up, a new contiguous tensor of gate's shape and dtype"""
    return _run_gated_mul(gate, up, activation, backend)


@_gated_mul_op.register_fake
def _(gate, up, activation, backend):
    return gate.new_empty(gate.shape)


@_library.op("gated_mul_backward")
def _gated_mul_backward(dy: Tensor, gate: Tensor, up: Tensor, activation: str,
                        backend: str) -> Tuple[Tensor, Tensor]:
    """-> (dgate, dup) of gate's shape"""
    return _run_gated_mul_backward(dy, gate, up, activation, backend)


@_gated_mul_backward.register_fake
def _(dy, gate, up, activation, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _gated_mul_setup_context(ctx, inputs, output):
    gate, up, activation, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.attrs = (activation, backend)


def _gated_mul_backward_with(run_backward):
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return (*run_backward(dy, gate, up, *ctx.attrs), None, None)
    return backward


_gated_mul_op.register_autograd(_gated_mul_backward_with(_gated_mul_backward),
                                setup_context=_gated_mul_setup_context)


class _EagerGatedMul(torch.autograd.Function):
    """The custom op's forward, context and backward without its dispatch (eager mode)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _run_gated_mul(*inputs)
        _gated_mul_setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_gated_mul_backward_with(_run_gated_mul_backward))


def _check_gated_mul(gate, up, dtypes):
    if gate.dtype not in dtypes:
        raise TypeError(f"gate must have a floating dtype in {dtypes}, got {gate.dtype}")
    if up.dtype != gate.dtype:
        raise TypeError(f"up must have gate's dtype ({gate.dtype}), got {up.dtype}")
    if up.device != gate.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")
    if up.shape != gate.shape or gate.dim() == 0:
        raise ValueError(f"gate and up must have one shape of at least one dimension, got "
                         f"{tuple(gate.shape)} and {tuple(up.shape)}")


def gated_mul(gate, up, activation, *, backend=None):
    """act(gate) * up with act named by `activation` ("silu", "gelu" or "gelu_tanh"): silu_mul
    and gelu_mul, for callers that hold the name (the block rules)."""
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {GATED_ACTIVATIONS}, got {activation!r}")
    op = "silu_mul" if activation == "silu" else "gelu_mul"
    name = _backend_for(gate, backend, op, "gate")
    if not isinstance(up, Tensor):
        raise TypeError(f"up must be a torch.Tensor, got {type(up).__name__}")
    if name == "reference" or name == "triton" or torch.compiler.is_compiling():
        _check_gated_mul(gate, up, _dtypes_for(name))
    if name == "reference":
        return reference.gated_mul(gate, up, activation)
    if torch.compiler.is_compiling():
        return _gated_mul_op(gate, up, activation, name)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _EagerGatedMul.apply(gate, up, activation, name)
    return _run_gated_mul(gate, up, activation, name)


def silu_mul(gate, up, *, backend=None):
    """F.silu(gate) * up: the gate of a SwiGLU MLP, act_fn(gate_proj(x)) * up_proj(x), in one pass.

    gate and up: tensors of one shape, dtype and device (float32, float16, bfloat16; float64 on the
    reference backend); any strides (rows lying evenly apart, e.g. the two halves of one joint
    gate-up GEMM's output, are read in place; other layouts are copied first). silu in fp32, the
    product rounded once (eager rounds silu(gate) first, then the product: within an ulp of
    this). Returns a new contiguous tensor of gate's shape; differentiable in both.

    The cpu and cuda kernels' bindings validate their inputs in C++; the Python checks run before
    the Triton kernels, under torch.compile and after a failure, so that errors read alike.
    """
    return gated_mul(gate, up, "silu", backend=backend)


def gelu_mul(gate, up, approximate="none", *, backend=None):
    """F.gelu(gate, approximate=approximate) * up: a GeGLU MLP's gate (ModernBERT's
    act(input) * gate with exact GELU; Gemma's act_fn(gate_proj(x)) * up_proj(x) with "tanh"),
    in one pass. gate and up as silu_mul's; GELU in fp32, the product rounded once."""
    if not isinstance(approximate, str):
        raise TypeError(f"approximate must be a str, got {approximate!r}")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    return gated_mul(gate, up, "gelu" if approximate == "none" else "gelu_tanh", backend=backend)
