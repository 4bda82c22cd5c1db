"""Fused attention: softmax(scale * q k^T + mask) v without a seq_q x seq_kv tensor.

Flow: `attention` validates its inputs and picks a backend. Under torch.compile it calls the
custom op `transfuse::attention` (fake impl for tracing, autograd through
`transfuse::attention_backward`); in eager mode it runs the same kernels without the custom op's
dispatch, through `_EagerAttention` (same context and backward) when autograd needs a graph.
The kernels return the output and the row log-sum-exp that the backward pass recomputes P from.
On CUDA the forward is the tensor-core kernel where it supports the call (fp16/bf16, head_dim a
multiple of 8, no dropout), else Triton's; the backward is Triton's. The `reference` backend is
plain PyTorch, differentiated by autograd; calls no kernel can take (head_dim above 256, float64)
run on it with a one-time warning naming the reason.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def _kernel(backend, direction):
    """The launcher of `backend` for direction "forward" or "backward" (looked up once)."""
    if backend == "triton":
        from transfuse.kernels import attention as triton_attention
        return getattr(triton_attention, f"attention_{direction}")
    backends.extension()  # loads transfuse._C, which registers the transfuse_C ops
    return getattr(torch.ops.transfuse_C, f"attention_{direction}").default


def cuda_unsupported(q, dropout_p):
    """Why the CUDA tensor-core forward cannot take this call ("" when it can); mirrors
    csrc/cuda/attention.cu's attention_forward_unsupported."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "the CUDA attention kernel takes float16 and bfloat16"
    if q.shape[-1] % 8:
        return "the CUDA attention kernel takes head_dim a multiple of 8"
    if dropout_p:
        return "dropout runs on the Triton kernel"
    return ""


def _broadcast_mask(mask, q, k):
    """The mask as a [B, Hq, Sq, Skv] view (stride 0 where it broadcasts), fp32 if it is a
    float64 or other non-kernel float mask."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and mask.dtype not in KERNEL_DTYPES:
        mask = mask.float()
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(full)


def _run_forward(q, k, v, mask, causal, scale, window, softcap, dropout_p, seed, backend):
    forward_backend = backend
    if backend == "cuda" and cuda_unsupported(q, dropout_p):
        forward_backend = "triton"
    return _kernel(forward_backend, "forward")(
        q, k, v, _broadcast_mask(mask, q, k), causal, scale, window, softcap, dropout_p, seed)


def _reduce_bias_grad(dbias, mask):
    """dS [B, Hq, Sq, Skv] summed over the dimensions the mask broadcasts along, in its dtype."""
    shape4 = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    dims = tuple(d for d in range(4) if shape4[d] == 1 and dbias.shape[d] != 1)
    if dims:
        dbias = dbias.sum(dims, keepdim=True)
    return dbias.view(mask.shape).to(mask.dtype)


def _run_backward(dout, q, k, v, out, lse, mask, causal, scale, window, softcap, dropout_p, seed,
                  bias_grad, backend):
    backward_backend = "triton" if backend == "cuda" else backend
    dq, dk, dv, dbias = _kernel(backward_backend, "backward")(
        dout, q, k, v, out, lse, _broadcast_mask(mask, q, k), causal, scale, window, softcap,
        dropout_p, seed, bias_grad)
    return dq, dk, dv, _reduce_bias_grad(dbias, mask) if bias_grad else dbias


@torch.library.custom_op("transfuse::attention", mutates_args=())
def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool,
               scale: float, window: int, softcap: float, dropout_p: float, seed: int,
               backend: str) -> Tuple[Tensor, Tensor]:
    """-> (out [B, Hq, Sq, D] stored as [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)"""
    return _run_forward(q, k, v, mask, causal, scale, window, softcap, dropout_p, seed, backend)


@_attention.register_fake
def _(q, k, v, mask, causal, scale, window, softcap, dropout_p, seed, backend):
    batch, heads, seq_q, head_dim = q.shape
    out = q.new_empty(batch, seq_q, heads, head_dim).transpose(1, 2)
    return out, q.new_empty(batch, heads, seq_q, dtype=torch.float32)


@torch.library.custom_op("transfuse::attention_backward", mutates_args=())
def _attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        mask: Optional[Tensor], causal: bool, scale: float, window: int,
                        softcap: float, dropout_p: float, seed: int, bias_grad: bool,
                        backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, dmask or empty)"""
    return _run_backward(dout, q, k, v, out, lse, mask, causal, scale, window, softcap, dropout_p,
                         seed, bias_grad, backend)


@_attention_backward.register_fake
def _(dout, q, k, v, out, lse, mask, causal, scale, window, softcap, dropout_p, seed, bias_grad,
      backend):
    dmask = torch.empty_like(mask) if bias_grad else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, *attrs = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask)
    ctx.attrs = tuple(attrs)
    ctx.bias_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad


def _backward_with(run_backward):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        causal, scale, window, softcap, dropout_p, seed, backend = ctx.attrs
        dq, dk, dv, dmask = run_backward(dout.contiguous(), q, k, v, out, lse, mask, causal, scale,
                                         window, softcap, dropout_p, seed, ctx.bias_grad, backend)
        return (dq, dk, dv, dmask if ctx.bias_grad else None) + (None,) * 7
    return backward


_attention.register_autograd(_backward_with(_attention_backward), setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward, context and backward as the custom op's autograd, without the custom
    op's dispatch; used outside torch.compile."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _run_forward(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(output[1])
        return output

    backward = staticmethod(_backward_with(_run_backward))


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------

def _check_heads(name, t, q=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim], got shape "
                         f"{tuple(t.shape)}")
    if t.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if q is None:
        return
    if t.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if t.shape[0] != q.shape[0]:
        raise ValueError(f"{name} must have q's batch size {q.shape[0]}, got {t.shape[0]}")
    if t.shape[3] != q.shape[3]:
        raise ValueError(f"{name} must have q's head_dim {q.shape[3]}, got {t.shape[3]}")


def _check_number(name, value, *, low, high=None, integer=False):
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if value < low or (high is not None and value >= high) or value != value:
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def _check_inputs(q, k, v, mask, causal, scale, dropout_p, window, softcap):
    _check_heads("q", q)
    _check_heads("k", k, q)
    _check_heads("v", v, q)
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k's number of heads ({k.shape[1]}) must divide q's ({q.shape[1]})")
    if q.shape[3] == 0:
        raise ValueError("q must have a non-empty head_dim")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = attend) or a float additive mask, got "
                            f"{mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
        full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        shape = tuple(mask.shape)
        if len(shape) > 4 or any(m not in (1, f) for m, f in zip(shape[::-1], full[::-1])):
            raise ValueError(f"mask of shape {shape} does not broadcast to [batch, heads_q, "
                             f"seq_q, seq_kv] = {list(full)}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if scale is not None:
        _check_number("scale", scale, low=float("-inf"))
    _check_number("dropout_p", dropout_p, low=0.0, high=1.0)
    _check_number("window", window, low=0, integer=True)
    _check_number("softcap", softcap, low=0.0)


def attention(q, k, v, *, mask=None, causal=False, scale=None, dropout_p=0.0, window=0,
              softcap=0.0, dropout_seed=None, backend=None):
    """softmax(scale * q k^T + mask) v, computed a key tile at a time (no seq_q x seq_kv tensor).

    q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] with Hkv dividing Hq (GQA/MQA: K/V are not expanded).
    mask: None, bool (True = attend) or additive float, broadcastable to [B, Hq, Sq, Skv]; an
    additive mask that requires grad gets its gradient (T5's position bias). causal with
    Sq < Skv is aligned bottom-right (query i sees keys j <= i + Skv - Sq). scale defaults to
    D**-0.5. window > 0: query i sees keys with |i + Skv - Sq - j| < window. softcap > 0: scores
    become softcap * tanh(scores / softcap) before the mask. dropout_p: dropout on the
    probabilities, drawn from dropout_seed (default: a draw from torch's generator); the same
    seed gives the same mask on every backend (reference.dropout_keep). Rows that see no key give
    zeros. Returns [B, Hq, Sq, D] in q's dtype (its memory is laid out as [B, Sq, Hq, D]).
    """
    _check_inputs(q, k, v, mask, causal, scale, dropout_p, window, softcap)
    scale = q.shape[3] ** -0.5 if scale is None else float(scale)
    name = _resolve_constant("attention", backend, q.device)
    if name != "reference":
        name = _reference_if_unsupported(q, name)
    if dropout_p and dropout_seed is None:
        dropout_seed = int(torch.randint(0, 2 ** 32, (), dtype=torch.int64))
    seed = int(dropout_seed or 0) & 0xFFFFFFFF
    if name == "reference":
        return reference.attention(q, k, v, mask, causal, scale, dropout_p, window, softcap, seed)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    args = (q, k, v, mask, causal, scale, int(window), float(softcap), float(dropout_p), seed,
            name)
    if torch.compiler.is_compiling():
        return _attention(*args)[0]
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask)):
        return _EagerAttention.apply(*args)[0]
    return _run_forward(*args)[0]


def _reference_if_unsupported(q, name):
    """`name`, or "reference" (with a one-time warning naming why) for calls no kernel takes."""
    if q.dtype == torch.float64:
        reason = "take float32, float16 and bfloat16; float64 inputs run on the reference backend"
    elif q.shape[3] > MAX_HEAD_DIM:
        reason = f"take head_dim up to {MAX_HEAD_DIM}; larger ones run on the reference backend"
    else:
        return name
    backends.warn_once(("attention", reason), f"transfuse: the attention kernels {reason}")
    return "reference"


@torch.compiler.assume_constant_result
def _resolve_constant(op, backend, device):
    return backends.resolve(op, backend, device)
