"""Triton kernels of the fused (residual add +) LayerNorm / RMSNorm, forward and backward.

The math, including where values are rounded, is that of csrc/common/norm.h; statistics and
accumulations are fp32. Rows that fit in one tile (next_power_of_2(cols) <= MAX_FUSED_COLS) are
handled by the "fused" kernels, which hold a block of whole rows in registers; longer rows by the
"looped" kernels, which walk each row in tiles of LOOPED_TILE_COLS elements, two or three times.

Launchers (called by transfuse.ops.norm with contiguous 2-D [rows, cols] tensors):
    norm_forward(x, weight, bias, residual, eps, weight_offset, rms, normalized_dtype, out_dtype)
        -> (y, residual_out, mean, rstd)
    norm_backward(dy, dresidual_out, h, weight, mean, rstd, weight_offset, rms, has_bias)
        -> (dx, dweight, dbias)

Under TRITON_INTERPRET=1 they run on CPU tensors. The interpreter converts fp32 to bf16 by
truncating the mantissa, whereas GPUs round to nearest even, so bf16 values are rounded to
nearest even by hand (`_round_bf16`) before every fp32 -> bf16 conversion; the conversion that
follows is then exact on both.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

# Rows with next_power_of_2(cols) up to this many elements are kept whole in registers.
MAX_FUSED_COLS = 8192
# Tile width of the looped kernels (rows longer than MAX_FUSED_COLS).
LOOPED_TILE_COLS = 4096
LOOPED_NUM_WARPS = 8
# The fused kernels give each program a [BLOCK_ROWS, BLOCK_COLS] block of about this many
# elements (several short rows at once; one row when the row alone is that long).
FUSED_BLOCK_ELEMENTS = 4096
# On GPU, rows up to this many columns take blocks of this width (one compiled variant for all).
MIN_FUSED_COLS = 128
# The same under the interpreter (CPU tensors), where the cost is per program and per operation
# rather than per element: bigger blocks, fewer programs.
INTERPRETER_FUSED_BLOCK_ELEMENTS = 32768
# Backward programs under the interpreter (CPU tensors): a few, so that partial sums get exercised.
INTERPRETER_BACKWARD_PROGRAMS = 4

# Dtype codes passed to the kernels as constexpr.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ------------------------------------------------------------------------------------------------
# Rounding helpers
# ------------------------------------------------------------------------------------------------

# Round fp32 v to the nearest bf16 value (ties to even), returned as fp32:
#   bits = bits(v); bits = (bits + 0x7FFF + lsb_of_bf16(bits)) & 0xFFFF0000   (NaN kept as is)
@triton.jit
def _round_bf16(v):
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))


# v (fp32) converted to the dtype with code DTYPE (0 fp32, 1 fp16, 2 bf16), rounding to nearest.
@triton.jit
def _convert(v, DTYPE: tl.constexpr):
    if DTYPE == 1:
        converted = v.to(tl.float16)
    elif DTYPE == 2:
        converted = _round_bf16(v).to(tl.bfloat16)
    else:
        converted = v
    return converted


# round_T(v) of norm.h: v (fp32) converted to the dtype with code DTYPE and back to fp32.
@triton.jit
def _round(v, DTYPE: tl.constexpr):
    if DTYPE == 1:
        rounded = v.to(tl.float16).to(tl.float32)
    elif DTYPE == 2:
        rounded = _round_bf16(v)
    else:
        rounded = v
    return rounded


# rstd = 1 / sqrt(v) for v = variance + eps (fp32, IEEE), NaN where v is not finite: a variance
# that overflows fp32 makes the row's output NaN (as eager layer_norm gives), not zeros.
@triton.jit
def _inverse_std(v):
    return tl.where(v < float("inf"), tl.math.div_rn(1.0, tl.math.sqrt_rn(v)), float("nan"))


# h = round_x(x + residual) in fp32 (h = x without residual); masked-out elements are 0.
#   x_ptr, residual_ptr: the rows' inputs, x dtype, addressed by `offsets`
@triton.jit
def _load_h(x_ptr, residual_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr, X_DTYPE: tl.constexpr):
    h = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(residual_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        h = _round(h, X_DTYPE)
    return h


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------

# Forward, each program normalizing BLOCK_ROWS whole rows held in one [BLOCK_ROWS, BLOCK_COLS]
# tile (BLOCK_COLS >= cols). Per row, in fp32:
#   h     = round_x(x + residual)                         (written to residual_out)
#   mean  = sum(h) / cols                                 (LayerNorm; 0 for RMSNorm)
#   rstd  = 1 / sqrt(sum((h - mean)^2) / cols + eps)       (NaN where that overflows)
#   x_hat = round_normalized((h - mean) * rstd)
#   y     = round_out(x_hat * (weight_offset + w) + b)     (w = 1, offset unused, without weight;
#                                                         b = 0 without bias)
@triton.jit
def _norm_forward_fused_kernel(
    x_ptr,             # [rows, cols] input, x dtype
    residual_ptr,      # [rows, cols] residual, x dtype (read iff HAS_RESIDUAL)
    weight_ptr,        # [cols] weight (read iff HAS_WEIGHT)
    bias_ptr,          # [cols] bias, weight dtype (read iff HAS_BIAS)
    y_ptr,             # [rows, cols] output, out dtype
    residual_out_ptr,  # [rows, cols] h = x + residual, x dtype (written iff HAS_RESIDUAL)
    mean_ptr,          # [rows] fp32 mean (written iff not RMS)
    rstd_ptr,          # [rows] fp32 1 / standard deviation (or 1 / root mean square)
    n_rows,
    n_cols,
    eps,
    weight_offset,
    RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_DTYPE: tl.constexpr,
    NORMALIZED_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    row_ids = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_ids = tl.arange(0, BLOCK_COLS)
    row_mask = row_ids < n_rows
    col_mask = col_ids < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = row_ids.to(tl.int64)[:, None] * n_cols + col_ids[None, :]

    h = _load_h(x_ptr, residual_ptr, offsets, mask, HAS_RESIDUAL, X_DTYPE)
    if HAS_RESIDUAL:
        tl.store(residual_out_ptr + offsets, _convert(h, X_DTYPE), mask=mask)

    if RMS:
        centered = h
    else:
        mean = tl.sum(h, axis=1) / n_cols
        tl.store(mean_ptr + row_ids, mean, mask=row_mask)
        centered = tl.where(mask, h - mean[:, None], 0.0)
    variance = tl.sum(centered * centered, axis=1) / n_cols
    rstd = _inverse_std(variance + eps)
    tl.store(rstd_ptr + row_ids, rstd, mask=row_mask)

    y = _round(centered * rstd[:, None], NORMALIZED_DTYPE)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)
        y = y * (weight_offset + w)[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(y_ptr + offsets, _convert(y, OUT_DTYPE), mask=mask)


# Forward of one long row per program, walked in tiles of TILE_COLS elements; same math as
# _norm_forward_fused_kernel, in passes over the row (h is recomputed from x and residual in each):
#   pass 1: h = round_x(x + residual) (written to residual_out); sum(h), or sum(h^2) for RMSNorm
#   pass 2 (LayerNorm only): mean = sum(h) / cols; sum((h - mean)^2)
#   then rstd = 1 / sqrt(sum((h - mean)^2) / cols + eps)   (NaN where that overflows)
#   last pass: y = round_out(round_normalized((h - mean) * rstd) * (weight_offset + w) + b)
@triton.jit
def _norm_forward_looped_kernel(
    x_ptr,             # [rows, cols] input, x dtype
    residual_ptr,      # [rows, cols] residual, x dtype (read iff HAS_RESIDUAL)
    weight_ptr,        # [cols] weight (read iff HAS_WEIGHT)
    bias_ptr,          # [cols] bias, weight dtype (read iff HAS_BIAS)
    y_ptr,             # [rows, cols] output, out dtype
    residual_out_ptr,  # [rows, cols] h = x + residual, x dtype (written iff HAS_RESIDUAL)
    mean_ptr,          # [rows] fp32 mean (written iff not RMS)
    rstd_ptr,          # [rows] fp32 1 / standard deviation (or 1 / root mean square)
    n_cols,
    eps,
    weight_offset,
    RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_DTYPE: tl.constexpr,
    NORMALIZED_DTYPE: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    TILE_COLS: tl.constexpr,
):
    row = tl.program_id(0)
    row_start = row.to(tl.int64) * n_cols
    tile = tl.arange(0, TILE_COLS)

    # pass 1: h (stored to residual_out), and the sum of h (LayerNorm) or of h^2 (RMSNorm)
    sums = tl.zeros([TILE_COLS], dtype=tl.float32)
    for tile_start in range(0, n_cols, TILE_COLS):
        col_ids = tile_start + tile
        mask = col_ids < n_cols
        offsets = row_start + col_ids
        h = _load_h(x_ptr, residual_ptr, offsets, mask, HAS_RESIDUAL, X_DTYPE)
        if HAS_RESIDUAL:
            tl.store(residual_out_ptr + offsets, _convert(h, X_DTYPE), mask=mask)
        if RMS:
            sums += h * h
        else:
            sums += h
    if RMS:
        variance = tl.sum(sums, axis=0) / n_cols
        mean = 0.0
    else:
        # pass 2: the sum of squared deviations from the mean
        mean = tl.sum(sums, axis=0) / n_cols
        tl.store(mean_ptr + row, mean)
        squares = tl.zeros([TILE_COLS], dtype=tl.float32)
        for tile_start in range(0, n_cols, TILE_COLS):
            col_ids = tile_start + tile
            mask = col_ids < n_cols
            h = _load_h(x_ptr, residual_ptr, row_start + col_ids, mask, HAS_RESIDUAL, X_DTYPE)
            centered = tl.where(mask, h - mean, 0.0)
            squares += centered * centered
        variance = tl.sum(squares, axis=0) / n_cols
    rstd = _inverse_std(variance + eps)
    tl.store(rstd_ptr + row, rstd)

    # last pass: normalize, scale, shift
    for tile_start in range(0, n_cols, TILE_COLS):
        col_ids = tile_start + tile
        mask = col_ids < n_cols
        offsets = row_start + col_ids
        h = _load_h(x_ptr, residual_ptr, offsets, mask, HAS_RESIDUAL, X_DTYPE)
        if RMS:
            y = _round(h * rstd, NORMALIZED_DTYPE)
        else:
            y = _round((h - mean) * rstd, NORMALIZED_DTYPE)
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + col_ids, mask=mask, other=0.0).to(tl.float32)
            y = y * (weight_offset + w)
        if HAS_BIAS:
            b = tl.load(bias_ptr + col_ids, mask=mask, other=0.0).to(tl.float32)
            y = y + b
        tl.store(y_ptr + offsets, _convert(y, OUT_DTYPE), mask=mask)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------

# Backward, each program taking rows [row_begin, row_end) = its contiguous share of
# rows_per_program rows, BLOCK_ROWS whole rows at a time (BLOCK_COLS >= cols). Per row, in fp32:
#   x_hat = (h - mean) * rstd                  (mean = 0 for RMSNorm)
#   g     = dy * (weight_offset + w)           (g = dy without weight)
#   dh    = rstd * (g - mean(g) - x_hat * mean(g * x_hat))   (RMSNorm: without the mean(g) term)
#   dx    = round_x(dh + dresidual_out)
# and per program, over its rows:
#   dweight_partial[program] = sum(dy * x_hat),  dbias_partial[program] = sum(dy)
@triton.jit
def _norm_backward_fused_kernel(
    dy_ptr,              # [rows, cols] gradient of y, out dtype
    dresidual_out_ptr,   # [rows, cols] gradient of residual_out, x dtype (read iff HAS_DRESIDUAL)
    h_ptr,               # [rows, cols] the normalized input h = x + residual, x dtype
    weight_ptr,          # [cols] weight (read iff HAS_WEIGHT)
    mean_ptr,            # [rows] fp32 mean of the forward (read iff not RMS)
    rstd_ptr,            # [rows] fp32 rstd of the forward
    dx_ptr,              # [rows, cols] gradient of h (= of x and of residual), x dtype
    dweight_partial_ptr, # [programs, cols] fp32 per-program sums of dy * x_hat (iff HAS_WEIGHT)
    dbias_partial_ptr,   # [programs, cols] fp32 per-program sums of dy (written iff HAS_BIAS)
    n_rows,
    n_cols,
    rows_per_program,
    weight_offset,
    RMS: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    program = tl.program_id(0)
    row_begin = program * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)
    col_ids = tl.arange(0, BLOCK_COLS)
    col_mask = col_ids < n_cols
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)
        scale = (weight_offset + w)[None, :]
    dweight_sums = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)
    dbias_sums = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.float32)

    for block_start in range(row_begin, row_end, BLOCK_ROWS):
        row_ids = block_start + tl.arange(0, BLOCK_ROWS)
        row_mask = row_ids < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = row_ids.to(tl.int64)[:, None] * n_cols + col_ids[None, :]

        h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row_ids, mask=row_mask, other=0.0)[:, None]
        if RMS:
            x_hat = h * rstd
        else:
            mean = tl.load(mean_ptr + row_ids, mask=row_mask, other=0.0)[:, None]
            x_hat = tl.where(mask, (h - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            g = dy * scale
        else:
            g = dy
        mean_g_x_hat = (tl.sum(g * x_hat, axis=1) / n_cols)[:, None]
        if RMS:
            dh = (g - x_hat * mean_g_x_hat) * rstd
        else:
            mean_g = (tl.sum(g, axis=1) / n_cols)[:, None]
            dh = (g - mean_g - x_hat * mean_g_x_hat) * rstd
        if HAS_DRESIDUAL:
            dh += tl.load(dresidual_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offsets, _convert(dh, X_DTYPE), mask=mask)

        if HAS_WEIGHT:
            dweight_sums += dy * x_hat
        if HAS_BIAS:
            dbias_sums += dy

    partial_offsets = program.to(tl.int64) * n_cols + col_ids
    if HAS_WEIGHT:
        tl.store(dweight_partial_ptr + partial_offsets, tl.sum(dweight_sums, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(dbias_partial_ptr + partial_offsets, tl.sum(dbias_sums, axis=0), mask=col_mask)


# Backward of long rows, one row at a time, each walked in tiles of TILE_COLS elements; same math
# as _norm_backward_fused_kernel, in two passes over each row:
#   pass 1: x_hat = (h - mean) * rstd, g = dy * (weight_offset + w); sum(g * x_hat), sum(g)
#   pass 2: dx = round_x(rstd * (g - mean(g) - x_hat * mean(g * x_hat)) + dresidual_out), and
#           dweight_partial[program] += dy * x_hat, dbias_partial[program] += dy
# The partial rows are read-modify-written tile by tile (each belongs to one program) and must be
# zero on entry.
@triton.jit
def _norm_backward_looped_kernel(
    dy_ptr,              # [rows, cols] gradient of y, out dtype
    dresidual_out_ptr,   # [rows, cols] gradient of residual_out, x dtype (read iff HAS_DRESIDUAL)
    h_ptr,               # [rows, cols] the normalized input h = x + residual, x dtype
    weight_ptr,          # [cols] weight (read iff HAS_WEIGHT)
    mean_ptr,            # [rows] fp32 mean of the forward (read iff not RMS)
    rstd_ptr,            # [rows] fp32 rstd of the forward
    dx_ptr,              # [rows, cols] gradient of h (= of x and of residual), x dtype
    dweight_partial_ptr, # [programs, cols] fp32, zeroed: per-program sums of dy * x_hat
    dbias_partial_ptr,   # [programs, cols] fp32, zeroed: per-program sums of dy
    n_rows,
    n_cols,
    rows_per_program,
    weight_offset,
    RMS: tl.constexpr,
    HAS_DRESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    X_DTYPE: tl.constexpr,
    TILE_COLS: tl.constexpr,
):
    program = tl.program_id(0)
    row_begin = program.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)
    tile = tl.arange(0, TILE_COLS)
    partial_start = program.to(tl.int64) * n_cols

    for row in range(row_begin, row_end):  # int64 row index
        row_start = row * n_cols
        rstd = tl.load(rstd_ptr + row)
        if RMS:
            mean = 0.0
        else:
            mean = tl.load(mean_ptr + row)

        # pass 1: the row sums of g * x_hat and of g
        sums_g_x_hat = tl.zeros([TILE_COLS], dtype=tl.float32)
        sums_g = tl.zeros([TILE_COLS], dtype=tl.float32)
        for tile_start in range(0, n_cols, TILE_COLS):
            col_ids = tile_start + tile
            mask = col_ids < n_cols
            offsets = row_start + col_ids
            h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + col_ids, mask=mask, other=0.0).to(tl.float32)
                g = g * (weight_offset + w)
            x_hat = tl.where(mask, (h - mean) * rstd, 0.0)
            sums_g_x_hat += g * x_hat
            sums_g += g
        mean_g_x_hat = tl.sum(sums_g_x_hat, axis=0) / n_cols
        mean_g = tl.sum(sums_g, axis=0) / n_cols

        # pass 2: dx, and the row's contribution to the partial sums
        for tile_start in range(0, n_cols, TILE_COLS):
            col_ids = tile_start + tile
            mask = col_ids < n_cols
            offsets = row_start + col_ids
            h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + col_ids, mask=mask, other=0.0).to(tl.float32)
                g = dy * (weight_offset + w)
            else:
                g = dy
            x_hat = tl.where(mask, (h - mean) * rstd, 0.0)
            if RMS:
                dh = (g - x_hat * mean_g_x_hat) * rstd
            else:
                dh = (g - mean_g - x_hat * mean_g_x_hat) * rstd
            if HAS_DRESIDUAL:
                dh += tl.load(dresidual_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + offsets, _convert(dh, X_DTYPE), mask=mask)
            if HAS_WEIGHT:
                dweight_ptrs = dweight_partial_ptr + partial_start + col_ids
                tl.store(dweight_ptrs, tl.load(dweight_ptrs, mask=mask, other=0.0) + dy * x_hat,
                         mask=mask)
            if HAS_BIAS:
                dbias_ptrs = dbias_partial_ptr + partial_start + col_ids
                tl.store(dbias_ptrs, tl.load(dbias_ptrs, mask=mask, other=0.0) + dy, mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"the triton norm kernels take float32, float16 or bfloat16, got {dtype}")


def _fused_block(rows: int, cols: int, device: torch.device):
    """(BLOCK_ROWS, BLOCK_COLS) of the fused kernels, or None when a row needs the looped ones."""
    block_cols = triton.next_power_of_2(cols)
    if block_cols > MAX_FUSED_COLS:
        return None
    if device.type != "cuda":
        return max(1, min(INTERPRETER_FUSED_BLOCK_ELEMENTS // block_cols,
                          triton.next_power_of_2(rows))), block_cols
    # On GPU the block depends on cols alone (not on the number of rows: masked rows cost
    # little), and short rows share one width, so that few variants get compiled.
    block_cols = max(block_cols, MIN_FUSED_COLS)
    return FUSED_BLOCK_ELEMENTS // block_cols if block_cols < FUSED_BLOCK_ELEMENTS else 1, block_cols


def _num_warps(block_elements: int) -> int:
    # about 16 elements per thread (fewer in blocks under 512 elements), 1 to 16 warps
    return min(16, max(1, block_elements // 512))


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _backward_grid(rows: int, block_rows: int, num_warps: int, device: torch.device):
    """(programs, rows_per_program): contiguous row shares, multiples of block_rows."""
    if device.type == "cuda":
        # enough resident warps per multiprocessor to hide memory latency, few partial rows
        max_programs = _multiprocessor_count(device.index) * max(1, 32 // num_warps)
    else:
        max_programs = INTERPRETER_BACKWARD_PROGRAMS
    rows_per_program = triton.cdiv(triton.cdiv(rows, max_programs), block_rows) * block_rows
    return triton.cdiv(rows, rows_per_program), rows_per_program


def _on_device(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def norm_forward(x, weight, bias, residual, eps: float, weight_offset: float, rms: bool,
                 normalized_dtype: torch.dtype, out_dtype: torch.dtype, save_stats: bool = True):
    """Fused (residual add +) LayerNorm / RMSNorm over the last dimension of x [..., cols]
    (rows = x.numel() / cols; x, residual, weight and bias of any layout).

    -> (y (x's shape, out_dtype), residual_out (x + residual, or empty without residual),
        mean [rows] fp32 (empty for RMSNorm), rstd [rows] fp32)
    save_stats is the C++ binding's (which then returns empty statistics); the Triton kernels
    write the statistics either way.
    """
    x, residual, weight, bias = (None if t is None else t.contiguous()
                                 for t in (x, residual, weight, bias))
    cols = x.shape[-1]
    rows = x.numel() // cols
    x_code = _dtype_code(x.dtype)
    normalized_code = _dtype_code(normalized_dtype)
    out_code = _dtype_code(out_dtype)
    has_bias = bias is not None and not rms
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else x.new_empty(0)
    mean = x.new_empty(0 if rms else rows, dtype=torch.float32)
    rstd = x.new_empty(rows, dtype=torch.float32)
    if rows == 0:
        return y, residual_out, mean, rstd

    # unused pointer arguments get x (never dereferenced)
    pointers = (x,
                residual if residual is not None else x,
                weight if weight is not None else x,
                bias if has_bias else x,
                y,
                residual_out if residual is not None else x,
                mean if not rms else rstd,
                rstd)
    flags = dict(RMS=rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=has_bias, X_DTYPE=x_code, NORMALIZED_DTYPE=normalized_code,
                 OUT_DTYPE=out_code)
    block = _fused_block(rows, cols, x.device)
    with _on_device(x):
        if block is not None:
            block_rows, block_cols = block
            _norm_forward_fused_kernel[(triton.cdiv(rows, block_rows),)](
                *pointers, rows, cols, float(eps), float(weight_offset), **flags,
                BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
                num_warps=_num_warps(block_rows * block_cols))
        else:
            _norm_forward_looped_kernel[(rows,)](
                *pointers, cols, float(eps), float(weight_offset), **flags,
                TILE_COLS=LOOPED_TILE_COLS, num_warps=LOOPED_NUM_WARPS)
    return y, residual_out, mean, rstd


def norm_backward(dy, dresidual_out, h, weight, mean, rstd, weight_offset: float, rms: bool,
                  has_bias: bool):
    """Gradients of norm_forward, from h (= x + residual) and the saved mean / rstd.

    -> (dx (h's shape and dtype; also the gradient of residual), dweight [cols] weight.dtype
        (empty without weight), dbias [cols] (empty without bias))
    dbias has weight's dtype, or h's when there is a bias but no weight.
    """
    dy, dresidual_out, h, weight = (None if t is None else t.contiguous()
                                    for t in (dy, dresidual_out, h, weight))
    cols = h.shape[-1]
    rows = h.numel() // cols
    x_code = _dtype_code(h.dtype)
    _dtype_code(dy.dtype)
    has_weight = weight is not None
    has_bias = bool(has_bias) and not rms
    param_dtype = weight.dtype if has_weight else h.dtype
    dx = torch.empty_like(h)

    block = _fused_block(rows, cols, h.device)
    if block is not None:
        block_rows, block_cols = block
        num_warps = _num_warps(block_rows * block_cols)
    else:
        block_rows, num_warps = 1, LOOPED_NUM_WARPS
    if rows > 0:
        programs, rows_per_program = _backward_grid(rows, block_rows, num_warps, h.device)
    else:
        programs, rows_per_program = 0, 1
    # the looped kernel adds into its partial rows, the fused one writes them whole
    allocate = torch.empty if block is not None else torch.zeros
    dweight_partial = (allocate((programs, cols), dtype=torch.float32, device=h.device)
                       if has_weight else None)
    dbias_partial = (allocate((programs, cols), dtype=torch.float32, device=h.device)
                     if has_bias else None)

    if rows > 0:
        pointers = (dy,
                    dresidual_out if dresidual_out is not None else dy,
                    h,
                    weight if has_weight else h,
                    mean if not rms else rstd,
                    rstd,
                    dx,
                    dweight_partial if has_weight else dx,
                    dbias_partial if has_bias else dx)
        flags = dict(RMS=rms, HAS_DRESIDUAL=dresidual_out is not None, HAS_WEIGHT=has_weight,
                     HAS_BIAS=has_bias, X_DTYPE=x_code)
        with _on_device(h):
            if block is not None:
                _norm_backward_fused_kernel[(programs,)](
                    *pointers, rows, cols, rows_per_program, float(weight_offset), **flags,
                    BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps)
            else:
                _norm_backward_looped_kernel[(programs,)](
                    *pointers, rows, cols, rows_per_program, float(weight_offset), **flags,
                    TILE_COLS=LOOPED_TILE_COLS, num_warps=num_warps)

    dweight = dweight_partial.sum(0).to(param_dtype) if has_weight else h.new_empty(0)
    dbias = dbias_partial.sum(0).to(param_dtype) if has_bias else h.new_empty(0)
    return dx, dweight, dbias
