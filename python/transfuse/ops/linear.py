"""Linear: act(x @ weight^T + bias), act none or GELU: the float GEMMs of a transformer block
(the block rules call it).

On the cpu backend, when autograd records nothing, fp32 and bf16 calls on a CPU with AVX-512 run
transfuse's kernels (under torch.compile inside the custom op transfuse::linear, which Inductor
leaves alone); on a CPU with AVX2 and FMA but not AVX-512, the same in fp32 (own_gemm_rows) and
the GEMV alone, up to FEW_ROWS rows, in bf16 (on an AMD EPYC without AVX-512, 2 threads, on
opus-mt-en-de's, all-MiniLM-L6-v2's and SmolLM-135M's shapes: the GEMV 1.5-1.9x torch's F.linear
at one fp32 row, 1.5-2.8x at one bf16 row and 3.6-4.7x at 4-15; the GEMM 1.8-4.7x at 2-15 fp32
rows, 1.1-2.2x at 16-96, 0.98-1.4x at 128-256, 0.98-1.12x at 512-1024; torch's AVX2 bf16 GEMM
being slow):
- up to FEW_ROWS rows, every call: one row (decoding) the GEMV (csrc/cpu/gemv.cpp): the weights
  read once, as stored, each thread streaming its own rows; bf16 widened exactly, fp32 FMAs. On
  the AMD EPYC (2 threads, SmolLM-135M's shapes) 1.4-2.9x torch's F.linear at one row, whose
  fp32 GEMV read 12 GB/s there. From 2 rows the GEMMs below on their kept panels (on
  all-MiniLM-L6-v2's shapes at 2-15 rows 1.2-2.6x faster than the GEMV, weights hot or cold; 8
  of the bench's 32 one-sentence queries have 9-15 tokens, in bf16 torch's GEMM's before). An
  inference tensor's panels are never kept (packing per call ran up to 2.3x slower than the
  GEMV there), nor is bf16 GEMM'd without AVX512_BF16: there the GEMV, up to 8 bf16 rows (past
  them torch's AVX-512 GEMM overtook it);
- more rows and at least MIN_WORK multiply-adds, on a CPU where they run faster than torch's
  (own_gemm_rows): the GEMMs, fp32 on AVX-512 or AVX2 (csrc/cpu/gemm.cpp), bf16 on AVX512_BF16
  (csrc/cpu/gemm_bf16.cpp: fp32 sums of exact products; subnormal bf16 inputs count as zero):
  the weight packed into L2-sized panels (kept between calls while the weight is unchanged:
  csrc/bindings/packed_weights.h; an inference tensor's packed per call), 6 x 64 register tiles
  (AVX2: 6 x 16).
Which kernel runs depends on the shapes, dtypes, whether the weight is an inference tensor, and
the CPU, not on the panel cache's state, so the same call always gives the same bits.
Both take the bias and GELU (in fp32, as transfuse.ops.bias_gelu computes it) in the epilogue and
round once to x's dtype. Every other call is torch's own F.linear (and F.gelu) (oneDNN on the CPU,
cuBLAS on CUDA: transfuse has no GPU GEMM of its own), which also gives the gradients. The
reference backend computes in float64 and rounds once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, reference
from . import _backend, _library

FEW_ROWS = 15            # up to this many rows transfuse's GEMV or GEMMs take every call
GEMV_MAX_ROWS_BF16 = 8   # bf16 rows the GEMV takes where the GEMMs do not (more: torch's, faster)
MIN_WORK = 1 << 20       # beyond FEW_ROWS, multiply-adds; smaller products: torch's, at its smaller
                         # per-call cost
KERNEL_DTYPES = (torch.float32, torch.bfloat16)


ACTIVATIONS = (None, "gelu", "gelu_tanh")  # gelu: F.gelu's exact (erf) form; gelu_tanh: its tanh


def linear(x, weight, bias=None, *, activation=None, backend=None):
    """act(x [..., k] @ weight [n, k]^T + bias [n]) -> [..., n], as F.linear (same dtypes) then,
    for activation "gelu" / "gelu_tanh", F.gelu (approximate "none" / "tanh")."""
    if (type(x) is Tensor and type(weight) is Tensor and x.is_cpu and type(backend) in (
            str, type(None)) and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (
                bias is not None and bias.requires_grad)))
            and _backend.resolve("linear", backend, x.device) == "cpu"
            and _own_kernel_takes(x, weight)):
        # the whole call in C++, its checks included, where transfuse's kernel takes it: the
        # Python checks below cost as much as the call (a decoding step makes hundreds)
        try:
            out = backends.extension()[0].linear(x, weight, bias, activation or "none")
        except Exception:
            _check_arguments(x, weight, bias, activation, backend)  # words the error
            raise
        if out is not None:
            return out
    _check_arguments(x, weight, bias, activation, backend)
    name = _backend.resolve("linear", backend, x.device)
    if name == "reference":
        return reference.linear(x, weight, bias, activation)
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    if name == "cpu" and not tracked and _own_kernel_takes(x, weight):
        if torch.compiler.is_compiling():  # opaque to Inductor, which would run its own GEMM
            return _cpu_linear(x, weight, bias, activation or "none")
        return _cpu_linear_forward(x, weight, bias, activation or "none")
    return _torch_linear(x, weight, bias, activation or "none")


def _check_arguments(x, weight, bias, activation, backend):
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise TypeError("x must be a float torch.Tensor with at least one dimension")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError("weight must be a 2-D torch.Tensor [out_features, in_features]")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weight must have x's dtype and device ({x.dtype}, {x.device}), got "
                        f"{weight.dtype}, {weight.device}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's in_features "
                         f"({weight.shape[1]})")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (
            weight.shape[0],) or bias.dtype != x.dtype or bias.device != x.device):
        raise ValueError(f"bias must be None or a vector of out_features = {weight.shape[0]} "
                         f"elements with x's dtype and device")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")


def _own_kernel_takes(x, weight):
    """Whether transfuse's GEMV or GEMMs run the call. Up to FEW_ROWS rows the GEMV reads the
    weight as stored, and the GEMMs keep only a contiguous weight's panels: a transposed view
    (which the binding would copy) is torch's there."""
    if x.dtype not in KERNEL_DTYPES:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if rows <= FEW_ROWS:
        return weight.is_contiguous() and gemv_built() and (
            x.dtype == torch.float32 or rows <= GEMV_MAX_ROWS_BF16 or not gemm_built()
            or (gemm_bf16_built() and _panels_kept(weight)))
    return (rows * weight.numel() >= MIN_WORK and rows <= own_gemm_rows()
            and (x.dtype == torch.float32 or gemm_bf16_built()))


def _panels_kept(weight):
    """Whether the GEMMs keep the weight's packed panels: not an inference tensor's (no version
    counter tells its writes). Under torch.compile, which cannot trace is_inference(), assumed
    (compiled inference runs under no_grad; the binding then runs the GEMV for the call)."""
    return torch.compiler.is_compiling() or not weight.is_inference()


@torch.compiler.assume_constant_result  # under torch.compile: called once, not traced
def gemv_built() -> bool:
    """Whether transfuse's GEMV runs on this CPU (AVX-512 or AVX2 with FMA, `transfuse info`:
    cpu_gemv); elsewhere the calls go to torch's at once instead of through an extension call
    that declines them."""
    module = backends.extension()[0]
    return module is not None and bool(module.cpu_gemv)


@torch.compiler.assume_constant_result  # under torch.compile: called once, not traced
def gemm_built() -> bool:
    """Whether transfuse's fp32 GEMM runs on this CPU (AVX-512, `transfuse info`: cpu_gemm)."""
    module = backends.extension()[0]
    return module is not None and bool(module.cpu_gemm)


@torch.compiler.assume_constant_result  # under torch.compile: called once, not traced
def gemm_bf16_built() -> bool:
    """Whether transfuse's bf16 GEMM runs on this CPU (AVX512_BF16, `transfuse info`:
    cpu_gemm_bf16)."""
    module = backends.extension()[0]
    return module is not None and bool(module.cpu_gemm_bf16)


@torch.compiler.assume_constant_result  # under torch.compile: called once, not traced
def own_gemm_rows() -> int:
    """The most rows of x for which transfuse's CPU GEMMs run, and beat torch's, on this CPU, as
    measured (README, "The linear op"): any number on AVX-512 CPUs without AMX (AMD EPYC, Zen 4:
    1.05-1.21x in fp32, 1.10-1.30x in bf16); any number of fp32 rows with AVX2 and FMA but not
    AVX-512 (AMD EPYC, Zen 3, 2 threads, on all-MiniLM-L6-v2's and opus-mt-en-de's shapes: 1.1-2.2x
    F.linear at 16-96 rows, 0.98-1.4x at 128-256, 0.98-1.12x at 512-1024; up to 96 rows before its
    threads took blocks of rows too and its epilogue a tile at a time, when it ran 0.86-0.94x at
    1024); none on an Intel Xeon with AMX, where torch's GEMMs ran faster (fp32 1.2-1.45x; bf16 on
    the AMX tiles far faster than AVX512_BF16): there every call of more than FEW_ROWS rows is
    torch's. (The GEMV is not measured there yet; it runs wherever AVX-512 does.)"""
    module = backends.extension()[0]
    return 0 if module is None or module.cpu_amx else module.cpu_gemm_max_rows


def _torch_linear(x, weight, bias, activation):
    out = F.linear(x, weight, bias)
    if activation == "none":
        return out
    return F.gelu(out, approximate="tanh" if activation == "gelu_tanh" else "none")


def _cpu_linear_forward(x, weight, bias, activation):
    """transfuse's GEMV or GEMM (_own_kernel_takes the call); torch's where the extension
    declines it."""
    out = backends.extension()[0].linear(x, weight, bias, activation)
    return _torch_linear(x, weight, bias, activation) if out is None else out


@_library.op("linear")
def _cpu_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    """-> act(x @ weight^T + bias), a new tensor (inference: no autograd registered)"""
    out = _cpu_linear_forward(x, weight, bias, activation)
    return out.clone() if out is x else out


@_cpu_linear.register_fake
def _(x, weight, bias, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
