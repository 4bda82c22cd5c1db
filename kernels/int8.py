"""Triton kernels of the int8 quantized matmul: per-token quantization, the int8 GEMM with its fused
dequantizing epilogue (w8a8) and the weight-only int8 GEMM (w8a16).

The math is that of csrc/common/int8.h: per-row symmetric quantization with IEEE division and
round-half-to-even; int32 accumulation of int8 products (exact); fp32 accumulation of x * w for
w8a16; an fp32 epilogue acc * s_x[i] * s_w[j] + bias[j], rounded once to the output dtype.
One GEMM kernel serves both modes (A_INT8 picks int8 or floating activations) and writes either
the epilogue's output or the raw sums (the int32 product of int8_matmul, or per-split partial
sums). Grids with fewer tiles than the GPU runs at once (decoding: a few rows) split K across
programs; a second kernel adds the partial sums in split order and applies the epilogue.

Launchers (contiguous 2-D tensors, on CUDA, or on CPU under TRITON_INTERPRET=1; they allocate
their outputs; bias is None or [n] of the output dtype):
    quantize_per_token(x)       x [m, k] fp32/fp16/bf16 -> (q int8 [m, k], scale fp32 [m])
    int8_matmul(a, b)           a [m, k], b [n, k] int8 -> int32 [m, n] = a @ b.T
    int8_linear_w8a8(x_q, x_scale, w, w_scale, bias, dtype)
                                x_q [m, k] int8, x_scale fp32 [m], w [n, k] int8, w_scale fp32 [n]
                                -> out [m, n] of dtype
    int8_linear_w8a16(x, w, w_scale, bias)
                                x [m, k] fp32/fp16/bf16 -> out [m, n] of x.dtype

Under TRITON_INTERPRET=1 they run on CPU tensors, with small tiles so that several tiles, the
tails and split K get exercised. The interpreter's int8 tl.dot accumulates in int32 as on GPU
(numpy's matmul is asked for an int32 result and widens the int8 operands before multiplying),
so int8 tiles go to the dot as they are. It cannot call libdevice, so round-half-to-even uses the
fp32 adder there (`_round_half_even`). It converts fp32 to bf16 by truncating the mantissa, so
bf16 outputs are rounded to nearest even by hand before that conversion (norm's `_convert`, which
does so on GPU too; the conversion that follows is then exact on both). Its dot cannot multiply
bf16 (held as raw 16-bit integers) and it converts int8 to bf16 wrongly, so there (only) bf16
activation tiles and int8 weight tiles meet in fp32 (the products are exact either way).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .norm import _convert, _multiprocessor_count, _on_device

# Dtype codes passed to the kernels as constexpr.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# GEMM tiles on GPU, (largest m served, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), the
# first row that serves m is taken. int8 and fp16/bf16 operands run on tensor cores (mma on sm_80,
# wgmma on sm_90 from BLOCK_M 64); a K tile holds 128 bytes of an int8 row, 64 or 128 elements of
# an fp16/bf16 row; the stages keep within the shared memory of an A100 (164 KiB) and of an H100
# (228 KiB). Decoding (m <= 16) takes 16-row tiles and relies on split K to fill the GPU.
INT8_CONFIGS = ((16, 16, 64, 128, 4, 4), (32, 32, 64, 128, 4, 4), (64, 64, 128, 128, 4, 4),
                (math.inf, 128, 128, 128, 8, 3))
HALF_CONFIGS = ((16, 16, 64, 128, 4, 4), (32, 32, 64, 128, 4, 4), (64, 64, 128, 64, 4, 4),
                (math.inf, 128, 128, 64, 8, 3))
# fp32 activations: IEEE fp32 dots run on the FMA units and take small tiles.
FLOAT_CONFIGS = ((16, 16, 64, 32, 4, 2), (math.inf, 64, 64, 32, 8, 2))
# Rows of tiles visited together by consecutive programs (L2 reuse of the weight tiles).
GROUP_M = 8
# Split K when the tiles are fewer than the programs the GPU runs at once (about
# PROGRAMS_PER_SM per multiprocessor); each split walks at least MIN_SPLIT_K_TILES K tiles.
PROGRAMS_PER_SM = 2
MIN_SPLIT_K_TILES = 4
MAX_SPLIT_K = 16
# Quantization: [BLOCK_ROWS, BLOCK_COLS] tiles of QUANTIZE_TILE_ELEMENTS elements, rows walked in
# tiles of QUANTIZE_COLS columns, whatever the shape (one compiled variant per input dtype).
QUANTIZE_TILE_ELEMENTS = 4096
QUANTIZE_COLS = 1024
# Epilogue of split K: [BLOCK_M, BLOCK_N] tiles of the output.
REDUCE_BLOCK_M = 16
REDUCE_BLOCK_N = 128
# Under the interpreter (CPU tensors) the cost is per program and per operation: small fixed tiles,
# enough to walk several of them (and their tails) in test-sized shapes, and split K when there
# are fewer than INTERPRETER_PROGRAMS tiles.
INTERPRETER_BLOCK_M = 32
INTERPRETER_BLOCK_N = 64
INTERPRETER_BLOCK_K = 64
INTERPRETER_GROUP_M = 2
INTERPRETER_PROGRAMS = 4
INTERPRETER_MIN_SPLIT_K_TILES = 2
INTERPRETER_QUANTIZE_ROWS = 16
INTERPRETER_QUANTIZE_COLS = 128


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

# rint(v): fp32 v rounded to an integer, ties to even. libdevice on GPU; under the interpreter
# (INTERPRET), which cannot call libdevice, (v + 1.5 * 2^23) - 1.5 * 2^23: the fp32 sum keeps no
# fraction bits and rounds to nearest even, exact for |v| < 2^22 (|v| is about 127 at most here).
@triton.jit
def _round_half_even(v, INTERPRET: tl.constexpr):
    if INTERPRET:
        rounded = (v + 12582912.0) - 12582912.0
    else:
        rounded = libdevice.rint(v)
    return rounded


# (pid_m, pid_n): the output tile of program `pid`, walking GROUP_M rows of tiles column by column
# so that programs running together share weight tiles (and activation tiles) in L2.
@triton.jit
def _grouped_tile(pid, m, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr):
    tiles_m = tl.cdiv(m, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    within = pid % tiles_per_group
    return first_m + within % group_rows, within // group_rows


# Stores acc [BLOCK_M, BLOCK_N] (int32 for int8 operands, else fp32) as rows x cols of out [m, n]:
#   DEQUANTIZE:  out[i, j] = round_out(float(acc[i, j]) * s_x[i] * s_w[j] + bias[j])
#                (s_x only with A_INT8, bias only with HAS_BIAS; fp32, left to right)
#   otherwise:   out[i, j] = acc[i, j]
@triton.jit
def _store_output(acc, rows, cols, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, m, n,
                  A_INT8: tl.constexpr, DEQUANTIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                  OUT_DTYPE: tl.constexpr):
    row_mask = rows < m
    col_mask = cols < n
    offsets = rows.to(tl.int64)[:, None] * n + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if DEQUANTIZE:
        out = acc.to(tl.float32)
        if A_INT8:
            out = out * tl.load(a_scale_ptr + rows, mask=row_mask, other=0.0)[:, None]
        out = out * tl.load(w_scale_ptr + cols, mask=col_mask, other=0.0)[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offsets, _convert(out, OUT_DTYPE), mask=mask)
    else:
        tl.store(out_ptr + offsets, acc, mask=mask)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

# Per-token quantization of BLOCK_ROWS rows per program, walked in tiles of BLOCK_COLS columns
# (twice: the second pass mostly reads from cache). In fp32, per row i:
#   absmax = max_k |x[i, k]|;  scale = absmax / 127 (IEEE division), 1 where that is 0
#   q[i, k] = clamp(rint(x[i, k] / scale), -127, 127)   (IEEE division, ties to even)
# A row holding NaN or inf gets scale NaN and q = 0. absmax is reduced on the bit patterns of |x|
# (int32: for non-negative floats the integer order is the float order, NaN above inf), since a
# float max may skip NaN.
@triton.jit
def _quantize_per_token_kernel(
    x_ptr,      # [rows, cols] input, x dtype
    q_ptr,      # [rows, cols] int8 output
    scale_ptr,  # [rows] fp32 output scales
    n_rows,
    n_cols,
    INTERPRET: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < n_rows
    row_starts = rows.to(tl.int64)[:, None] * n_cols
    tile = tl.arange(0, BLOCK_COLS)

    absmax_bits = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    for col_start in range(0, n_cols, BLOCK_COLS):
        cols = col_start + tile
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + row_starts + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        absmax_bits = tl.maximum(absmax_bits, tl.max(bits, axis=1))
    finite = absmax_bits < 0x7F800000
    scale = tl.math.div_rn(absmax_bits.to(tl.float32, bitcast=True), 127.0)
    scale = tl.where(scale == 0.0, 1.0, scale)
    nan = tl.full([BLOCK_ROWS], 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    scale = tl.where(finite, scale, nan)
    tl.store(scale_ptr + rows, scale, mask=row_mask)

    for col_start in range(0, n_cols, BLOCK_COLS):
        cols = col_start + tile
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + row_starts + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        q = _round_half_even(tl.math.div_rn(x, scale[:, None]), INTERPRET)
        q = tl.where(finite[:, None], tl.minimum(tl.maximum(q, -127.0), 127.0), 0.0)
        tl.store(q_ptr + row_starts + cols[None, :], q.to(tl.int8), mask=mask)


# C = A @ W^T over the K range of split pid_k (program_id(1)) for one [BLOCK_M, BLOCK_N] tile:
#   A_INT8:     acc[i, j] = sum_k a[i, k] * w[j, k]                 (int8 tiles, int32 accumulator)
#   otherwise:  acc[i, j] = sum_k float(a[i, k]) * float(w[j, k])   (w converted to a's dtype,
#               exactly; fp32 accumulator; fp32 a with IEEE fp32 dots)
# then _store_output: the dequantizing epilogue (DEQUANTIZE) or acc itself into out [m, n], or,
# with several splits (SPLIT; DEQUANTIZE is then false), acc into partial[pid_k] of
# out = partial [splits, m, n].
# Split pid_k covers K indices [pid_k * k_per_split, (pid_k + 1) * k_per_split) below k, a
# multiple of BLOCK_K; rows and columns past m / n read row m - 1 / n - 1 (never stored).
@triton.jit
def _int8_gemm_kernel(
    a_ptr,        # [m, k] activations: int8 (A_INT8) or fp32/fp16/bf16 (A_DTYPE)
    w_ptr,        # [n, k] int8 weight
    a_scale_ptr,  # [m] fp32 activation scales (read iff A_INT8 and DEQUANTIZE)
    w_scale_ptr,  # [n] fp32 weight scales (read iff DEQUANTIZE)
    bias_ptr,     # [n] bias, out dtype (read iff HAS_BIAS)
    out_ptr,      # [m, n] out dtype (DEQUANTIZE) or int32, or [splits, m, n] partial sums (SPLIT)
    m,
    n,
    k,
    k_per_split,  # K indices per split, a multiple of BLOCK_K
    partial_stride,  # m * n: elements per split of the partial sums
    A_INT8: tl.constexpr,
    A_DTYPE: tl.constexpr,
    DEQUANTIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    EVEN_K: tl.constexpr,
    INTERPRET: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), m, n, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tile_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, k)
    # tile pointers at K index 0: a [BLOCK_M, BLOCK_K] and w^T [BLOCK_K, BLOCK_N]
    a_ptrs = a_ptr + tl.minimum(rows, m - 1).to(tl.int64)[:, None] * k + tile_k[None, :]
    w_ptrs = w_ptr + tl.minimum(cols, n - 1).to(tl.int64)[None, :] * k + tile_k[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32 if A_INT8 else tl.float32)
    for k_offset in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs + k_offset)
            w = tl.load(w_ptrs + k_offset)
        else:
            in_k = tile_k < k_end - k_offset
            a = tl.load(a_ptrs + k_offset, mask=in_k[None, :], other=0)
            w = tl.load(w_ptrs + k_offset, mask=in_k[:, None], other=0)
        if A_INT8:
            # out_dtype: triton 3.6 checks it against the int32 accumulator (its default is fp32)
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        else:
            if INTERPRET and A_DTYPE == 2:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            else:
                w = w.to(a.dtype)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    if SPLIT:
        out_ptr += pid_k.to(tl.int64) * partial_stride
    _store_output(acc, rows, cols, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, m, n, A_INT8,
                  DEQUANTIZE, HAS_BIAS, OUT_DTYPE)


# Split-K epilogue for one [BLOCK_M, BLOCK_N] tile: acc = sum over s of partial[s] in split order
# (int32, exact, or fp32), then _store_output (the dequantizing epilogue with DEQUANTIZE).
@triton.jit
def _split_k_kernel(
    partial_ptr,  # [splits, m, n] partial sums of _int8_gemm_kernel, int32 or fp32
    a_scale_ptr,  # [m] fp32 activation scales (read iff A_INT8 and DEQUANTIZE)
    w_scale_ptr,  # [n] fp32 weight scales (read iff DEQUANTIZE)
    bias_ptr,     # [n] bias, out dtype (read iff HAS_BIAS)
    out_ptr,      # [m, n] out dtype (DEQUANTIZE) or int32
    m,
    n,
    splits,
    partial_stride,  # m * n: elements per split of the partial sums
    A_INT8: tl.constexpr,
    DEQUANTIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    partial_ptrs = partial_ptr + rows.to(tl.int64)[:, None] * n + cols[None, :]
    acc = tl.load(partial_ptrs, mask=mask, other=0)
    for _ in range(1, splits):
        partial_ptrs += partial_stride
        acc += tl.load(partial_ptrs, mask=mask, other=0)
    _store_output(acc, rows, cols, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, m, n, A_INT8,
                  DEQUANTIZE, HAS_BIAS, OUT_DTYPE)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(tensor, name: str, dtypes, shape=None, device=None):
    """TypeError / ValueError naming `name` unless tensor is a contiguous matrix (shape None) or
    of `shape`, of one of `dtypes`, on `device` (when given)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in dtypes:
        names = ", ".join(str(dtype).replace("torch.", "") for dtype in dtypes)
        raise TypeError(f"{name} must be of dtype {names}, got {tensor.dtype}")
    if shape is None and tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(tensor.shape)}")
    if shape is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, the other inputs on {device}")


def _gemm_config(m: int, a_dtype: torch.dtype, device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for m rows of a_dtype."""
    if device.type == "cpu":
        return (INTERPRETER_BLOCK_M, INTERPRETER_BLOCK_N, INTERPRETER_BLOCK_K, INTERPRETER_GROUP_M,
                1, 1)
    table = {torch.int8: INT8_CONFIGS, torch.float32: FLOAT_CONFIGS}.get(a_dtype, HALF_CONFIGS)
    _, block_m, block_n, block_k, num_warps, num_stages = next(
        config for config in table if m <= config[0])
    return block_m, block_n, block_k, GROUP_M, num_warps, num_stages


def _split_k(tiles: int, k: int, block_k: int, device: torch.device):
    """(splits, k_per_split): K cut into splits of whole BLOCK_K tiles, so that `tiles` output
    tiles make about as many programs as the device runs at once, each walking enough K tiles."""
    if device.type == "cpu":
        programs, min_k_tiles = INTERPRETER_PROGRAMS, INTERPRETER_MIN_SPLIT_K_TILES
    else:
        programs = _multiprocessor_count(device.index) * PROGRAMS_PER_SM
        min_k_tiles = MIN_SPLIT_K_TILES
    k_tiles = max(1, triton.cdiv(k, block_k))
    splits = max(1, min(programs // tiles, k_tiles // min_k_tiles, MAX_SPLIT_K))
    k_tiles_per_split = triton.cdiv(k_tiles, splits)
    return triton.cdiv(k_tiles, k_tiles_per_split), k_tiles_per_split * block_k


def _gemm(a, w, a_scale, w_scale, bias, out):
    """out = the epilogue of a @ w.T (see _int8_gemm_kernel), or the product itself when out is
    int32; a [m, k] int8 or floating, w [n, k] int8, out [m, n] allocated by the caller."""
    (m, k), n = a.shape, w.shape[0]
    if out.numel() == 0:
        return out
    a_int8 = a.dtype == torch.int8
    dequantize = out.dtype != torch.int32
    block_m, block_n, block_k, group_m, num_warps, num_stages = _gemm_config(m, a.dtype, a.device)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits, k_per_split = _split_k(tiles, k, block_k, a.device)
    partial = (torch.empty((splits, m, n), dtype=torch.int32 if a_int8 else torch.float32,
                           device=a.device) if splits > 1 else out)
    # unused pointer arguments get out (never dereferenced)
    pointers = (a_scale if a_scale is not None else out,
                w_scale if w_scale is not None else out,
                bias if bias is not None else out)
    flags = {"A_INT8": a_int8, "HAS_BIAS": bias is not None,
             "OUT_DTYPE": _DTYPE_CODES.get(out.dtype, 0)}
    with _on_device(a):
        _int8_gemm_kernel[(tiles, splits)](
            a, w, *pointers, partial, m, n, k, k_per_split, m * n, **flags,
            A_DTYPE=_DTYPE_CODES.get(a.dtype, 0), DEQUANTIZE=dequantize and splits == 1,
            SPLIT=splits > 1, EVEN_K=k % block_k == 0, INTERPRET=a.device.type == "cpu",
            DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
            num_warps=num_warps, num_stages=num_stages)
        if splits > 1:
            grid = (triton.cdiv(m, REDUCE_BLOCK_M), triton.cdiv(n, REDUCE_BLOCK_N))
            _split_k_kernel[grid](
                partial, *pointers, out, m, n, splits, m * n, **flags, DEQUANTIZE=dequantize,
                BLOCK_M=REDUCE_BLOCK_M, BLOCK_N=REDUCE_BLOCK_N, num_warps=4)
    return out


def quantize_per_token(x):
    """Per-row symmetric int8 quantization of x [m, k] (fp32, fp16 or bf16).

    -> (q int8 [m, k], scale fp32 [m]) with scale = absmax / 127 (1 for a zero row; NaN, with
       q = 0, for a row holding NaN or inf) and q = clamp(rint(x / scale), -127, 127), both bit
       for bit as in common/int8.h
    """
    _check(x, "x", _FLOAT_DTYPES)
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=torch.int8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, scale
    if x.device.type == "cpu":
        block_rows, block_cols = INTERPRETER_QUANTIZE_ROWS, INTERPRETER_QUANTIZE_COLS
    else:
        # one tile shape for every input (rows walked in tiles of it): one variant per dtype
        block_cols = QUANTIZE_COLS
        block_rows = QUANTIZE_TILE_ELEMENTS // block_cols
    with _on_device(x):
        _quantize_per_token_kernel[(triton.cdiv(rows, block_rows),)](
            x, q, scale, rows, cols, INTERPRET=x.device.type == "cpu",
            BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            num_warps=min(8, max(1, block_rows * block_cols // 512)))
    return q, scale


def int8_matmul(a, b):
    """a [m, k] int8 @ b [n, k] int8 transposed -> int32 [m, n], exact."""
    _check(a, "a", (torch.int8,))
    _check(b, "b", (torch.int8,), device=a.device)
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"b must have shape [n, {a.shape[1]}], got {tuple(b.shape)}")
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    return _gemm(a, b, None, None, None, out)


def int8_linear_w8a8(x_q, x_scale, w, w_scale, bias, dtype: torch.dtype):
    """w8a8 linear of common/int8.h: x_q [m, k] int8 with x_scale fp32 [m], w [n, k] int8 with
    w_scale fp32 [n], bias None or [n] of dtype -> out [m, n] of dtype (fp32, fp16 or bf16):
    out = round(float(x_q @ w.T) * x_scale[:, None] * w_scale[None, :] + bias), in fp32."""
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    _check(x_q, "x_q", (torch.int8,))
    (m, k), device = x_q.shape, x_q.device
    _check(w, "w", (torch.int8,), device=device)
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"w must have shape [n, {k}], got {tuple(w.shape)}")
    _check(x_scale, "x_scale", (torch.float32,), (m,), device)
    _check(w_scale, "w_scale", (torch.float32,), (n,), device)
    if bias is not None:
        _check(bias, "bias", (dtype,), (n,), device)
    out = torch.empty((m, n), dtype=dtype, device=device)
    return _gemm(x_q, w, x_scale, w_scale, bias, out)


def int8_linear_w8a16(x, w, w_scale, bias):
    """Weight-only int8 linear of common/int8.h: x [m, k] (fp32, fp16 or bf16), w [n, k] int8 with
    w_scale fp32 [n], bias None or [n] of x.dtype -> out [m, n] of x.dtype:
    out = round((x @ w.T accumulated in fp32) * w_scale[None, :] + bias)."""
    _check(x, "x", _FLOAT_DTYPES)
    (m, k), device = x.shape, x.device
    _check(w, "w", (torch.int8,), device=device)
    n = w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"w must have shape [n, {k}], got {tuple(w.shape)}")
    _check(w_scale, "w_scale", (torch.float32,), (n,), device)
    if bias is not None:
        _check(bias, "bias", (x.dtype,), (n,), device)
    out = torch.empty((m, n), dtype=x.dtype, device=device)
    return _gemm(x, w, None, w_scale, bias, out)
