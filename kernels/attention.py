"""Triton kernels of the fused attention (FlashAttention-style), forward and backward.

The math, including the mask semantics (bool or additive masks read through broadcast strides,
causal aligned bottom-right, a sliding window on both sides, softcap, the counter-based dropout
hash), is that of csrc/common/attention.h; scores, softmax statistics and accumulations are fp32.
The forward walks the key tiles of one query tile with the online softmax and keeps the row
log-sum-exp; the backward computes each row's delta = rowsum(dO * O), then recomputes
P = exp(s - lse) tile by tile, with one kernel for dQ (per query tile, over the key tiles; it also
writes dS, the gradient of an additive mask, when asked) and then one for dK/dV (per key tile,
over the query heads of its group and the query tiles). Key (or query) tiles that the causal /
window masks hide entirely are skipped; the tiles they leave wholly visible run without the
positional masking. Causal and the window are one band of visible diagonals given as runtime
arguments (_band), not constexprs: each build serves plain, causal and windowed calls alike.
Rows whose every score carries a huge additive mask value (finfo.min) have an lse that lost
log(l) to fp32 rounding; the backward corrects P on those rows (_lse_fix), so it matches the
reference there too.

Launchers (called by transfuse.ops.attention; q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] with a
contiguous last dimension and any other strides, mask None or a [B, Hq, Sq, Skv] view):
    attention_forward(q, k, v, mask, causal, scale, window, softcap, dropout_p, seed)
        -> (out [B, Hq, Sq, D] stored as [B, Sq, Hq, D], lse [B, Hq, Sq] fp32)
    attention_backward(dout, q, k, v, out, lse, mask, causal, scale, window, softcap, dropout_p,
                       seed, bias_grad)
        -> (dq, dk, dv contiguous in q's dtype, dbias [B, Hq, Sq, Skv] fp32 or empty)
Packed sequences (FlashAttention's varlen layout, transfuse.ops.varlen_attention): q
[total_q, Hq, D], k/v [total_kv, Hkv, D] with a contiguous last dimension and any other strides;
cu_seqlens_q/k int32 [B + 1] contiguous on q's device (sequence b owns rows cu_seqlens[b] to
cu_seqlens[b + 1]); max_seqlen_q/k at least every sequence's length; mask None or a
[B, Hq, max_seqlen_q, max_seqlen_k] view read at each sequence's local positions. Each sequence
gets what the padded launchers give it as batch entry b (its own causal / window alignment, the
dropout draw of batch entry b):
    varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             mask, causal, scale, window, softcap, dropout_p, seed)
        -> (out [total_q, Hq, D] contiguous, lse [Hq, total_q] fp32)
    varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                              max_seqlen_k, mask, causal, scale, window, softcap, dropout_p, seed,
                              bias_grad)
        -> (dq [total_q, Hq, D], dk, dv [total_kv, Hkv, D] contiguous in q's dtype,
            dbias [B, Hq, max_seqlen_q, max_seqlen_k] fp32 (local positions) or empty)
Both layouts run the same kernels: the packed one passes the cu_seqlens pointers (None for the
padded one, which Triton specializes as a constexpr, so the padded kernels are unchanged), batch
strides 0, and a grid over (batch, head, tile of the longest length) whose programs past their
sequence's end exit at once.

Under TRITON_INTERPRET=1 they run on CPU tensors, with small tiles so that several get exercised.
The interpreter converts fp32 to bf16 by truncating the mantissa, whereas GPUs round to nearest
even, so there (only) bf16 values are rounded to nearest even by hand (`_round_bf16`) before every
fp32 -> bf16 conversion; the conversion that follows is then exact. Its tl.dot cannot multiply
bf16 either (it holds bf16 as raw 16-bit integers), so there bf16 tiles are widened to fp32 (exact)
before they meet a dot, and P / dS are rounded to bf16 values kept in fp32 (`_operand`).
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .norm import _round_bf16

UINT32_MAX = 2 ** 32 - 1

# Dtype codes passed to the kernels as constexpr.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_MASK_DTYPES = (torch.bool, torch.float32, torch.float16, torch.bfloat16)

# Tiles on GPU, (BLOCK_M, BLOCK_N, num_warps, num_stages) by BLOCK_D (head_dim rounded up to a
# power of two, at least 16; one row for BLOCK_D <= 64, whose 16/32-wide heads fit the 64-wide
# one's tiles with room to spare): (fp16/bf16 inputs, fp16/bf16 with a mask, dropout or softcap,
# fp32 inputs). BLOCK_M counts query rows, BLOCK_N key rows. Chosen so that the sm_90 builds of
# the forward keep within the register file (no spills) and the shared memory of an H100; fp32
# dots ("ieee") run on FMA units and take small tiles.
FORWARD_CONFIGS = {64: ((128, 64, 8, 3), (128, 64, 8, 3), (64, 32, 8, 2)),
                   128: ((128, 64, 8, 3), (128, 32, 8, 3), (32, 32, 8, 1)),
                   256: ((64, 64, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2))}
# dK/dV: BLOCK_N key rows per program, walking BLOCK_M query rows at a time.
DKDV_CONFIGS = {64: ((32, 128, 8, 3), (16, 128, 8, 2), (16, 32, 8, 2)),
                128: ((16, 64, 8, 2), (16, 64, 8, 2), (32, 32, 8, 2)),
                256: ((16, 32, 8, 2), (16, 32, 8, 2), (16, 16, 8, 2))}
# dQ: BLOCK_M query rows per program, walking BLOCK_N key rows at a time.
DQ_CONFIGS = {64: ((128, 32, 8, 3), (128, 32, 8, 3), (64, 16, 8, 2)),
              128: ((128, 32, 8, 3), (128, 32, 8, 3), (32, 16, 8, 2)),
              256: ((64, 32, 8, 2), (64, 32, 8, 2), (64, 16, 8, 2))}
# The delta kernel (GPU): (BLOCK_M rows, BLOCK_D head dims per step), the same for every head dim.
DELTA_TILE = (32, 64)
# "No bound" of the causal / window band (_band).
_NO_BOUND = 2 ** 29
# Under the interpreter (CPU tensors) the cost is per program and per operation: small fixed
# tiles, enough to walk several of them in the tests' shapes.
INTERPRETER_BLOCK_M = 32
INTERPRETER_BLOCK_N = 32


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

# v (fp32) converted to the dtype with code DTYPE (0 fp32, 1 fp16, 2 bf16), rounding to nearest;
# bf16 is rounded by hand under the interpreter (INTERPRET), by the conversion on GPU.
@triton.jit
def _convert(v, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    if DTYPE == 1:
        converted = v.to(tl.float16)
    elif DTYPE == 2:
        if INTERPRET:
            converted = _round_bf16(v).to(tl.bfloat16)
        else:
            converted = v.to(tl.bfloat16)
    else:
        converted = v
    return converted


# v (fp32: P or dS) as an operand of tl.dot next to tiles of the inputs: rounded to the input dtype
# (code DTYPE) and converted to it, except bf16 under the interpreter, which stays fp32 like the
# loaded tiles (_load_rows widens them: the interpreter's dot cannot multiply bf16).
@triton.jit
def _operand(v, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    if DTYPE == 1:
        operand = v.to(tl.float16)
    elif DTYPE == 2:
        if INTERPRET:
            operand = _round_bf16(v)
        else:
            operand = v.to(tl.bfloat16)
    else:
        operand = v
    return operand


# hash32 of common/attention.h ("lowbias32"), on uint32 values (wrapping multiplies):
#   x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16
@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


# dropout_row_key of common/attention.h for query rows `rows` of (batch, head) batch_head:
#   hash32(seed ^ hash32(batch_head ^ hash32(row)))     (uint32)
@triton.jit
def _dropout_row_keys(seed, batch_head, rows):
    inner = _hash32(batch_head.to(tl.uint32) ^ _hash32(rows.to(tl.uint32)))
    return _hash32(seed.to(tl.uint32) ^ inner)


# tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2 |x|) in (0, 1]: no overflow, limits +-1 for
# large |x|, absolute error about 1e-7 near 0.
@triton.jit
def _tanh(x):
    e = tl.exp2(tl.abs(x) * (-2.0 * 1.4426950408889634))  # exp(-2 |x|), log2(e) = 1.44...
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


# The scores of a tile, from qk = <q[i], k[j]> (fp32), rows i and cols j shaped to broadcast
# against qk ([M, 1] x [1, N] or [1, M] x [N, 1]):
#   s = scale * qk;  t = tanh(s / softcap), s = softcap * t    (HAS_SOFTCAP; t is returned)
#   s += mask[i, j]                                           (MASK_KIND 2: additive)
#   s = -inf where key j is not visible to row i: mask[i, j] false (MASK_KIND 1: bool), or, on a
#       POSITIONAL tile, j >= seq_kv or diff = i + offset - j outside the band [diff_lo, diff_hi]
# (offset = seq_kv - seq_q; the band holds causal and the window, see _band). Mask elements
# outside [seq_q, seq_kv] read as 0 / false.
@triton.jit
def _scores(qk, rows, cols, mask_base, stride_mm, stride_mn, seq_q, seq_kv, offset, diff_lo,
            diff_hi, scale, softcap, MASK_KIND: tl.constexpr, POSITIONAL: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr):
    s = qk * scale
    if HAS_SOFTCAP:
        tanh = _tanh(s * (1.0 / softcap))
        s = softcap * tanh
    else:
        tanh = s  # unused
    if MASK_KIND != 0:
        in_bounds = (rows < seq_q) & (cols < seq_kv)
        mask_ptrs = mask_base + rows.to(tl.int64) * stride_mm + cols.to(tl.int64) * stride_mn
        if MASK_KIND == 1:
            attend = tl.load(mask_ptrs, mask=in_bounds, other=0) != 0
        else:
            s += tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32)
    if POSITIONAL:
        # diff_lo <= diff <= diff_hi as one unsigned compare (as many operations as causal alone)
        band = (rows + (offset - diff_lo) - cols).to(tl.uint32, bitcast=True)
        visible = (cols < seq_kv) & (band <= (diff_hi - diff_lo).to(tl.uint32, bitcast=True))
        if MASK_KIND == 1:
            visible = visible & attend
        s = tl.where(visible, s, float("-inf"))
    elif MASK_KIND == 1:
        s = tl.where(attend, s, float("-inf"))
    return s, tanh


# Rows [index * stride + dims] of a [rows, head_dim] matrix at `base`, as a tile shaped like
# index + dims (index [N, 1] and dims [1, D] give [N, D]; [1, N] and [D, 1] its transpose);
# index >= n (when CHECK_INDEX) and dims >= head_dim (when CHECK_DIMS) read as 0. bf16 tiles are
# widened to fp32 under the interpreter (INTERPRET and DTYPE 2), whose dot cannot multiply bf16.
@triton.jit
def _load_rows(base, index, stride, n, dims, head_dim, CHECK_INDEX: tl.constexpr,
               CHECK_DIMS: tl.constexpr, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    ptrs = base + index.to(tl.int64) * stride + dims
    if CHECK_INDEX and CHECK_DIMS:
        tile = tl.load(ptrs, mask=(index < n) & (dims < head_dim), other=0.0)
    elif CHECK_INDEX:
        tile = tl.load(ptrs, mask=index < n, other=0.0)
    elif CHECK_DIMS:
        tile = tl.load(ptrs, mask=dims < head_dim, other=0.0)
    else:
        tile = tl.load(ptrs)
    if INTERPRET and DTYPE == 2:
        tile = tile.to(tl.float32)
    return tile


# The tiles of the other sequence that a tile of this one meets: the range [lo, hi) of indices
# visible to some element of the tile and the range [full_lo, full_hi) visible to all of them
# (clamped to >= 0), as three runs of tile starts, multiples of BLOCK:
#   [lo_tile, full_start): POSITIONAL,  [full_start, full_end): not,  [full_end, hi): POSITIONAL
# covering [floor(lo / BLOCK) * BLOCK, hi).
@triton.jit
def _tile_runs(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    lo_tile = (lo // BLOCK) * BLOCK
    full_start = tl.minimum(tl.maximum(tl.cdiv(full_lo, BLOCK) * BLOCK, lo_tile), hi)
    full_end = tl.maximum(tl.minimum((full_hi // BLOCK) * BLOCK, hi), full_start)
    return lo_tile, full_start, full_end


# Key indices met by query rows [row_start, row_start + BLOCK_M) (offset = seq_kv - seq_q):
# row i sees keys j in [0, seq_kv) with diff_lo <= i + offset - j <= diff_hi.
# -> (lo, full_lo, full_hi, hi)
@triton.jit
def _key_range(row_start, seq_kv, offset, diff_lo, diff_hi, BLOCK_M: tl.constexpr):
    row_end = row_start + BLOCK_M
    lo = tl.maximum(row_start + offset - diff_hi, 0)
    full_lo = tl.maximum(row_end - 1 + offset - diff_hi, 0)
    full_hi = tl.minimum(row_start + offset - diff_lo + 1, seq_kv)
    hi = tl.minimum(row_end + offset - diff_lo, seq_kv)
    return lo, full_lo, tl.maximum(full_hi, 0), hi


# Query indices met by key rows [col_start, col_start + BLOCK_N): key j is seen by rows i in
# [0, seq_q) with diff_lo <= i + offset - j <= diff_hi. -> (lo, full_lo, full_hi, hi)
@triton.jit
def _query_range(col_start, seq_q, offset, diff_lo, diff_hi, BLOCK_N: tl.constexpr):
    col_end = col_start + BLOCK_N
    lo = tl.maximum(col_start - offset + diff_lo, 0)
    full_lo = tl.maximum(col_end - 1 - offset + diff_lo, 0)
    full_hi = tl.minimum(col_start - offset + diff_hi + 1, seq_q)
    hi = tl.minimum(col_end - offset + diff_hi, seq_q)
    return lo, full_lo, tl.maximum(full_hi, 0), hi


# The rows of sequence `batch`: (q_start, len_q, kv_start, len_kv), its first query and key row
# in q and k (int64) and its lengths. Packed layout (cu_seqlens_q_ptr given): read from
# cu_seqlens, the lengths clamped to seq_q / seq_kv, the grid's longest lengths, so that a too
# small max_seqlen cannot take the mask / dbias accesses off their [seq_q, seq_kv] planes.
# Padded layout (cu_seqlens_q_ptr None, which Triton specializes as a constexpr, so the padded
# kernels compile exactly as without this): 0, seq_q, 0, seq_kv.
@triton.jit
def _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, batch, seq_q, seq_kv):
    if cu_seqlens_q_ptr is None:
        q_start = 0
        len_q = seq_q
        kv_start = 0
        len_kv = seq_kv
    else:
        q_start = tl.load(cu_seqlens_q_ptr + batch)
        len_q = tl.minimum(tl.load(cu_seqlens_q_ptr + batch + 1) - q_start, seq_q)
        kv_start = tl.load(cu_seqlens_k_ptr + batch)
        len_kv = tl.minimum(tl.load(cu_seqlens_k_ptr + batch + 1) - kv_start, seq_kv)
        q_start = q_start.to(tl.int64)
        kv_start = kv_start.to(tl.int64)
    return q_start, len_q, kv_start, len_kv


# Offset of the row statistics (lse, delta, _lse_fix) of row 0 of (batch, head), batch_head =
# batch * heads_q + head: padded [B, Hq, Sq] -> batch_head * seq_q; packed [Hq, total_q] ->
# head * total_q + q_start.
@triton.jit
def _stats_offset(cu_seqlens_q_ptr, batch_head, head, q_start, seq_q, total_q):
    if cu_seqlens_q_ptr is None:
        offset = batch_head.to(tl.int64) * seq_q
    else:
        offset = head.to(tl.int64) * total_q + q_start
    return offset


# Offsets [N, D] of rows `index` [N] and dims [D] of (batch, head) in a contiguous gradient
# (dq, dk, dv), batch_head = batch * heads + head: padded [B, heads, seq, D] ->
# (batch_head * seq + index) * head_dim + dims; packed [total, heads, D] ->
# ((start + index) * heads + head) * head_dim + dims, start the sequence's first row.
@triton.jit
def _gradient_offsets(cu_seqlens_ptr, batch_head, head, heads, start, index, seq, head_dim, dims):
    if cu_seqlens_ptr is None:
        rows = batch_head.to(tl.int64) * seq + index
    else:
        rows = (start + index) * heads + head
    return rows[:, None] * head_dim + dims[None, :]


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

# The query tile, (batch, head) and key/value head of this program (forward and dQ grids: one
# program per query tile of each (batch, head)); causal calls take the longest tiles first.
@triton.jit
def _query_tile(seq_q, heads_q, group, diff_lo, BLOCK_M: tl.constexpr):
    row_tiles = tl.cdiv(seq_q, BLOCK_M)
    pid = tl.program_id(0)
    tile = pid % row_tiles
    if diff_lo >= 0:  # causal (see _band)
        tile = row_tiles - 1 - tile
    batch_head = pid // row_tiles
    head = batch_head % heads_q
    return tile, batch_head, batch_head // heads_q, head, head // group


# The key tiles [start, end) of one query tile, folded into the running state (online softmax):
#   s = _scores(q k^T) [BLOCK_M, BLOCK_N];  m_new = max(m, rowmax(s))   (-inf read as 0 below)
#   alpha = exp(m - m_new);  p = exp(s - m_new);  l = l * alpha + rowsum(p)
#   acc = acc * alpha + (p * keep) v        (keep only with HAS_DROPOUT; 1 / (1 - p) comes last)
@triton.jit
def _forward_tiles(acc, l_i, m_i, q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm,
                   stride_mn, rows, row_keys, start, end, seq_q, seq_kv, head_dim, offset,
                   diff_lo, diff_hi, scale, softcap, threshold, POSITIONAL: tl.constexpr,
                   MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   DTYPE: tl.constexpr, INTERPRET: tl.constexpr, EVEN_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    for col_start in range(start, end, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        k_t = _load_rows(k_base, cols[None, :], stride_kn, seq_kv, dims[:, None], head_dim,
                         POSITIONAL, not EVEN_D, DTYPE, INTERPRET)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        s, _ = _scores(qk, rows[:, None], cols[None, :], mask_base, stride_mm, stride_mn, seq_q,
                       seq_kv, offset, diff_lo, diff_hi, scale, softcap, MASK_KIND, POSITIONAL,
                       HAS_SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            # keep[i, j] = hash32(row_key[i] + j * 0x9e3779b9) >= threshold   (uint32, wrapping)
            bits = _hash32(row_keys[:, None] + cols[None, :].to(tl.uint32) * 0x9E3779B9)
            p = tl.where(bits >= threshold.to(tl.uint32), p, 0.0)
        v = _load_rows(v_base, cols[:, None], stride_vn, seq_kv, dims[None, :], head_dim,
                       POSITIONAL, not EVEN_D, DTYPE, INTERPRET)
        acc = tl.dot(_operand(p, DTYPE, INTERPRET), v, acc * alpha[:, None],
                     input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Forward of one query tile (BLOCK_M rows) of one (batch, query head); the program index runs
# over query tiles fastest (heaviest causal tiles first), then batch * heads_q. Per row i:
#   running m, l, acc over the visible key tiles (_forward_tiles)
#   out[i] = acc / l / (1 - dropout_p)        (0 when l = 0: no visible key)
#   lse[i] = m + log(l)                       (+inf when l = 0)
# Packed layout (cu_seqlens_q_ptr given): q, k, v, out are [total, heads, D] views passed with
# batch strides 0, seq_q / seq_kv are the longest lengths (the grid's extent), each sequence runs
# with its own lengths (_sequence) and a tile past its end exits at once.
@triton.jit(do_not_specialize=["diff_lo", "diff_hi", "seed", "threshold", "total_q"])
def _attention_forward_kernel(
    q_ptr,        # [B, Hq, Sq, D] by strides, dtype (packed: [total_q, Hq, D])
    k_ptr,        # [B, Hkv, Skv, D] by strides, dtype (packed: [total_kv, Hkv, D])
    v_ptr,        # [B, Hkv, Skv, D] by strides, dtype (packed: [total_kv, Hkv, D])
    mask_ptr,     # [B, Hq, Sq, Skv] by strides: uint8 (bool) or additive float (iff MASK_KIND)
    out_ptr,      # [B, Hq, Sq, D] by strides, dtype (packed: [total_q, Hq, D])
    lse_ptr,      # [B, Hq, Sq] fp32, contiguous (packed: [Hq, total_q])
    cu_seqlens_q_ptr,  # packed: [B + 1] int32, query rows of sequence b from [b]; padded: None
    cu_seqlens_k_ptr,  # packed: [B + 1] int32, key rows of sequence b from [b]; padded: None
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mb, stride_mh, stride_mm, stride_mn,
    heads_q, group, seq_q, seq_kv, head_dim, total_q,
    scale, diff_lo, diff_hi, softcap, keep_scale, seed, threshold,
    MASK_KIND: tl.constexpr,     # 0 none, 1 bool, 2 additive
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,        # head_dim == BLOCK_D: no masking along head_dim
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile, batch_head, batch, head, kv_head = _query_tile(seq_q, heads_q, group, diff_lo, BLOCK_M)
    row_start = tile * BLOCK_M
    q_start, len_q, kv_start, len_kv = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, batch,
                                                 seq_q, seq_kv)
    if cu_seqlens_q_ptr is not None:
        if row_start >= len_q:
            return
    offset = len_kv - len_q

    rows = row_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_base = (q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
              + q_start * stride_qm)
    k_base = (k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
              + kv_start * stride_kn)
    v_base = (v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
              + kv_start * stride_vn)
    mask_base = mask_ptr + batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh
    q = _load_rows(q_base, rows[:, None], stride_qm, len_q, dims[None, :], head_dim, True,
                   not EVEN_D, DTYPE, INTERPRET)
    if HAS_DROPOUT:
        row_keys = _dropout_row_keys(seed, batch_head, rows)
    else:
        row_keys = rows  # unused

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(row_start, len_kv, offset, diff_lo, diff_hi, BLOCK_M)
    lo_tile, full_start, full_end = _tile_runs(lo, full_lo, full_hi, hi, BLOCK_N)
    args = (q, k_base, v_base, mask_base, stride_kn, stride_vn, stride_mm, stride_mn, rows,
            row_keys)
    scalars = (len_q, len_kv, head_dim, offset, diff_lo, diff_hi, scale, softcap, threshold)
    # (constexpr arguments are spelled out: packed in a tuple they would lose constexpr-ness)
    acc, l_i, m_i = _forward_tiles(
        acc, l_i, m_i, *args, lo_tile, full_start, *scalars, True, MASK_KIND, HAS_SOFTCAP,
        HAS_DROPOUT, DTYPE, INTERPRET, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION)
    acc, l_i, m_i = _forward_tiles(
        acc, l_i, m_i, *args, full_start, full_end, *scalars, False, MASK_KIND, HAS_SOFTCAP,
        HAS_DROPOUT, DTYPE, INTERPRET, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION)
    acc, l_i, m_i = _forward_tiles(
        acc, l_i, m_i, *args, full_end, hi, *scalars, True, MASK_KIND, HAS_SOFTCAP,
        HAS_DROPOUT, DTYPE, INTERPRET, EVEN_D, BLOCK_N, BLOCK_D, DOT_PRECISION)

    empty = l_i == 0.0
    out = acc * (keep_scale / tl.where(empty, 1.0, l_i))[:, None]
    out_base = (out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                + q_start * stride_om)
    out_ptrs = out_base + rows.to(tl.int64)[:, None] * stride_om + dims[None, :]
    tl.store(out_ptrs, _convert(out, DTYPE, INTERPRET),
             mask=(rows < len_q)[:, None] & (dims < head_dim)[None, :])
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    lse_base = lse_ptr + _stats_offset(cu_seqlens_q_ptr, batch_head, head, q_start, seq_q, total_q)
    tl.store(lse_base + rows, lse, mask=rows < len_q)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------

# delta[i] = <dO[i], O[i]> in fp32, BLOCK_M rows of one (batch, query head) per program, over
# the head dims in chunks of BLOCK_D: one tile for every head dim, so one build per dtype (the
# JIT compiles each build apart; this kernel reads O and dO once, a small part of the backward).
# Rows [Sq] of each (batch, head) padded, or one batch entry of total_q rows packed ([Hq, total_q]
# statistics, [total_q, Hq, D] tensors with a batch stride 0).
@triton.jit
def _attention_delta_kernel(
    out_ptr,      # [B, Hq, Sq, D] by strides, dtype
    dout_ptr,     # [B, Hq, Sq, D] by strides, dtype
    delta_ptr,    # [B, Hq, Sq] fp32, contiguous
    stride_ob, stride_oh, stride_om,
    stride_db, stride_dh, stride_dm,
    heads_q, seq_q, head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row_tiles = tl.cdiv(seq_q, BLOCK_M)
    pid = tl.program_id(0)
    batch_head = pid // row_tiles
    batch = batch_head // heads_q
    head = batch_head % heads_q
    rows = (pid % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    out_base = out_ptr + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
    dout_base = dout_ptr + batch.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for dim_start in range(0, head_dim, BLOCK_D):
        dims = dim_start + tl.arange(0, BLOCK_D)
        o = _load_rows(out_base, rows[:, None], stride_om, seq_q, dims[None, :], head_dim, True,
                       True, 0, False)
        do = _load_rows(dout_base, rows[:, None], stride_dm, seq_q, dims[None, :], head_dim,
                        True, True, 0, False)
        delta += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + batch_head.to(tl.int64) * seq_q + rows, delta, mask=rows < seq_q)


# The query tiles [start, end) of one query head, for one key tile (transposed: key j along
# axis 0, query i along axis 1):
#   P^T = exp(s^T - lse)  (0 where s = -inf or lse = +inf; + fix with an additive mask, _lse_fix)
#   dV += (P * keep)^T dO                                  (1 / (1 - p) applied by the caller)
#   dP^T = V dO^T * keep / (1 - p);  dS^T = P^T (dP^T - delta)  (* (1 - t^2) with HAS_SOFTCAP)
#   dK += dS^T Q                                           (scale applied by the caller)
@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, dout_base, lse_base, lse_fix_base, delta_base, mask_base,
                stride_qm, stride_dm, stride_mm, stride_mn, cols, batch_head, start, end, seq_q,
                seq_kv, head_dim, offset, diff_lo, diff_hi, scale, softcap, keep_scale, seed,
                threshold, POSITIONAL: tl.constexpr, MASK_KIND: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DTYPE: tl.constexpr,
                INTERPRET: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    for row_start in range(start, end, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, rows[:, None], stride_qm, seq_q, dims[None, :], head_dim, True,
                       not EVEN_D, DTYPE, INTERPRET)
        do = _load_rows(dout_base, rows[:, None], stride_dm, seq_q, dims[None, :], head_dim, True,
                        not EVEN_D, DTYPE, INTERPRET)
        lse = tl.load(lse_base + rows, mask=rows < seq_q, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < seq_q, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        s_t, tanh_t = _scores(qk_t, rows[None, :], cols[:, None], mask_base, stride_mm, stride_mn,
                              seq_q, seq_kv, offset, diff_lo, diff_hi, scale, softcap, MASK_KIND,
                              POSITIONAL, HAS_SOFTCAP)
        if MASK_KIND == 2:
            lse_fix = tl.load(lse_fix_base + rows, mask=rows < seq_q, other=0.0)
            p_t = tl.exp(s_t - lse[None, :] + lse_fix[None, :])
        else:
            p_t = tl.exp(s_t - lse[None, :])
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            row_keys = _dropout_row_keys(seed, batch_head, rows)
            bits_t = _hash32(row_keys[None, :] + cols[:, None].to(tl.uint32) * 0x9E3779B9)
            keep_t = bits_t >= threshold.to(tl.uint32)
            dv = tl.dot(_operand(tl.where(keep_t, p_t, 0.0), DTYPE, INTERPRET), do, dv,
                        input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        else:
            dv = tl.dot(_operand(p_t, DTYPE, INTERPRET), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        dk = tl.dot(_operand(ds_t, DTYPE, INTERPRET), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


# dK, dV of one key tile (BLOCK_N rows) of one (batch, kv head), summed over the `group` query
# heads that share it and over the query tiles that see it (_dkdv_tiles); then
#   dK = scale * dK,  dV = dV / (1 - dropout_p).
# The program index runs over key tiles fastest, then batch * heads_kv. Packed layout as in the
# forward kernel (a key tile past its sequence's end exits at once).
@triton.jit(do_not_specialize=["diff_lo", "diff_hi", "seed", "threshold", "total_q"])
def _attention_dkdv_kernel(
    q_ptr,        # [B, Hq, Sq, D] by strides, dtype (packed: [total_q, Hq, D])
    k_ptr,        # [B, Hkv, Skv, D] by strides, dtype (packed: [total_kv, Hkv, D])
    v_ptr,        # [B, Hkv, Skv, D] by strides, dtype (packed: [total_kv, Hkv, D])
    mask_ptr,     # [B, Hq, Sq, Skv] by strides: uint8 (bool) or additive float (iff MASK_KIND)
    dout_ptr,     # [B, Hq, Sq, D] by strides, dtype (packed: [total_q, Hq, D])
    lse_ptr,      # [B, Hq, Sq] fp32, contiguous (packed: [Hq, total_q], as delta and lse_fix)
    delta_ptr,    # [B, Hq, Sq] fp32, contiguous
    lse_fix_ptr,  # [B, Hq, Sq] fp32, contiguous: _lse_fix from the dQ kernel (iff MASK_KIND == 2)
    dk_ptr,       # [B, Hkv, Skv, D] dtype, contiguous (packed: [total_kv, Hkv, D])
    dv_ptr,       # [B, Hkv, Skv, D] dtype, contiguous (packed: [total_kv, Hkv, D])
    cu_seqlens_q_ptr,  # packed: [B + 1] int32, query rows of sequence b from [b]; padded: None
    cu_seqlens_k_ptr,  # packed: [B + 1] int32, key rows of sequence b from [b]; padded: None
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    heads_q, heads_kv, group, seq_q, seq_kv, head_dim, total_q,
    scale, diff_lo, diff_hi, softcap, keep_scale, seed, threshold,
    MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,        # head_dim == BLOCK_D: no masking along head_dim
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    col_tiles = tl.cdiv(seq_kv, BLOCK_N)
    pid = tl.program_id(0)
    tile = pid % col_tiles
    batch_kv_head = pid // col_tiles
    batch = batch_kv_head // heads_kv
    kv_head = batch_kv_head % heads_kv
    col_start = tile * BLOCK_N
    q_start, len_q, kv_start, len_kv = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, batch,
                                                 seq_q, seq_kv)
    if cu_seqlens_q_ptr is not None:
        if col_start >= len_kv:
            return
    offset = len_kv - len_q

    cols = col_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k_base = (k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
              + kv_start * stride_kn)
    v_base = (v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
              + kv_start * stride_vn)
    k = _load_rows(k_base, cols[:, None], stride_kn, len_kv, dims[None, :], head_dim, True,
                   not EVEN_D, DTYPE, INTERPRET)
    v = _load_rows(v_base, cols[:, None], stride_vn, len_kv, dims[None, :], head_dim, True,
                   not EVEN_D, DTYPE, INTERPRET)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _query_range(col_start, len_q, offset, diff_lo, diff_hi, BLOCK_N)
    lo_tile, full_start, full_end = _tile_runs(lo, full_lo, full_hi, hi, BLOCK_M)
    scalars = (len_q, len_kv, head_dim, offset, diff_lo, diff_hi, scale, softcap, keep_scale, seed,
               threshold)
    for member in range(group):
        head = kv_head * group + member
        batch_head = batch * heads_q + head
        q_base = (q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
                  + q_start * stride_qm)
        dout_base = (dout_ptr + batch.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
                     + q_start * stride_dm)
        mask_base = mask_ptr + batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh
        stats = _stats_offset(cu_seqlens_q_ptr, batch_head, head, q_start, seq_q, total_q)
        lse_base = lse_ptr + stats
        delta_base = delta_ptr + stats
        lse_fix_base = lse_fix_ptr + stats
        args = (k, v, q_base, dout_base, lse_base, lse_fix_base, delta_base, mask_base,
                stride_qm, stride_dm, stride_mm, stride_mn, cols, batch_head)
        # (constexpr arguments spelled out: packed in a tuple they would lose constexpr-ness)
        dk, dv = _dkdv_tiles(
            dk, dv, *args, lo_tile, full_start, *scalars, True, MASK_KIND, HAS_SOFTCAP,
            HAS_DROPOUT, DTYPE, INTERPRET, EVEN_D, BLOCK_M, BLOCK_D, DOT_PRECISION)
        dk, dv = _dkdv_tiles(
            dk, dv, *args, full_start, full_end, *scalars, False, MASK_KIND, HAS_SOFTCAP,
            HAS_DROPOUT, DTYPE, INTERPRET, EVEN_D, BLOCK_M, BLOCK_D, DOT_PRECISION)
        dk, dv = _dkdv_tiles(
            dk, dv, *args, full_end, hi, *scalars, True, MASK_KIND, HAS_SOFTCAP,
            HAS_DROPOUT, DTYPE, INTERPRET, EVEN_D, BLOCK_M, BLOCK_D, DOT_PRECISION)

    offsets = _gradient_offsets(cu_seqlens_k_ptr, batch_kv_head, kv_head, heads_kv, kv_start,
                                cols, seq_kv, head_dim, dims)
    store_mask = (cols < len_kv)[:, None] & (dims < head_dim)[None, :]
    tl.store(dk_ptr + offsets, _convert(dk * scale, DTYPE, INTERPRET), mask=store_mask)
    tl.store(dv_ptr + offsets, _convert(dv * keep_scale, DTYPE, INTERPRET), mask=store_mask)


# A correction of lse for rows where it lost log(l) to rounding. A row whose every score carries a
# huge additive mask value (finfo.min, as transformers writes it) has |lse| ~ 3e38, where
# m + log(l) rounds to m, so that exp(s - lse) sums to l over the row instead of 1. For rows with
# |lse| > LSE_EXACT_LIMIT (only: the recomputation runs when the tile has one) the sum over the
# key tiles [start, end) is recomputed and the backward uses P = exp(s - lse + fix) with
#   fix = -log(sum_j exp(s[j] - lse))          (0 on the other rows)
@triton.jit
def _lse_fix(q, k_base, mask_base, stride_kn, stride_mm, stride_mn, rows, lse, start, end, seq_q,
             seq_kv, head_dim, offset, diff_lo, diff_hi, scale, softcap, HAS_SOFTCAP: tl.constexpr,
             DTYPE: tl.constexpr, INTERPRET: tl.constexpr, EVEN_D: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    inexact = (tl.abs(lse) > 1024.0) & (lse != float("inf"))  # LSE_EXACT_LIMIT
    fix = tl.zeros_like(lse)
    if tl.max(inexact.to(tl.int32), 0) > 0:
        dims = tl.arange(0, BLOCK_D)
        total = tl.zeros_like(lse)
        for col_start in range(start, end, BLOCK_N):
            cols = col_start + tl.arange(0, BLOCK_N)
            k_t = _load_rows(k_base, cols[None, :], stride_kn, seq_kv, dims[:, None], head_dim,
                             True, not EVEN_D, DTYPE, INTERPRET)
            qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
            s, _ = _scores(qk, rows[:, None], cols[None, :], mask_base, stride_mm, stride_mn,
                           seq_q, seq_kv, offset, diff_lo, diff_hi, scale, softcap, 2, True,
                           HAS_SOFTCAP)
            total += tl.sum(tl.exp(s - lse[:, None]), 1)
        fix = tl.where(inexact & (total > 0.0), -tl.log(tl.where(total > 0.0, total, 1.0)), 0.0)
    return fix


# The key tiles [start, end) of one query tile:
#   P = exp(s - lse)   (exp(s - lse + fix) with an additive mask, see _lse_fix)
#   dP = dO V^T * keep / (1 - p);  dS = P (dP - delta)
#   dbias[i, j] = dS          (BIAS_GRAD, fp32; row i at dbias_base + i * stride_dbias_m)
#   dQ += dS_raw K,  dS_raw = dS (* (1 - t^2) with HAS_SOFTCAP)     (scale applied by the caller)
@triton.jit
def _dq_tiles(dq, q, do, lse, lse_fix, delta, k_base, v_base, mask_base, dbias_base,
              stride_dbias_m, stride_kn, stride_vn, stride_mm, stride_mn, rows, row_keys, start,
              end, seq_q, seq_kv, head_dim, offset, diff_lo, diff_hi, scale, softcap, keep_scale,
              threshold, POSITIONAL: tl.constexpr, MASK_KIND: tl.constexpr,
              HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, BIAS_GRAD: tl.constexpr,
              DTYPE: tl.constexpr, INTERPRET: tl.constexpr, EVEN_D: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    dims = tl.arange(0, BLOCK_D)
    for col_start in range(start, end, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N)
        k_t = _load_rows(k_base, cols[None, :], stride_kn, seq_kv, dims[:, None], head_dim,
                         POSITIONAL, not EVEN_D, DTYPE, INTERPRET)
        v_t = _load_rows(v_base, cols[None, :], stride_vn, seq_kv, dims[:, None], head_dim,
                         POSITIONAL, not EVEN_D, DTYPE, INTERPRET)
        qk = tl.dot(q, k_t, input_precision=DOT_PRECISION)
        s, tanh = _scores(qk, rows[:, None], cols[None, :], mask_base, stride_mm, stride_mn, seq_q,
                          seq_kv, offset, diff_lo, diff_hi, scale, softcap, MASK_KIND, POSITIONAL,
                          HAS_SOFTCAP)
        if MASK_KIND == 2:
            p = tl.exp(s - lse[:, None] + lse_fix[:, None])
        else:
            p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            bits = _hash32(row_keys[:, None] + cols[None, :].to(tl.uint32) * 0x9E3779B9)
            keep = bits >= threshold.to(tl.uint32)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            dbias_ptrs = dbias_base + rows.to(tl.int64)[:, None] * stride_dbias_m + cols[None, :]
            tl.store(dbias_ptrs, ds, mask=(rows < seq_q)[:, None] & (cols < seq_kv)[None, :])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh * tanh)
        dq = tl.dot(_operand(ds, DTYPE, INTERPRET), tl.trans(k_t), dq,
                    input_precision=DOT_PRECISION)
    return dq


# dQ of one query tile (BLOCK_M rows) of one (batch, query head), over the key tiles it sees
# (_dq_tiles); dQ = scale * dQ. Writes, with an additive mask, the rows' lse correction
# (_lse_fix) that the dK/dV kernel reads after it, and dbias = dS on the tiles it sees when
# BIAS_GRAD (the others must hold zeros already). The program index runs over query tiles
# fastest, then batch * heads_q. Packed layout as in the forward kernel; dbias stays
# [B, Hq, Sq, Skv] in each sequence's local positions.
@triton.jit(do_not_specialize=["diff_lo", "diff_hi", "seed", "threshold", "total_q"])
def _attention_dq_kernel(
    q_ptr,        # [B, Hq, Sq, D] by strides, dtype (packed: [total_q, Hq, D])
    k_ptr,        # [B, Hkv, Skv, D] by strides, dtype (packed: [total_kv, Hkv, D])
    v_ptr,        # [B, Hkv, Skv, D] by strides, dtype (packed: [total_kv, Hkv, D])
    mask_ptr,     # [B, Hq, Sq, Skv] by strides: uint8 (bool) or additive float (iff MASK_KIND)
    dout_ptr,     # [B, Hq, Sq, D] by strides, dtype (packed: [total_q, Hq, D])
    lse_ptr,      # [B, Hq, Sq] fp32, contiguous (packed: [Hq, total_q], as delta and lse_fix)
    delta_ptr,    # [B, Hq, Sq] fp32, contiguous: rowsum(dO * O) (_attention_delta_kernel)
    lse_fix_ptr,  # [B, Hq, Sq] fp32, contiguous: _lse_fix, written iff MASK_KIND == 2
    dq_ptr,       # [B, Hq, Sq, D] dtype, contiguous (packed: [total_q, Hq, D])
    dbias_ptr,    # [B, Hq, Sq, Skv] fp32, contiguous (written iff BIAS_GRAD)
    cu_seqlens_q_ptr,  # packed: [B + 1] int32, query rows of sequence b from [b]; padded: None
    cu_seqlens_k_ptr,  # packed: [B + 1] int32, key rows of sequence b from [b]; padded: None
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_db, stride_dh, stride_dm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    heads_q, group, seq_q, seq_kv, head_dim, total_q,
    scale, diff_lo, diff_hi, softcap, keep_scale, seed, threshold,
    MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,        # head_dim == BLOCK_D: no masking along head_dim
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tile, batch_head, batch, head, kv_head = _query_tile(seq_q, heads_q, group, diff_lo, BLOCK_M)
    row_start = tile * BLOCK_M
    q_start, len_q, kv_start, len_kv = _sequence(cu_seqlens_q_ptr, cu_seqlens_k_ptr, batch,
                                                 seq_q, seq_kv)
    if cu_seqlens_q_ptr is not None:
        if row_start >= len_q:
            return
    offset = len_kv - len_q

    rows = row_start + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q_base = (q_ptr + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
              + q_start * stride_qm)
    dout_base = (dout_ptr + batch.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh
                 + q_start * stride_dm)
    k_base = (k_ptr + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
              + kv_start * stride_kn)
    v_base = (v_ptr + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
              + kv_start * stride_vn)
    mask_base = mask_ptr + batch.to(tl.int64) * stride_mb + head.to(tl.int64) * stride_mh
    dbias_base = dbias_ptr + batch_head.to(tl.int64) * seq_q * seq_kv
    stats = _stats_offset(cu_seqlens_q_ptr, batch_head, head, q_start, seq_q, total_q)
    q = _load_rows(q_base, rows[:, None], stride_qm, len_q, dims[None, :], head_dim, True,
                   not EVEN_D, DTYPE, INTERPRET)
    do = _load_rows(dout_base, rows[:, None], stride_dm, len_q, dims[None, :], head_dim, True,
                    not EVEN_D, DTYPE, INTERPRET)
    lse = tl.load(lse_ptr + stats + rows, mask=rows < len_q, other=float("inf"))
    delta = tl.load(delta_ptr + stats + rows, mask=rows < len_q, other=0.0)
    if HAS_DROPOUT:
        row_keys = _dropout_row_keys(seed, batch_head, rows)
    else:
        row_keys = rows  # unused

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, full_lo, full_hi, hi = _key_range(row_start, len_kv, offset, diff_lo, diff_hi, BLOCK_M)
    lo_tile, full_start, full_end = _tile_runs(lo, full_lo, full_hi, hi, BLOCK_N)
    if MASK_KIND == 2:
        lse_fix = _lse_fix(q, k_base, mask_base, stride_kn, stride_mm, stride_mn, rows, lse,
                           lo_tile, hi, len_q, len_kv, head_dim, offset, diff_lo, diff_hi, scale,
                           softcap, HAS_SOFTCAP, DTYPE, INTERPRET, EVEN_D, BLOCK_N, BLOCK_D,
                           DOT_PRECISION)
        tl.store(lse_fix_ptr + stats + rows, lse_fix, mask=rows < len_q)
    else:
        lse_fix = lse  # unused
    args = (q, do, lse, lse_fix, delta, k_base, v_base, mask_base, dbias_base, seq_kv, stride_kn,
            stride_vn, stride_mm, stride_mn, rows, row_keys)
    scalars = (len_q, len_kv, head_dim, offset, diff_lo, diff_hi, scale, softcap, keep_scale,
               threshold)
    # (constexpr arguments spelled out: packed in a tuple they would lose constexpr-ness)
    dq = _dq_tiles(dq, *args, lo_tile, full_start, *scalars, True, MASK_KIND, HAS_SOFTCAP,
                   HAS_DROPOUT, BIAS_GRAD, DTYPE, INTERPRET, EVEN_D, BLOCK_N, BLOCK_D,
                   DOT_PRECISION)
    dq = _dq_tiles(dq, *args, full_start, full_end, *scalars, False, MASK_KIND, HAS_SOFTCAP,
                   HAS_DROPOUT, BIAS_GRAD, DTYPE, INTERPRET, EVEN_D, BLOCK_N, BLOCK_D,
                   DOT_PRECISION)
    dq = _dq_tiles(dq, *args, full_end, hi, *scalars, True, MASK_KIND, HAS_SOFTCAP,
                   HAS_DROPOUT, BIAS_GRAD, DTYPE, INTERPRET, EVEN_D, BLOCK_N, BLOCK_D,
                   DOT_PRECISION)

    offsets = _gradient_offsets(cu_seqlens_q_ptr, batch_head, head, heads_q, q_start, rows,
                                seq_q, head_dim, dims)
    tl.store(dq_ptr + offsets, _convert(dq * scale, DTYPE, INTERPRET),
             mask=(rows < len_q)[:, None] & (dims < head_dim)[None, :])


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"the triton attention kernels take float32, float16 or bfloat16, got "
                        f"{dtype}")


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _config(table, block_d: int, q, extras: bool):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) from `table` for q's dtype and device; `extras`:
    a mask, dropout or softcap (more registers). Small fixed tiles under the interpreter."""
    if q.device.type == "cpu":
        return INTERPRETER_BLOCK_M, INTERPRETER_BLOCK_N, 1, 1
    half, half_extras, fp32 = table[max(block_d, 64)]
    if q.dtype == torch.float32:
        return fp32
    return half_extras if extras else half


class _Extent(NamedTuple):
    """The extent of one call. Padded layout: cu_seqlens_q/k None and total_q 0. Packed layout
    (FlashAttention's varlen): seq_q / seq_kv are the longest lengths (max_seqlen_q/k), which the
    grid and the mask / dbias planes span."""
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_kv: int
    head_dim: int
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    total_q: int = 0

    def row_strides(self, t):
        """(batch, head, row) strides of q, k, v, out or dout: [B, H, S, D] padded, [total, H, D]
        packed (batch stride 0: each sequence's first row comes from cu_seqlens)."""
        if self.cu_seqlens_q is None:
            return t.stride()[:3]
        return 0, t.stride(1), t.stride(0)


def _mask_args(mask, q, extent: _Extent):
    """(pointer tensor (q when there is no mask), MASK_KIND, 4 strides) of the mask view broadcast
    to [B, Hq, Sq, Skv]."""
    if mask is None:
        return q, 0, (0, 0, 0, 0)
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"the triton attention kernels take bool, float32, float16 or bfloat16 "
                        f"masks, got {mask.dtype}")
    shape = (extent.batch, extent.heads_q, extent.seq_q, extent.seq_kv)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must be broadcast to [batch, heads_q, seq_q, seq_kv] = {shape}, "
                         f"got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 1, tuple(mask.stride())
    return mask, 2, tuple(mask.stride())


def _dropout_args(dropout_p: float, seed: int):
    """(keep_scale = 1 / (1 - p), seed, threshold = round(p * 2^32) clamped to 2^32 - 1) as
    reference.dropout_threshold computes it."""
    if not dropout_p:
        return 1.0, 0, 0
    threshold = min(round(dropout_p * 2.0 ** 32), UINT32_MAX)
    return 1.0 / (1.0 - dropout_p), int(seed) & UINT32_MAX, threshold


def _band(causal, window):
    """(diff_lo, diff_hi): query row i sees key j iff diff_lo <= i + offset - j <= diff_hi
    (offset = seq_kv - seq_q): causal is diff >= 0, a window |diff| < window. Runtime arguments,
    not constexprs: they only change which tiles run and the masking of the tiles on the band's
    edges, so causal / windowed calls share the build of the plain one. _NO_BOUND stands for no
    bound (no sequence comes near it; row + offset -+ it stays within int32)."""
    diff_hi = min(int(window) - 1, _NO_BOUND) if window > 0 else _NO_BOUND
    return (0 if causal else -diff_hi), diff_hi


def _common_flags(q, head_dim, mask_kind, softcap, dropout_p):
    return dict(MASK_KIND=mask_kind, HAS_SOFTCAP=softcap > 0, HAS_DROPOUT=dropout_p > 0,
                DTYPE=_dtype_code(q.dtype), INTERPRET=q.device.type == "cpu",
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                EVEN_D=head_dim == _block_d(head_dim))


def _on_device(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _packed_extent(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return _Extent(cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], int(max_seqlen_q),
                   int(max_seqlen_k), q.shape[2], cu_seqlens_q, cu_seqlens_k, q.shape[0])


def _forward(q, k, v, out, lse, mask, extent: _Extent, causal, scale, window, softcap,
             dropout_p, seed):
    """Runs the forward kernel over `extent`, writing out and lse (allocated by the caller)."""
    mask_tensor, mask_kind, mask_strides = _mask_args(mask, q, extent)
    flags = _common_flags(q, extent.head_dim, mask_kind, softcap, dropout_p)
    if out.numel() == 0 or extent.seq_q == 0 or extent.seq_kv == 0:
        out.zero_()
        lse.fill_(math.inf)
        return out, lse

    keep_scale, seed, threshold = _dropout_args(dropout_p, seed)
    block_d = _block_d(extent.head_dim)
    extras = mask is not None or dropout_p > 0 or softcap > 0
    block_m, block_n, num_warps, num_stages = _config(FORWARD_CONFIGS, block_d, q, extras)
    grid = (triton.cdiv(extent.seq_q, block_m) * extent.batch * extent.heads_q,)
    with _on_device(q):
        _attention_forward_kernel[grid](
            q, k, v, mask_tensor, out, lse, extent.cu_seqlens_q, extent.cu_seqlens_k,
            *extent.row_strides(q), *extent.row_strides(k), *extent.row_strides(v),
            *extent.row_strides(out), *mask_strides,
            extent.heads_q, extent.heads_q // extent.heads_kv, extent.seq_q, extent.seq_kv,
            extent.head_dim, extent.total_q,
            float(scale), *_band(causal, window), float(softcap), float(keep_scale), seed,
            threshold, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages)
    return out, lse


def _backward(dout, q, k, v, out, lse, dq, dk, dv, dbias, mask, extent: _Extent, causal, scale,
              window, softcap, dropout_p, seed, bias_grad):
    """Runs the backward kernels over `extent`, writing dq, dk, dv (and dbias, zero-filled by the
    caller, when bias_grad)."""
    mask_tensor, mask_kind, mask_strides = _mask_args(mask, q, extent)
    flags = _common_flags(q, extent.head_dim, mask_kind, softcap, dropout_p)
    batch, heads_q, heads_kv = extent.batch, extent.heads_q, extent.heads_kv
    seq_q, seq_kv, head_dim = extent.seq_q, extent.seq_kv, extent.head_dim
    if batch * heads_q * seq_q == 0 or seq_kv == 0:  # nothing to attend: zero gradients
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias

    keep_scale, seed, threshold = _dropout_args(dropout_p, seed)
    block_d = _block_d(head_dim)
    extras = mask is not None or dropout_p > 0 or softcap > 0
    group = heads_q // heads_kv
    scalars = (float(scale), *_band(causal, window), float(softcap), float(keep_scale), seed,
               threshold)
    strides = (*extent.row_strides(q), *extent.row_strides(k), *extent.row_strides(v),
               *extent.row_strides(dout))
    cu_seqlens = (extent.cu_seqlens_q, extent.cu_seqlens_k)
    # delta, like lse: [B, Hq, Sq], or [Hq, total_q] packed, which the delta kernel computes as
    # one batch entry of total_q rows
    packed = extent.cu_seqlens_q is not None
    delta_batch, delta_rows = (1, extent.total_q) if packed else (batch, seq_q)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    lse_fix = torch.empty_like(delta) if mask_kind == 2 else delta  # see _lse_fix
    with _on_device(q):
        block_m, block_d_delta = ((INTERPRETER_BLOCK_M, block_d) if q.device.type == "cpu"
                                  else DELTA_TILE)
        _attention_delta_kernel[(triton.cdiv(delta_rows, block_m) * delta_batch * heads_q,)](
            out, dout, delta, *extent.row_strides(out), *extent.row_strides(dout), heads_q,
            delta_rows, head_dim, BLOCK_M=block_m, BLOCK_D=block_d_delta, num_warps=4,
            num_stages=1)

        # dQ first: with an additive mask it writes the lse correction that dK/dV reads
        block_m, block_n, num_warps, num_stages = _config(DQ_CONFIGS, block_d, q, extras)
        _attention_dq_kernel[(triton.cdiv(seq_q, block_m) * batch * heads_q,)](
            q, k, v, mask_tensor, dout, lse, delta, lse_fix, dq,
            dbias if bias_grad else delta, *cu_seqlens, *strides,
            *mask_strides, heads_q, group, seq_q, seq_kv, head_dim, extent.total_q, *scalars,
            **flags, BIAS_GRAD=bool(bias_grad), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)

        block_m, block_n, num_warps, num_stages = _config(DKDV_CONFIGS, block_d, q, extras)
        _attention_dkdv_kernel[(triton.cdiv(seq_kv, block_n) * batch * heads_kv,)](
            q, k, v, mask_tensor, dout, lse, delta, lse_fix, dk, dv, *cu_seqlens, *strides,
            *mask_strides, heads_q, heads_kv, group, seq_q, seq_kv, head_dim, extent.total_q,
            *scalars, **flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv, dbias


def attention_forward(q, k, v, mask, causal: bool, scale: float, window: int, softcap: float,
                      dropout_p: float, seed: int):
    """Fused attention forward (see the module docstring for the layouts).

    -> (out [B, Hq, Sq, D] q.dtype, laid out as [B, Sq, Hq, D]; lse [B, Hq, Sq] fp32, natural
        log, +inf on rows that see no key)
    """
    batch, heads_q, seq_q, head_dim = q.shape
    extent = _Extent(batch, heads_q, k.shape[1], seq_q, k.shape[2], head_dim)
    out = torch.empty(batch, seq_q, heads_q, head_dim, dtype=q.dtype,
                      device=q.device).transpose(1, 2)
    lse = torch.empty(batch, heads_q, seq_q, dtype=torch.float32, device=q.device)
    return _forward(q, k, v, out, lse, mask, extent, causal, scale, window, softcap, dropout_p,
                    seed)


def attention_backward(dout, q, k, v, out, lse, mask, causal: bool, scale: float, window: int,
                       softcap: float, dropout_p: float, seed: int, bias_grad: bool):
    """Gradients of attention_forward from its out and lse.

    -> (dq, dk, dv: contiguous, the shapes of q, k, v, q.dtype; dbias = dS [B, Hq, Sq, Skv] fp32
        contiguous when bias_grad, else an empty fp32 tensor)
    """
    batch, heads_q, seq_q, head_dim = q.shape
    extent = _Extent(batch, heads_q, k.shape[1], seq_q, k.shape[2], head_dim)
    return _backward(dout, q, k, v, out, lse, *_gradients(q, k, v, extent, bias_grad), mask,
                     extent, causal, scale, window, softcap, dropout_p, seed, bias_grad)


def varlen_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                             max_seqlen_k: int, mask, causal: bool, scale: float, window: int,
                             softcap: float, dropout_p: float, seed: int):
    """Fused attention forward over packed sequences (see the module docstring for the layout;
    the cu_seqlens are trusted: transfuse.ops checks them).

    -> (out [total_q, Hq, D] q.dtype, contiguous; lse [Hq, total_q] fp32, natural log, +inf on
        rows that see no key)
    """
    extent = _packed_extent(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    return _forward(q, k, v, out, lse, mask, extent, causal, scale, window, softcap, dropout_p,
                    seed)


def varlen_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                              max_seqlen_q: int, max_seqlen_k: int, mask, causal: bool,
                              scale: float, window: int, softcap: float, dropout_p: float,
                              seed: int, bias_grad: bool):
    """Gradients of varlen_attention_forward from its out and lse [Hq, total_q] (contiguous).

    -> (dq [total_q, Hq, D], dk, dv [total_kv, Hkv, D]: contiguous, q.dtype; dbias = dS
        [B, Hq, max_seqlen_q, max_seqlen_k] fp32 contiguous in each sequence's local positions
        (zero beyond its lengths) when bias_grad, else an empty fp32 tensor)
    """
    extent = _packed_extent(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _backward(dout, q, k, v, out, lse, *_gradients(q, k, v, extent, bias_grad), mask,
                     extent, causal, scale, window, softcap, dropout_p, seed, bias_grad)


def _gradients(q, k, v, extent: _Extent, bias_grad: bool):
    """(dq, dk, dv, dbias) allocated: contiguous like q, k, v, in q's dtype; dbias zero-filled
    (tiles that causal / window skip are never written) or empty."""
    device = q.device
    dq = torch.empty(q.shape, dtype=q.dtype, device=device)
    dk = torch.empty(k.shape, dtype=q.dtype, device=device)
    dv = torch.empty(v.shape, dtype=q.dtype, device=device)
    dbias = (torch.zeros(extent.batch, extent.heads_q, extent.seq_q, extent.seq_kv,
                         dtype=torch.float32, device=device)
             if bias_grad else torch.empty(0, dtype=torch.float32, device=device))
    return dq, dk, dv, dbias
