"""Triton kernels of the bias + GELU epilogue and of act(gate) * up (SiLU or GELU), forward and
backward.

The math, including where values are rounded, is that of csrc/common/activation.h: z = x + bias
rounded to x's dtype (as eager's add), GELU in fp32, the result rounded once; act(g) * u and its
gradients in fp32, each rounded once. Elementwise: each program handles one
[BLOCK_ROWS, BLOCK_COLS] tile of the [rows, cols] inputs (tiles numbered row block by row block),
loading the tile's bias columns once.

Launchers (called by transfuse.ops.activation with 2-D [rows, cols] tensors):
    bias_gelu_forward(x, bias, approximate) -> y           (x contiguous)
    bias_gelu_backward(dy, x, bias, approximate) -> dx (= dz; dbias, the sum of dz over rows,
                                                        is the caller's torch sum)
    gated_mul_forward(gate, up, activation) -> y           (act: "silu", "gelu" or "gelu_tanh";
    gated_mul_backward(dy, gate, up, activation)            gate and up: rows contiguous, any
        -> (dgate, dup)                                     row strides, e.g. the two halves of
                                                            a [rows, 2 * cols] tensor; dy and
                                                            the outputs contiguous)

On GPU every call takes the same tile shape, and has_bias / use_tanh (gated_mul: use_gelu /
use_tanh) and the row strides are run-time arguments (one uniform branch per program), so one
variant is compiled per kernel, dtype and direction (plus the JIT's divisibility-by-16
specializations of the integer arguments). Under TRITON_INTERPRET=1 (CPU tensors) tiles span whole
rows, to keep the programs few. bf16 rounding goes through kernels/norm.py's helpers (the
interpreter truncates fp32 -> bf16; they round to nearest even first).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .norm import _convert, _round

APPROXIMATIONS = ("none", "tanh")
# GPU tile: 4096 elements (32 per thread at 4 warps); rows of any length, one compiled variant.
BLOCK_ROWS = 8
BLOCK_COLS = 512
NUM_WARPS = 4
# Interpreter tiles: about this many elements, whole rows where they fit.
INTERPRETER_BLOCK_ELEMENTS = 32768

# Dtype codes passed to the kernels as constexpr (kernels/norm.py's).
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Constants of the kernels (tl.constexpr: the only globals a jit function may read).
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
# v = -2u = z * (_TANH_C1 + _TANH_C2 * z^2), u = sqrt(2 / pi) * (z + 0.044715 z^3);
# 2 du/dz = _TANH_D1 + _TANH_D2 * z^2
_TANH_C1 = tl.constexpr(-2.0 * 0.7978845608028654)
_TANH_C2 = tl.constexpr(-2.0 * 0.7978845608028654 * 0.044715)
_TANH_D1 = tl.constexpr(2.0 * 0.7978845608028654)
_TANH_D2 = tl.constexpr(6.0 * 0.7978845608028654 * 0.044715)


# ------------------------------------------------------------------------------------------------
# GELU and its derivative, fp32
# ------------------------------------------------------------------------------------------------

# approximate="none":  gelu(z) = z * Phi(z), Phi(z) = 0.5 * (1 + erf(z / sqrt 2))
# approximate="tanh":  gelu(z) = z * sigmoid(2u) = z * (v <= 0 ? 1 : m) / (1 + m), m = exp(-|v|)
#   (0.5 * (1 + tanh(u)) = sigmoid(2u); m <= 1, so nothing overflows for any z)
@triton.jit
def _gelu(z, use_tanh):
    if use_tanh:
        v = z * (_TANH_C1 + _TANH_C2 * (z * z))
        m = tl.exp(-tl.abs(v))
        y = z * tl.where(v <= 0.0, 1.0, m) / (1.0 + m)
    else:
        y = z * (0.5 + 0.5 * tl.math.erf(z * _INV_SQRT2))
    return y


# none:  gelu'(z) = Phi(z) + z * exp(-z^2 / 2) / sqrt(2 pi)
# tanh:  gelu'(z) = s + z * s (1 - s) * 2 du/dz, s = sigmoid(2u), s (1 - s) = m / (1 + m)^2
@triton.jit
def _gelu_grad(z, use_tanh):
    z2 = z * z
    if use_tanh:
        v = z * (_TANH_C1 + _TANH_C2 * z2)
        m = tl.exp(-tl.abs(v))
        r = 1.0 / (1.0 + m)
        s = tl.where(v <= 0.0, 1.0, m) * r
        g = s + (z * (m * r * r)) * (_TANH_D1 + _TANH_D2 * z2)
    else:
        g = (0.5 + 0.5 * tl.math.erf(z * _INV_SQRT2)) + z * (tl.exp(-0.5 * z2) * _INV_SQRT_2PI)
    return g


# The tile of program `pid`: its element offsets into [rows, cols], mask and column indices.
@triton.jit
def _tile(pid, n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    col_blocks = tl.cdiv(n_cols, BLOCK_COLS)
    row_ids = (pid // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_ids = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    col_mask = col_ids < n_cols
    mask = (row_ids < n_rows)[:, None] & col_mask[None, :]
    offsets = row_ids.to(tl.int64)[:, None] * n_cols + col_ids[None, :]
    return offsets, mask, col_ids, col_mask


# z = round_x(x + bias) in fp32 (z = x without bias), for one tile.
@triton.jit
def _load_z(x_ptr, bias_ptr, offsets, mask, col_ids, col_mask, has_bias, X_DTYPE: tl.constexpr):
    z = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if has_bias:
        b = tl.load(bias_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)
        z = _round(z + b[None, :], X_DTYPE)
    return z


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

# y = round_x(gelu(round_x(x + bias))) for one [BLOCK_ROWS, BLOCK_COLS] tile.
@triton.jit
def _bias_gelu_forward_kernel(
    x_ptr,     # [rows, cols] input, x dtype
    bias_ptr,  # [cols] bias, x dtype (read iff has_bias)
    y_ptr,     # [rows, cols] output, x dtype
    n_rows,
    n_cols,
    has_bias,  # bool, run time
    use_tanh,  # bool, run time: approximate == "tanh"
    X_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    offsets, mask, col_ids, col_mask = _tile(tl.program_id(0), n_rows, n_cols, BLOCK_ROWS,
                                             BLOCK_COLS)
    z = _load_z(x_ptr, bias_ptr, offsets, mask, col_ids, col_mask, has_bias, X_DTYPE)
    tl.store(y_ptr + offsets, _convert(_gelu(z, use_tanh), X_DTYPE), mask=mask)


# dx = round_x(dy * gelu'(round_x(x + bias))) for one [BLOCK_ROWS, BLOCK_COLS] tile.
@triton.jit
def _bias_gelu_backward_kernel(
    dy_ptr,    # [rows, cols] gradient of y, x dtype
    x_ptr,     # [rows, cols] the forward's input, x dtype
    bias_ptr,  # [cols] bias, x dtype (read iff has_bias)
    dx_ptr,    # [rows, cols] gradient of z (= of x), x dtype
    n_rows,
    n_cols,
    has_bias,  # bool, run time
    use_tanh,  # bool, run time: approximate == "tanh"
    X_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    offsets, mask, col_ids, col_mask = _tile(tl.program_id(0), n_rows, n_cols, BLOCK_ROWS,
                                             BLOCK_COLS)
    z = _load_z(x_ptr, bias_ptr, offsets, mask, col_ids, col_mask, has_bias, X_DTYPE)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offsets, _convert(dy * _gelu_grad(z, use_tanh), X_DTYPE), mask=mask)


# The rows and columns of program `pid`'s tile of [rows, cols] (row ids int64) and its mask, for
# inputs whose rows are apart by their own strides.
@triton.jit
def _tile_ids(pid, n_rows, n_cols, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    col_blocks = tl.cdiv(n_cols, BLOCK_COLS)
    row_ids = (pid // col_blocks).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_ids = (pid % col_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (row_ids < n_rows)[:, None] & (col_ids < n_cols)[None, :]
    return row_ids[:, None], col_ids[None, :], mask


# act(g) and act'(g) of act(gate) * up: GELU (exact or tanh, as _gelu) where use_gelu, else SiLU,
# silu(g) = g * s, silu'(g) = s * (1 + g * (1 - s)), s = sigmoid(g) = 1 / (1 + exp(-g)) (exp(-g) =
# inf for g << 0 gives s = 0 and s * (1 + g) = 0: the limits, no overflow).
@triton.jit
def _activate(g, use_gelu, use_tanh):
    if use_gelu:
        a = _gelu(g, use_tanh)
    else:
        a = g / (1.0 + tl.exp(-g))
    return a


@triton.jit
def _activate_grad(g, use_gelu, use_tanh):
    if use_gelu:
        d = _gelu_grad(g, use_tanh)
    else:
        s = 1.0 / (1.0 + tl.exp(-g))
        d = s * (1.0 + g * (1.0 - s))
    return d


# y = round(act(g) * u) for one [BLOCK_ROWS, BLOCK_COLS] tile; g = gate, u = up.
@triton.jit
def _gated_mul_forward_kernel(
    gate_ptr,         # [rows, cols] gate, dtype, rows gate_row_stride elements apart
    up_ptr,           # [rows, cols] up, dtype, rows up_row_stride elements apart
    y_ptr,            # [rows, cols] output, dtype, contiguous
    n_rows,
    n_cols,
    gate_row_stride,
    up_row_stride,
    use_gelu,         # act: GELU (else SiLU); run-time, one uniform branch
    use_tanh,         # GELU's tanh approximation
    DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows, cols, mask = _tile_ids(tl.program_id(0), n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    g = tl.load(gate_ptr + (rows * gate_row_stride + cols), mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + (rows * up_row_stride + cols), mask=mask, other=0.0).to(tl.float32)
    y = _activate(g, use_gelu, use_tanh) * u
    tl.store(y_ptr + (rows * n_cols + cols), _convert(y, DTYPE), mask=mask)


# dup = round(dy * act(g)), dgate = round(dy * u * act'(g)) for one [BLOCK_ROWS, BLOCK_COLS] tile.
@triton.jit
def _gated_mul_backward_kernel(
    dy_ptr,           # [rows, cols] gradient of y, dtype, contiguous
    gate_ptr,         # [rows, cols] gate, dtype, rows gate_row_stride elements apart
    up_ptr,           # [rows, cols] up, dtype, rows up_row_stride elements apart
    dgate_ptr,        # [rows, cols] gradient of gate, dtype, contiguous
    dup_ptr,          # [rows, cols] gradient of up, dtype, contiguous
    n_rows,
    n_cols,
    gate_row_stride,
    up_row_stride,
    use_gelu,
    use_tanh,
    DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
):
    rows, cols, mask = _tile_ids(tl.program_id(0), n_rows, n_cols, BLOCK_ROWS, BLOCK_COLS)
    offsets = rows * n_cols + cols
    g = tl.load(gate_ptr + (rows * gate_row_stride + cols), mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + (rows * up_row_stride + cols), mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dup_ptr + offsets, _convert(dy * _activate(g, use_gelu, use_tanh), DTYPE), mask=mask)
    tl.store(dgate_ptr + offsets,
             _convert(dy * u * _activate_grad(g, use_gelu, use_tanh), DTYPE), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

def _dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"the triton activation kernels take float32, float16 or bfloat16, got "
                        f"{dtype}") from None


def _block(rows: int, cols: int, device: torch.device):
    """(BLOCK_ROWS, BLOCK_COLS, num_warps): fixed on GPU, whole rows under the interpreter."""
    if device.type == "cuda":
        return BLOCK_ROWS, BLOCK_COLS, NUM_WARPS
    block_cols = min(triton.next_power_of_2(cols), INTERPRETER_BLOCK_ELEMENTS)
    block_rows = max(1, min(INTERPRETER_BLOCK_ELEMENTS // block_cols, triton.next_power_of_2(rows)))
    return block_rows, block_cols, 1


def _on_device(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _launch(kernel, x, bias, approximate, pointers):
    rows, cols = x.shape
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
    if rows == 0 or cols == 0:
        return
    block_rows, block_cols, num_warps = _block(rows, cols, x.device)
    grid = (triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols),)
    with _on_device(x):
        kernel[grid](*pointers, rows, cols, bias is not None, approximate == "tanh",
                     X_DTYPE=_dtype_code(x.dtype), BLOCK_ROWS=block_rows,
                     BLOCK_COLS=block_cols, num_warps=num_warps)


def bias_gelu_forward(x, bias, approximate: str):
    """gelu(x + bias) of contiguous x [rows, cols]; bias [cols] of x's dtype or None -> y."""
    y = torch.empty_like(x)
    # unused pointer arguments get x (never dereferenced)
    _launch(_bias_gelu_forward_kernel, x, bias, approximate,
            (x, bias if bias is not None else x, y))
    return y


def bias_gelu_backward(dy, x, bias, approximate: str):
    """dz = dy * gelu'(x + bias) for contiguous dy, x [rows, cols] -> dx (= dz)."""
    dx = torch.empty_like(x)
    _launch(_bias_gelu_backward_kernel, x, bias, approximate,
            (dy, x, bias if bias is not None else x, dx))
    return dx


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t [rows, cols] with each row contiguous (stride(1) == 1; copied if not)."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


GATED_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _gated_mul_check(gate, up, activation, dy=None):
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"activation must be one of {GATED_ACTIVATIONS}, got {activation!r}")
    tensors = (gate, up) if dy is None else (gate, up, dy)
    if any(t.dim() != 2 for t in tensors) or any(t.shape != gate.shape for t in tensors):
        raise ValueError("gated_mul takes 2-D gate, up (and dy) of one shape, got "
                         + ", ".join(str(tuple(t.shape)) for t in tensors))
    if any(t.dtype != gate.dtype for t in tensors):
        raise TypeError("gated_mul takes gate, up (and dy) of one dtype, got "
                        + ", ".join(str(t.dtype) for t in tensors))
    return _dtype_code(gate.dtype)


def _gated_mul_launch(kernel, gate, up, activation, pointers):
    rows, cols = gate.shape
    if rows == 0 or cols == 0:
        return
    block_rows, block_cols, num_warps = _block(rows, cols, gate.device)
    grid = (triton.cdiv(rows, block_rows) * triton.cdiv(cols, block_cols),)
    with _on_device(gate):
        # a row stride is unused when there is one row: that of a contiguous tensor then
        kernel[grid](*pointers, rows, cols, gate.stride(0) if rows > 1 else cols,
                     up.stride(0) if rows > 1 else cols, activation != "silu",
                     activation == "gelu_tanh", DTYPE=_dtype_code(gate.dtype),
                     BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, num_warps=num_warps)


def gated_mul_forward(gate, up, activation: str):
    """act(gate) * up of gate, up [rows, cols] (rows contiguous, any row strides), act "silu",
    "gelu" or "gelu_tanh" -> y (contiguous [rows, cols], their dtype)."""
    _gated_mul_check(gate, up, activation)
    gate, up = _rows_contiguous(gate), _rows_contiguous(up)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _gated_mul_launch(_gated_mul_forward_kernel, gate, up, activation, (gate, up, y))
    return y


def gated_mul_backward(dy, gate, up, activation: str):
    """Gradients of gated_mul_forward for dy [rows, cols] -> (dgate, dup) (contiguous
    [rows, cols], the dtype of gate and up)."""
    _gated_mul_check(gate, up, activation, dy)
    gate, up, dy = _rows_contiguous(gate), _rows_contiguous(up), dy.contiguous()
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _gated_mul_launch(_gated_mul_backward_kernel, gate, up, activation,
                      (dy, gate, up, dgate, dup))
    return dgate, dup
