"""Triton kernel of the rotary position embedding (RoPE, the "rotate half" layout of Llama,
Mistral, Qwen2, Gemma), applied to q and k in one launch; its inverse (the transpose) is the
backward.

The math, including where values are rounded, is that of csrc/common/rotary.h: with h = D / 2,
c = cos[b, s], n = sin[b, s], every row x of q and k at (b, s) becomes, in fp32 and rounded once,
    forward:  [x1 * c1 - x2 * n1,  x2 * c2 + x1 * n2]     (x1 = x[:h], x2 = x[h:], likewise c, n)
    inverse:  [x1 * c1 + x2 * n2,  x2 * c2 - x1 * n1]
both of the form [x1 * c1 + x2 * p,  x2 * c2 + x1 * r] with (p, r) = (-n1, n2) or (n2, -n1).

Launcher (called by transfuse.ops.rotary):
    rotary(q, k, cos, sin, inverse) -> (q_out, k_out)
        q [B, Hq, S, D], k [B, Hk, S, D]: any strides with a contiguous last dimension (the
        transposed views of [B, S, H, D] projections); cos, sin [Bc, S, D], Bc 1 (shared by the
        batch) or B; outputs contiguous [B, Hq, S, D] and [B, Hk, S, D] of q's dtype.

Tiling: program (t, j) handles BLOCK_POS positions (b * S + s, from t * BLOCK_POS) and one block
of BLOCK_HEADS heads, of q for j < cdiv(Hq, BLOCK_HEADS) and of k after that (a uniform branch):
it loads the positions' cos / sin row halves once ([BLOCK_POS, 1, HALF_BLOCK], broadcast over the
heads), then the [BLOCK_POS, BLOCK_HEADS, HALF_BLOCK] tiles of the rows' two halves
(HALF_BLOCK = next_power_of_2(D / 2), masked beyond h). On GPU BLOCK_POS is 1 (B * S programs
along the grid's first axis, cdiv(Hq, BLOCK_HEADS) + cdiv(Hk, BLOCK_HEADS) along its second: a
decoding step still gets a few), BLOCK_HEADS depends on HALF_BLOCK alone and `inverse` is a
run-time flag, so one variant is compiled per dtype and head-dim bucket (D of 66..128 share
one). Under TRITON_INTERPRET=1 (CPU tensors) a block spans all the heads and as many positions as
fit, to keep the programs few; bf16 rounding goes through kernels/norm.py's helpers.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .norm import _convert

# GPU tiles: about this many elements per row half of a program's heads (so twice that loaded and
# stored), at most MAX_BLOCK_HEADS heads; 4 warps for the full tiles.
BLOCK_HALF_ELEMENTS = 1024
MAX_BLOCK_HEADS = 64
NUM_WARPS = 4
# Interpreter tiles: up to this many elements per row half (all the heads, and as many
# positions as fit).
INTERPRETER_BLOCK_HALF_ELEMENTS = 32768

# Dtype codes passed to the kernel as constexpr (kernels/norm.py's).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# For the heads head0 .. head0 + BLOCK_HEADS - 1 (< n_heads) of x at the tile's positions (b, s)
# ([BLOCK_POS, 1, 1] int64), out (contiguous [B, n_heads, S, 2h]) gets
# [x1 * c1 + x2 * p,  x2 * c2 + x1 * r] in fp32, rounded once; c1, c2, p, r are fp32
# [BLOCK_POS, 1, HALF_BLOCK] rows, i the column ids [1, 1, HALF_BLOCK], pos_col_mask the
# positions' and columns' mask (position < B * S and i < h).
@triton.jit
def _rotate_heads(x_ptr, out_ptr, b, s, head0, n_heads, n_seq, half, stride_b, stride_h,
                  stride_s, i, pos_col_mask, c1, c2, p, r, DTYPE: tl.constexpr,
                  BLOCK_HEADS: tl.constexpr):
    heads = (head0 + tl.arange(0, BLOCK_HEADS)).to(tl.int64)[None, :, None]
    mask = (heads < n_heads) & pos_col_mask
    x_offsets = b * stride_b + s * stride_s + heads * stride_h + i
    x1 = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + (x_offsets + half), mask=mask, other=0.0).to(tl.float32)
    out_offsets = ((b * n_heads + heads) * n_seq + s) * (2 * half) + i
    tl.store(out_ptr + out_offsets, _convert(x1 * c1 + x2 * p, DTYPE), mask=mask)
    tl.store(out_ptr + (out_offsets + half), _convert(x2 * c2 + x1 * r, DTYPE), mask=mask)


# Program (t, j): positions [t * BLOCK_POS, (t + 1) * BLOCK_POS) (position b * S + s) and heads
# [j * BLOCK_HEADS, (j + 1) * BLOCK_HEADS) of q, or of k for j >= cdiv(Hq, BLOCK_HEADS) (counted
# from there); with h = D / 2, c = cos[b, s], n = sin[b, s], for every row x of those:
#   forward:  out = [x1 * c1 - x2 * n1,  x2 * c2 + x1 * n2]
#   inverse:  out = [x1 * c1 + x2 * n2,  x2 * c2 - x1 * n1]   (the transpose: the backward)
# (`inverse` is not specialized: the JIT would make inverse = 1 a constexpr, a second build)
@triton.jit(do_not_specialize=["inverse"])
def _rotary_kernel(
    q_ptr,          # [B, Hq, S, D] q, dtype, strides q_stride_b / _h / _s and 1
    k_ptr,          # [B, Hk, S, D] k, dtype, strides k_stride_b / _h / _s and 1
    cos_ptr,        # [Bc, S, D] cos, dtype, strides cos_stride_b (0 for Bc = 1) / _s and 1
    sin_ptr,        # [Bc, S, D] sin, dtype, strides sin_stride_b (0 for Bc = 1) / _s and 1
    q_out_ptr,      # [B, Hq, S, D] output, dtype, contiguous
    k_out_ptr,      # [B, Hk, S, D] output, dtype, contiguous
    q_stride_b,
    q_stride_h,
    q_stride_s,
    k_stride_b,
    k_stride_h,
    k_stride_s,
    cos_stride_b,
    cos_stride_s,
    sin_stride_b,
    sin_stride_s,
    n_positions,    # B * S
    n_seq,          # S
    q_heads,        # Hq
    k_heads,        # Hk
    half,           # h = D / 2
    inverse,        # int 0 / 1, run time: the transpose (not a bool: triton 3.6's interpreter
                    # cannot take bool arguments)
    DTYPE: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_POS: tl.constexpr,
):
    positions = tl.program_id(0) * BLOCK_POS + tl.arange(0, BLOCK_POS)
    block = tl.program_id(1)
    b = (positions // n_seq).to(tl.int64)[:, None, None]
    s = (positions % n_seq).to(tl.int64)[:, None, None]
    i = tl.arange(0, HALF_BLOCK)[None, None, :]
    pos_col_mask = (positions < n_positions)[:, None, None] & (i < half)

    cos_offsets = b * cos_stride_b + s * cos_stride_s + i
    sin_offsets = b * sin_stride_b + s * sin_stride_s + i
    c1 = tl.load(cos_ptr + cos_offsets, mask=pos_col_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + (cos_offsets + half), mask=pos_col_mask, other=0.0).to(tl.float32)
    n1 = tl.load(sin_ptr + sin_offsets, mask=pos_col_mask, other=0.0).to(tl.float32)
    n2 = tl.load(sin_ptr + (sin_offsets + half), mask=pos_col_mask, other=0.0).to(tl.float32)
    if inverse != 0:
        p = n2
        r = -n1
    else:
        p = -n1
        r = n2

    q_blocks = tl.cdiv(q_heads, BLOCK_HEADS)
    if block < q_blocks:
        _rotate_heads(q_ptr, q_out_ptr, b, s, block * BLOCK_HEADS, q_heads, n_seq, half,
                      q_stride_b, q_stride_h, q_stride_s, i, pos_col_mask, c1, c2, p, r, DTYPE,
                      BLOCK_HEADS)
    else:
        _rotate_heads(k_ptr, k_out_ptr, b, s, (block - q_blocks) * BLOCK_HEADS, k_heads, n_seq,
                      half, k_stride_b, k_stride_h, k_stride_s, i, pos_col_mask, c1, c2, p, r,
                      DTYPE, BLOCK_HEADS)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------

def _dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"the triton rotary kernel takes float32, float16 or bfloat16, got "
                        f"{dtype}") from None


def _block(positions: int, half: int, heads: int, device: torch.device):
    """(BLOCK_POS, HALF_BLOCK, BLOCK_HEADS, num_warps): one position and heads by the head dim
    alone on GPU; under the interpreter all the heads and as many positions as fit in
    INTERPRETER_BLOCK_HALF_ELEMENTS."""
    half_block = triton.next_power_of_2(half)
    if device.type == "cuda":
        block_heads = max(1, min(MAX_BLOCK_HEADS, BLOCK_HALF_ELEMENTS // half_block))
        num_warps = max(1, min(NUM_WARPS, block_heads * half_block // 256))
        return 1, half_block, block_heads, num_warps
    block_heads = max(1, min(triton.next_power_of_2(heads),
                             INTERPRETER_BLOCK_HALF_ELEMENTS // half_block))
    block_pos = max(1, min(triton.next_power_of_2(positions),
                           INTERPRETER_BLOCK_HALF_ELEMENTS // (half_block * block_heads)))
    return block_pos, half_block, block_heads, 1


def _on_device(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def rotary(q, k, cos, sin, inverse: bool):
    """Rotary position embedding of q [B, Hq, S, D] and k [B, Hk, S, D] (last dimension
    contiguous, other strides any) by cos, sin [Bc, S, D] (Bc 1 or B; q's dtype); inverse: the
    transpose (the backward). -> (q_out, k_out), contiguous, q's dtype."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.dim() != 3:
        raise ValueError(f"rotary takes q, k [B, H, S, D] and cos, sin [Bc, S, D], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    batch, q_heads, seq, head_dim = q.shape
    k_heads = k.shape[1]
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim) or head_dim % 2:
        raise ValueError(f"rotary takes q [B, Hq, S, D] and k [B, Hk, S, D] with D even, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape[0] not in (1, batch) or tuple(t.shape[1:]) != (seq, head_dim):
            raise ValueError(f"rotary takes {name} [1 or B, S, D] = [1 or {batch}, {seq}, "
                             f"{head_dim}], got {tuple(t.shape)}")
    if any(t.dtype != q.dtype for t in (k, cos, sin)):
        raise TypeError(f"rotary takes q, k, cos and sin of one dtype, got {q.dtype}, {k.dtype}, "
                        f"{cos.dtype} and {sin.dtype}")
    code = _dtype_code(q.dtype)
    q_out = torch.empty((batch, q_heads, seq, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((batch, k_heads, seq, head_dim), dtype=q.dtype, device=q.device)
    if batch * seq * head_dim == 0 or q_heads + k_heads == 0:
        return q_out, k_out

    q, k, cos, sin = (_last_contiguous(t) for t in (q, k, cos, sin))
    half = head_dim // 2
    positions = batch * seq
    block_pos, half_block, block_heads, num_warps = _block(positions, half,
                                                           max(q_heads, k_heads), q.device)
    grid = (triton.cdiv(positions, block_pos),
            triton.cdiv(q_heads, block_heads) + triton.cdiv(k_heads, block_heads))
    # a batch stride is unused with one batch row (Bc = 1: broadcast)
    cos_strides = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1))
    sin_strides = (sin.stride(0) if sin.shape[0] > 1 else 0, sin.stride(1))
    with _on_device(q):
        _rotary_kernel[grid](q, k, cos, sin, q_out, k_out, *q.stride()[:3], *k.stride()[:3],
                             *cos_strides, *sin_strides, positions, seq, q_heads, k_heads, half,
                             int(bool(inverse)), DTYPE=code, HALF_BLOCK=half_block,
                             BLOCK_HEADS=block_heads, BLOCK_POS=block_pos, num_warps=num_warps)
    return q_out, k_out
