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
import math
import operator
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends, reference
from . import _backend, _library

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def _kernel(backend, direction, packed):
    """The launcher of `backend` for direction "forward" or "backward" and the padded or packed
    (varlen) layout (looked up once)."""
    name = f"{'varlen_' if packed else ''}attention_{direction}"
    if backend == "triton":
        from transfuse.kernels import attention as triton_attention
        return getattr(triton_attention, name)
    return getattr(backends.extension()[0], name)  # a function of transfuse._C


def cuda_unsupported(q, dropout_p):
    """Why the CUDA tensor-core forward cannot take this call ("" when it can); mirrors
    csrc/cuda/attention.cu's attention_forward_unsupported."""
    return cuda_unsupported_for(q.dtype, q.shape[-1], dropout_p)


def cuda_unsupported_for(dtype, head_dim, dropout_p):
    """cuda_unsupported for q of this dtype and head_dim."""
    if dtype not in (torch.float16, torch.bfloat16):
        return "the CUDA attention kernel takes float16 and bfloat16"
    if head_dim % 8:
        return "the CUDA attention kernel takes head_dim a multiple of 8"
    if dropout_p:
        return "dropout runs on the Triton kernel"
    return ""


def _mask_extent(q, k, layout):
    """[B, Hq, Sq, Skv] the mask broadcasts to: padded q [B, Hq, Sq, D]; packed q [Tq, Hq, D]
    with layout (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)."""
    if layout is None:
        return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    cu_seqlens_q, _, max_seqlen_q, max_seqlen_k = layout
    return (cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k)


def _broadcast_mask(mask, q, k, layout):
    """The mask as a view of its full extent (stride 0 where it broadcasts), fp32 if it is a
    float64 or other non-kernel float mask."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and mask.dtype not in KERNEL_DTYPES:
        if not mask.is_floating_point():  # checked here too: the eager C++ path has no Python check
            raise TypeError(f"mask must be bool (True = attend) or a float additive mask, got "
                            f"{mask.dtype}")
        mask = mask.float()
    return mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape)).expand(_mask_extent(q, k, layout))


def _layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """None for the padded layout, else the packed layout's arguments as one tuple."""
    if cu_seqlens_q is None:
        return None
    return (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


def _run_forward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                 scale, window, softcap, dropout_p, seed, backend):
    forward_backend = backend
    if backend == "cuda" and cuda_unsupported(q, dropout_p):
        forward_backend = "triton"
    layout = _layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    mask = _broadcast_mask(mask, q, k, layout)
    kernel = _kernel(forward_backend, "forward", layout is not None)
    return kernel(q, k, v, *(layout or ()), mask, causal, scale, window, softcap, dropout_p, seed)


def _reduce_bias_grad(dbias, mask):
    """dS [B, Hq, Sq, Skv] summed over the dimensions the mask broadcasts along, in its dtype."""
    shape4 = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    dims = tuple(d for d in range(4) if shape4[d] == 1 and dbias.shape[d] != 1)
    if dims:
        dbias = dbias.sum(dims, keepdim=True)
    return dbias.view(mask.shape).to(mask.dtype)


def _run_backward(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k, causal, scale, window, softcap, dropout_p, seed, bias_grad,
                  backend):
    backward_backend = "triton" if backend == "cuda" else backend
    layout = _layout(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    kernel = _kernel(backward_backend, "backward", layout is not None)
    dq, dk, dv, dbias = kernel(dout, q, k, v, out, lse, *(layout or ()),
                               _broadcast_mask(mask, q, k, layout), causal, scale, window, softcap,
                               dropout_p, seed, bias_grad)
    return dq, dk, dv, _reduce_bias_grad(dbias, mask) if bias_grad else dbias


# One custom op pair for both layouts: cu_seqlens_q None is the padded layout (q [B, Hq, Sq, D]),
# else the packed one (q [Tq, Hq, D], sequence b in rows cu_seqlens_q[b]:cu_seqlens_q[b + 1]).
@_library.op("attention")
def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
               cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int,
               max_seqlen_k: int, causal: bool, scale: float, window: int, softcap: float,
               dropout_p: float, seed: int, backend: str) -> Tuple[Tensor, Tensor]:
    """-> padded: (out [B, Hq, Sq, D] stored as [B, Sq, Hq, D], lse [B, Hq, Sq] fp32);
    packed: (out [Tq, Hq, D], lse [Hq, Tq] fp32)"""
    return _run_forward(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                        causal, scale, window, softcap, dropout_p, seed, backend)


@_attention.register_fake
def _(q, k, v, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
      window, softcap, dropout_p, seed, backend):
    if cu_seqlens_q is not None:
        return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    batch, heads, seq_q, head_dim = q.shape
    out = q.new_empty(batch, seq_q, heads, head_dim).transpose(1, 2)
    return out, q.new_empty(batch, heads, seq_q, dtype=torch.float32)


@_library.op("attention_backward")
def _attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                        mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                        cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                        causal: bool, scale: float, window: int, softcap: float,
                        dropout_p: float, seed: int, bias_grad: bool,
                        backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, dmask or empty)"""
    return _run_backward(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, causal, scale, window, softcap, dropout_p, seed, bias_grad,
                         backend)


@_attention_backward.register_fake
def _(dout, q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      causal, scale, window, softcap, dropout_p, seed, bias_grad, backend):
    dmask = torch.empty_like(mask) if bias_grad else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


_CONSTANT_INPUTS = 11  # inputs after (q, k, v, mask): the layout and the attributes


def _setup_context(ctx, inputs, output):
    q, k, v, mask, cu_seqlens_q, cu_seqlens_k, *attrs = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k)
    ctx.attrs = tuple(attrs)
    ctx.bias_grad = mask is not None and mask.dtype != torch.bool and mask.requires_grad


def _backward_with(run_backward):
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        dq, dk, dv, dmask = run_backward(dout.contiguous(), q, k, v, out, lse, mask, cu_seqlens_q,
                                         cu_seqlens_k, *ctx.attrs[:-1], ctx.bias_grad,
                                         ctx.attrs[-1])
        return (dq, dk, dv, dmask if ctx.bias_grad else None) + (None,) * _CONSTANT_INPUTS
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

_PADDED_DIMS = "[batch, heads, seq, head_dim]"
_PACKED_DIMS = "[total_tokens, heads, head_dim]"


def _check_heads(name, t, q=None, dims=_PADDED_DIMS):
    """t is a float tensor of the layout `dims`; with q: q's dtype, device, head_dim (and batch
    in the padded layout)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    rank = dims.count(",") + 1
    if t.dim() != rank:
        raise ValueError(f"{name} must be {rank}-D {dims}, got shape {tuple(t.shape)}")
    if t.dtype not in KERNEL_DTYPES + (torch.float64,):
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if q is None:
        return
    if t.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype ({q.dtype}), got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if dims == _PADDED_DIMS and t.shape[0] != q.shape[0]:
        raise ValueError(f"{name} must have q's batch size {q.shape[0]}, got {t.shape[0]}")
    if t.shape[-1] != q.shape[-1]:
        raise ValueError(f"{name} must have q's head_dim {q.shape[-1]}, got {t.shape[-1]}")


def _check_number(name, value, *, low, high=math.inf, integer=False, low_open=False):
    """value is an int (integer) or a number in [low, high) ((low, high) with low_open); with
    high = inf that also excludes inf, and NaN fails every comparison."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not ((low < value if low_open else low <= value) and value < high):
        if high != math.inf:
            bound = f"in [{low}, {high})"
        else:
            bound = f"{'>' if low_open else '>='} {low}" + ("" if integer else " and finite")
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def _check_seed(dropout_seed):
    """dropout_seed: None or an integer (any integer type, e.g. numpy's); -> int or None."""
    if dropout_seed is None:
        return None
    if not isinstance(dropout_seed, bool):
        try:
            return operator.index(dropout_seed)
        except TypeError:
            pass
    raise TypeError(f"dropout_seed must be an int or None, got {dropout_seed!r}")


def _check_tensors(q, k, v, mask, layout=None):
    dims = _PADDED_DIMS if layout is None else _PACKED_DIMS
    _check_heads("q", q, dims=dims)
    _check_heads("k", k, q, dims)
    _check_heads("v", v, q, dims)
    heads = -2 if layout is not None else 1
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[heads] == 0 or q.shape[heads] % k.shape[heads]:
        raise ValueError(f"k's number of heads ({k.shape[heads]}) must divide q's "
                         f"({q.shape[heads]})")
    if q.shape[-1] == 0:
        raise ValueError("q must have a non-empty head_dim")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = attend) or a float additive mask, got "
                            f"{mask.dtype}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
        full = _mask_extent(q, k, layout)
        shape = tuple(mask.shape)
        if len(shape) > 4 or any(m not in (1, f) for m, f in zip(shape[::-1], full[::-1])):
            raise ValueError(f"mask of shape {shape} does not broadcast to [batch, heads_q, "
                             f"seq_q, seq_kv] = {list(full)}")


def _check_scalars(causal, scale, dropout_p, window, softcap):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if scale is not None:
        _check_number("scale", scale, low=0.0, low_open=True)
    _check_number("dropout_p", dropout_p, low=0.0, high=1.0)
    _check_number("window", window, low=0, integer=True)
    _check_number("softcap", softcap, low=0.0)  # 0 = off


def attention(q, k, v, *, mask=None, causal=False, scale=None, dropout_p=0.0, window=0,
              softcap=0.0, dropout_seed=None, backend=None):
    """softmax(scale * q k^T + mask) v, computed a key tile at a time (no seq_q x seq_kv tensor).

    q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] with Hkv dividing Hq (GQA/MQA: K/V are not expanded).
    mask: None, bool (True = attend) or additive float, broadcastable to [B, Hq, Sq, Skv]; an
    additive mask that requires grad gets its gradient (T5's position bias). causal with
    Sq < Skv is aligned bottom-right (query i sees keys j <= i + Skv - Sq). scale: a finite
    number > 0, default D**-0.5. window > 0: query i sees keys with |i + Skv - Sq - j| < window.
    softcap: finite and >= 0; 0 = off, else scores become softcap * tanh(scores / softcap) before
    the mask. dropout_p: dropout on the probabilities, drawn from the int dropout_seed (default:
    a draw from torch's generator); the same seed gives the same mask on every backend
    (reference.dropout_keep). Rows that see no key give zeros. Returns [B, Hq, Sq, D] in q's
    dtype (its memory is laid out as [B, Sq, Hq, D]).
    """
    if (mask is None and scale is None and dropout_p is _DEFAULT_DROPOUT and window is _NO_WINDOW
            and softcap is _NO_SOFTCAP and dropout_seed is None and type(causal) is bool
            and (backend is None or type(backend) is str)):
        out = _eager_inference(q, k, v, causal, backend)  # a decoding step's: its per-call cost
        if out is not None:
            return out
    _check_scalars(causal, scale, dropout_p, window, softcap)
    return _dispatch(q, k, v, mask, None, causal, scale, dropout_p, window, softcap, dropout_seed,
                     backend)


_DEFAULT_DROPOUT, _NO_WINDOW, _NO_SOFTCAP = (attention.__kwdefaults__[name]
                                             for name in ("dropout_p", "window", "softcap"))


def _eager_inference(q, k, v, causal, backend):
    """attention(q, k, v, causal=causal, backend=backend) with every other argument left at its
    default, straight to the cpu or cuda kernel when no autograd graph is needed and no
    Python-side choice is left to make (as _run would, without its checks and conversions); None
    otherwise. The C++ binding checks the tensors; its errors are worded by _check_tensors, as on
    the other paths."""
    if type(q) is not Tensor or q.dtype not in KERNEL_DTYPES or q.dim() != 4 or (
            q.shape[-1] > MAX_HEAD_DIM or torch.compiler.is_compiling()):
        return None
    name = _backend.resolve(_case(q, k, None), backend, q.device)
    if name != "cpu" and not (name == "cuda" and not cuda_unsupported(q, 0.0)):
        return None
    try:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return None
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            return None
        return _kernel(name, "forward", False)(q, k, v, None, causal, q.shape[-1] ** -0.5, 0, 0.0,
                                                0.0, 0)[0]
    except Exception:
        _check_tensors(q, k, v, None, None)
        raise


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                     mask=None, causal=False, scale=None, dropout_p=0.0, window=0, softcap=0.0,
                     dropout_seed=None, backend=None, check_offsets=True):
    """Attention over sequences packed one after another (FlashAttention's varlen layout), with
    no padding: q [total_q, Hq, D], k/v [total_kv, Hkv, D]; sequence b owns rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v
    (cu_seqlens int32 [batch + 1], from 0, non-decreasing, ending at the total; max_seqlen_* the
    longest lengths, at least every sequence's). Each sequence gets exactly what `attention`
    gives it alone as batch entry b: causal and window aligned bottom-right with its own lengths,
    `mask` (bool or additive, broadcastable to [batch, Hq, max_seqlen_q, max_seqlen_k]) read at
    its local positions, the dropout draw of batch entry b. Other arguments as in `attention`.
    Returns [total_q, Hq, D] in q's dtype. Differentiable in q, k, v and an additive mask.

    The cu_seqlens values are checked on every eager call (on a GPU that reads them back:
    one synchronization) unless check_offsets=False, for callers that built them; under
    torch.compile only their dtype and shape are."""
    layout = _check_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_scalars(causal, scale, dropout_p, window, softcap)
    if check_offsets and not torch.compiler.is_compiling():
        _check_tensors(q, k, v, mask, layout)  # their shapes first: the offsets' errors use them
        for name, cu, t, longest in zip(("cu_seqlens_q", "cu_seqlens_k"), layout[:2], (q, k),
                                        layout[2:]):
            _check_offsets(name, cu.tolist(), t.shape[0], longest)
    return _dispatch(q, k, v, mask, layout, causal, scale, dropout_p, window, softcap,
                     dropout_seed, backend)


def _dispatch(q, k, v, mask, layout, causal, scale, dropout_p, window, softcap, dropout_seed,
              backend):
    """Inputs with checked scalars -> the chosen backend. The tensors are checked in Python
    first, except on the cpu and cuda backends in eager mode, whose C++ binding checks them
    (per-call cost: decoding); a failure there is checked again in Python, so that its error is
    worded as on every backend."""
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")
    if not isinstance(q, Tensor) or q.dim() == 0:
        _check_tensors(q, k, v, mask, layout)
    name = _backend.resolve(_case(q, k, layout), backend, q.device)
    if name != "reference":
        name = _reference_if_unsupported(q, name)
    if (name == "cpu" or name == "cuda") and not torch.compiler.is_compiling():
        try:
            return _run(q, k, v, mask, layout, causal, scale, dropout_p, window, softcap,
                        dropout_seed, name)
        except Exception:
            _check_tensors(q, k, v, mask, layout)
            raise
    _check_tensors(q, k, v, mask, layout)
    return _run(q, k, v, mask, layout, causal, scale, dropout_p, window, softcap, dropout_seed,
                name)


def _run(q, k, v, mask, layout, causal, scale, dropout_p, window, softcap, dropout_seed, name):
    """Through the custom op when compiling, through _EagerAttention when autograd needs a
    graph, else straight to the kernels."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    dropout_seed = _check_seed(dropout_seed)
    if dropout_p and dropout_seed is None:
        dropout_seed = int(torch.randint(0, 2 ** 32, (), dtype=torch.int64))
    seed = int(dropout_seed or 0) & 0xFFFFFFFF
    if name == "reference":
        if layout is not None:
            return reference.varlen_attention(q, k, v, *layout[:2], mask, causal, scale,
                                              dropout_p, window, softcap, seed)
        return reference.attention(q, k, v, mask, causal, scale, dropout_p, window, softcap, seed)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    args = (q, k, v, mask, *(layout or (None, None, 0, 0)), causal, scale, int(window),
            float(softcap), float(dropout_p), seed, name)
    if torch.compiler.is_compiling():
        return _attention(*args)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
            mask is not None and mask.requires_grad)):
        return _EagerAttention.apply(*args)[0]
    return _run_forward(*args)[0]


def _check_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """The packed layout's arguments with their types and shapes checked (not their values):
    (cu_seqlens_q, cu_seqlens_k, max_q, max_k)."""
    for name, cu, t in (("cu_seqlens_q", cu_seqlens_q, q), ("cu_seqlens_k", cu_seqlens_k, k)):
        if not isinstance(cu, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise ValueError(f"{name} must be int32 (as FlashAttention's varlen API), got "
                             f"{cu.dtype}")
        if cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be 1-D [batch + 1], got shape {tuple(cu.shape)}")
        if isinstance(t, Tensor) and cu.device != t.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {t.device}")
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's length {cu_seqlens_q.shape[0]} "
                         f"(batch + 1), got {cu_seqlens_k.shape[0]}")
    _check_number("max_seqlen_q", max_seqlen_q, low=0, integer=True)
    _check_number("max_seqlen_k", max_seqlen_k, low=0, integer=True)
    cu_seqlens_q = cu_seqlens_q if cu_seqlens_q.is_contiguous() else cu_seqlens_q.contiguous()
    cu_seqlens_k = cu_seqlens_k if cu_seqlens_k.is_contiguous() else cu_seqlens_k.contiguous()
    return cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k)


def _check_offsets(name, offsets, total, longest):
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at the number of packed tokens ({total}), got "
                         f"{offsets[-1]}")
    if lengths and max(lengths) > longest:
        max_name = "max_seqlen_" + name[-1]
        raise ValueError(f"{max_name} ({longest}) is less than the longest sequence in {name} "
                         f"({max(lengths)})")


def _case(q, k, layout):
    """The case `auto` chooses a backend for (backends.AUTO_ORDER): "attention_decode" for one
    query row per sequence, else "attention" sized by its flops, 4 q.numel() S_kv (QK^T and PV;
    packed: S_kv the longest key sequence)."""
    if layout is not None:
        rows, keys = layout[2], layout[3]
    elif isinstance(q, Tensor) and q.dim() == 4 and isinstance(k, Tensor) and k.dim() == 4:
        rows, keys = q.shape[2], k.shape[2]
    else:  # (malformed: checked after)
        return "attention"
    return "attention_decode" if rows == 1 else backends.sized("attention", 4 * q.numel() * keys)


def _reference_if_unsupported(q, name):
    """`name`, or "reference" (with a one-time warning naming why) for calls no kernel takes."""
    if q.dtype == torch.float64:
        reason = "take float32, float16 and bfloat16; float64 inputs run on the reference backend"
    elif q.shape[-1] > MAX_HEAD_DIM:
        reason = f"take head_dim up to {MAX_HEAD_DIM}; larger ones run on the reference backend"
    else:
        return name
    backends.warn_once(("attention", reason), f"transfuse: the attention kernels {reason}")
    return "reference"

