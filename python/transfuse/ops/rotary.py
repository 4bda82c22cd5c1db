"""Rotary position embedding (RoPE, transformers' apply_rotary_pos_emb, "rotate half" layout):
q * cos + rotate_half(q) * sin and the same of k, in one pass over both.

Flow: rotary validates its inputs and picks a backend (op family "rotary"). Under torch.compile
it calls the custom op `transfuse::rotary` (fake impl for tracing, autograd through the same op
with inverse=True); in eager mode it runs the kernels without the custom op's dispatch, through
`_EagerRotary` when autograd needs a graph. The `reference` backend is plain PyTorch.

Backward: the rotation is linear in q and k, so dq = R^T dq_out: the kernels' inverse mode
(csrc/common/rotary.h). cos and sin get no gradient from the kernels: where either requires one,
the call runs the reference backend (differentiated by autograd), with a one-time warning.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
from torch import Tensor

from .. import backends, reference
from . import _backend, _library

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _kernel(backend):
    """The launcher of `backend` (looked up once)."""
    if backend == "triton":
        from transfuse.kernels import rotary as triton_rotary
        return triton_rotary.rotary
    return backends.extension()[0].rotary  # a function of transfuse._C


def _run(q, k, cos, sin, inverse, backend):
    """The kernel over q, k, cos and sin as they lie (a contiguous last dimension, any other
    strides: the projections' transposed views in place); other layouts are copied first."""
    kernel = _kernel(backend)
    try:
        return kernel(q, k, cos, sin, inverse)
    except (ValueError, TypeError):
        _check(q, k, cos, sin, KERNEL_DTYPES)  # a bad input: its error, named in Python
        return kernel(*(t.contiguous() for t in (q, k, cos, sin)), inverse)


@_library.op("rotary")
def _rotary(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool,
            backend: str) -> Tuple[Tensor, Tensor]:
    """-> (q_out, k_out), new contiguous tensors of q's and k's shapes"""
    return _run(q, k, cos, sin, inverse, backend)


@_rotary.register_fake
def _(q, k, cos, sin, inverse, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, inverse, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.attrs = (inverse, backend)


def _backward_with(run):
    def backward(ctx, dq_out, dk_out):  # (autograd passes zeros for an output without a grad)
        cos, sin = ctx.saved_tensors
        inverse, backend = ctx.attrs
        dq, dk = run(dq_out, dk_out, cos, sin, not inverse, backend)
        return dq, dk, None, None, None, None
    return backward


_rotary.register_autograd(_backward_with(_rotary), setup_context=_setup_context)


class _EagerRotary(torch.autograd.Function):
    """The custom op's forward, context and backward without its dispatch (eager mode)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _run(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward_with(_run))


def _check(q, k, cos, sin, dtypes):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dtype not in dtypes:
        raise TypeError(f"q must have a floating dtype in {dtypes}, got {q.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be 4-D [batch, heads, seq, head_dim], got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    batch, _, seq, head_dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"k must have q's batch, seq and head_dim ({batch}, {seq}, {head_dim}), "
                         f"got {tuple(k.shape)}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (rotate half), got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seq, head_dim):
            raise ValueError(f"{name} must have shape [1 or {batch}, {seq}, {head_dim}] (or "
                             f"[{seq}, {head_dim}]), got {tuple(t.shape)}")


def rotary(q, k, cos, sin, *, backend=None):
    """(q * cos + rotate_half(q) * sin, the same of k): transformers' apply_rotary_pos_emb in one
    pass, rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]).

    q [B, Hq, S, D] and k [B, Hk, S, D] (any strides: the transposed views of the projections'
    outputs are read in place), cos and sin [B or 1, S, D] or [S, D], all of one dtype (float32,
    float16, bfloat16; float64 on the reference backend) and device; D even. fp32 math, rounded
    once (eager rounds each product and the sum: within an ulp of this). Returns new contiguous
    (q_out, k_out); differentiable in q and k.
    """
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")
    name = _backend.resolve("rotary", backend, q.device)
    if q.dtype == torch.float64 and not (backend or backends.environment_backend()):
        backends.warn_once(("rotary", "float64"), "transfuse: the rotary kernels take float32, "
                           "float16 and bfloat16; float64 inputs run on the reference backend")
        name = "reference"
    if isinstance(cos, Tensor) and cos.dim() == 2:
        cos = cos.unsqueeze(0)
    if isinstance(sin, Tensor) and sin.dim() == 2:
        sin = sin.unsqueeze(0)
    grad = torch.is_grad_enabled()
    if name != "reference" and grad and (getattr(cos, "requires_grad", False)
                                         or getattr(sin, "requires_grad", False)):
        backends.warn_once(("rotary", "angle grad"), "transfuse: the rotary kernels give cos "
                           "and sin no gradient; calls where they require one run the reference "
                           "backend")
        name = "reference"
    # the cpu and cuda kernels' bindings check their inputs in C++ (and _run names a failure's
    # argument in Python); the Triton kernels, the reference and torch.compile's tracing here
    if name in ("reference", "triton") or torch.compiler.is_compiling():
        _check(q, k, cos, sin, KERNEL_DTYPES + ((torch.float64,) if name == "reference" else ()))
    if name == "reference":
        return reference.rotary(q, k, cos, sin)
    if torch.compiler.is_compiling():
        return _rotary(q, k, cos, sin, False, name)
    if grad and (q.requires_grad or k.requires_grad):
        return _EagerRotary.apply(q, k, cos, sin, False, name)
    return _run(q, k, cos, sin, False, name)
