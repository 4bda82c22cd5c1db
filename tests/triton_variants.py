"""The Triton kernel variants that the GPU tests and the GPU benchmarks launch, found and compiled
for CUDA targets without a GPU and without launching anything.

How: each row of ROWS calls the launchers of kernels/ (the code that picks tiles, warps, stages
and constexpr flags on a GPU) on fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and
strides, no memory), with JITFunction.run replaced by a recorder. A variant is (kernel, constexpr
values, argument types, num_warps, num_stages); each distinct one is compiled with
`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`, which
runs the whole pipeline (TTIR, TTGIR, LLIR, PTX, ptxas -> cubin) for that target. This catches
what the interpreter cannot: a tl.dot whose out_dtype the GPU compiler rejects, shared memory or
registers over the target's limits, a construct a given triton version no longer accepts.

Rows are grouped: "gpu-tests" mirror the parameters of the `gpu`-marked tests (tests/test_norm.py,
test_activation.py, test_rotary.py, test_int8.py, test_attention.py, test_varlen_attention.py,
test_attention_cuda.py; the cuda backend's Triton fallbacks (attention backward, fp32, dropout;
w8a16 with m > 16) launch a subset of the triton backend's variants; the attention tests' gpu runs
are the parameters of their GPU_* lists, imported here), "bench" the shapes of
benchmarks/gpu_quick.py. Add a row to cover a new launcher: a function taking nothing that calls
launchers on `cuda(...)` tensors.

On a GPU, triton's JIT also specializes integer arguments equal to 1 and pointer / integer
divisibility by 16, so the compiles there are somewhat more than the variants counted here; the
compile of each such specialization goes through the same code.

    python tests/triton_variants.py --list              # the variants, counted per kernel
    python tests/triton_variants.py --compile [--all]   # compile for sm_80 and sm_90
      (default: a representative subset -- every kernel, every constexpr flag value and dtype
       that occurs, at least once; --all: every variant)
    --groups gpu-tests,bench (default) selects row groups, --rows attention,varlen-attention rows
    by name; --spills prints each sm_90 build's registers and spill bytes (ptxas -v)
Must run without TRITON_INTERPRET (the kernels must be JITFunctions); tests/test_triton_compile.py
runs it in a subprocess.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from transfuse.kernels import activation as tactivation  # noqa: E402
from transfuse.kernels import attention as tattention  # noqa: E402
from transfuse.kernels import int8 as tint8  # noqa: E402
from transfuse.kernels import norm as tnorm  # noqa: E402
from transfuse.kernels import rotary as trotary  # noqa: E402

TARGETS = (80, 90)
MULTIPROCESSORS = 132  # H100 / H200 SXM (the split-K and backward grids depend on it)
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                  torch.int8: "i8", torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64",
                  torch.bool: "i1", torch.float64: "fp64"}


def cuda(*shape, dtype=torch.float32):
    """A fake CUDA tensor (inside record())."""
    return torch.empty(shape, dtype=dtype, device="cuda")


def _scalar_type(value):
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        if -2 ** 31 <= value < 2 ** 31:
            return "i32"
        if 2 ** 31 <= value < 2 ** 32:
            return "u32"
        return "i64" if -2 ** 63 <= value < 2 ** 63 else "u64"
    if isinstance(value, float):
        return "fp32"
    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[value.dtype]
    raise TypeError(f"no triton type for {type(value).__name__}")


class Variant(tuple):
    """(kernel name, constexprs, signature, options) with the JITFunction alongside."""

    def __new__(cls, fn, constexprs, signature, options):
        self = super().__new__(cls, (fn.__name__, tuple(sorted(constexprs.items())),
                                     tuple(signature.items()), tuple(sorted(options.items()))))
        self.fn = fn
        return self

    @property
    def name(self):
        return self[0]

    def describe(self):
        flags = ",".join(f"{k}={v}" for k, v in self[1])
        types = ",".join(t for _, t in self[2] if t != "constexpr")
        opts = ",".join(f"{k}={v}" for k, v in self[3])
        return f"{self[0]}[{flags}]({types}) {opts}"


def record(call):
    """The variants that call() launches (in launch order, duplicates dropped)."""
    found = {}

    def run(self, *args, grid=None, warmup=False, **kwargs):
        options = {k: kwargs.pop(k) for k in OPTION_NAMES if k in kwargs}
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        bound.apply_defaults()
        constexprs, signature = {}, {}
        for param in self.params:
            value = bound.arguments[param.name]
            if param.is_constexpr or value is None:
                constexprs[param.name] = value
                signature[param.name] = "constexpr"
            else:
                signature[param.name] = _scalar_type(value)
        variant = Variant(self, constexprs, signature, options)
        found.setdefault(variant, variant)

    patches = [(JITFunction, "run", run)]
    for module in (tnorm, tint8, tattention, tactivation, trotary):
        if hasattr(module, "_on_device"):
            patches.append((module, "_on_device", lambda tensor: contextlib.nullcontext()))
        if hasattr(module, "_multiprocessor_count"):
            patches.append((module, "_multiprocessor_count", lambda index: MULTIPROCESSORS))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        with FakeTensorMode():
            call()
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
    return list(found)


# ------------------------------------------------------------------------------------------------
# Rows: what the launchers are called with
# ------------------------------------------------------------------------------------------------

_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16


def _norm(rows, cols, x_dtype, *, rms, weight_dtype=None, weight=True, bias=True, residual=True,
          casting_mode="llama", backward=True):
    """transfuse.ops.layer_norm / rms_norm (forward and, with backward, its gradient) as
    ops/norm.py calls the Triton launchers."""
    from transfuse import reference
    weight_dtype = weight_dtype or x_dtype
    if rms:
        normalized, out_dtype = reference.rms_norm_dtypes(x_dtype, weight_dtype, casting_mode)
        bias = False
    else:
        normalized, out_dtype = torch.float32, x_dtype
    x = cuda(rows, cols, dtype=x_dtype)
    w = cuda(cols, dtype=weight_dtype) if weight else None
    b = cuda(cols, dtype=weight_dtype) if bias else None
    r = cuda(rows, cols, dtype=x_dtype) if residual else None
    y, h, mean, rstd = tnorm.norm_forward(x, w, b, r, 1e-5, 0.0, rms, normalized, out_dtype)
    if backward:
        tnorm.norm_backward(cuda(rows, cols, dtype=out_dtype), h if residual else None,
                            h if residual else x, w, mean, rstd, 0.0, rms, bias)


def _bias_gelu(rows, cols, dtype, *, bias=True, approximate="none", backward=True):
    """transfuse.ops.bias_gelu on the triton backend (forward and, with backward, dz)."""
    x = cuda(rows, cols, dtype=dtype)
    b = cuda(cols, dtype=dtype) if bias else None
    tactivation.bias_gelu_forward(x, b, approximate)
    if backward:
        tactivation.bias_gelu_backward(cuda(rows, cols, dtype=dtype), x, b, approximate)


def _gated_mul(rows, cols, dtype, *, joint=True, backward=True, activation="silu"):
    """transfuse.ops.silu_mul / gelu_mul on the triton backend (forward and, with backward, dgate
    and dup); joint: gate and up the two halves of one [rows, 2 * cols] tensor (one gate-up
    GEMM)."""
    if joint:  # (views of fake CUDA tensors need CUDA: strided tensors of the views' layout)
        gate, up = (torch.empty_strided((rows, cols), (2 * cols, 1), dtype=dtype, device="cuda")
                    for _ in range(2))
    else:
        gate, up = cuda(rows, cols, dtype=dtype), cuda(rows, cols, dtype=dtype)
    tactivation.gated_mul_forward(gate, up, activation)
    if backward:
        tactivation.gated_mul_backward(cuda(rows, cols, dtype=dtype), gate, up, activation)


def _rotary(batch, q_heads, k_heads, seq, head_dim, dtype, *, shared_cos=True, backward=True):
    """transfuse.ops.rotary on the triton backend: q and k the transposed views of [B, S, H, D]
    projections, cos / sin [1 or B, S, D]; the backward is the inverse on contiguous gradients."""
    q, k = (torch.empty_strided((batch, heads, seq, head_dim),
                                (seq * heads * head_dim, head_dim, heads * head_dim, 1),
                                dtype=dtype, device="cuda") for heads in (q_heads, k_heads))
    cos, sin = (cuda(1 if shared_cos else batch, seq, head_dim, dtype=dtype) for _ in range(2))
    trotary.rotary(q, k, cos, sin, False)
    if backward:
        trotary.rotary(cuda(batch, q_heads, seq, head_dim, dtype=dtype),
                       cuda(batch, k_heads, seq, head_dim, dtype=dtype), cos, sin, True)


def _int8(m, n, k, dtype, mode, bias=True):
    """transfuse.ops.int8_linear on the triton backend (w8a8: quantize, then the GEMM)."""
    x = cuda(m, k, dtype=dtype)
    w = cuda(n, k, dtype=torch.int8)
    w_scale = cuda(n)
    b = cuda(n, dtype=dtype) if bias else None
    if mode == "w8a8":
        x_q, x_scale = tint8.quantize_per_token(x)
        tint8.int8_linear_w8a8(x_q, x_scale, w, w_scale, b, dtype)
    else:
        tint8.int8_linear_w8a16(x, w, w_scale, b)


def _attention(shape, dtype, *, mask=None, causal=False, window=0, softcap=0.0, dropout_p=0.0,
               backward=True, bias_grad=False):
    """transfuse.ops.attention's Triton forward (and backward); mask None, "padding" [B,1,1,Skv]
    bool, "bool" [B,Hq,Sq,Skv], "additive" [B,1,Sq,Skv] of dtype, "bias" [1,Hq,Sq,Skv]."""
    b, hq, hkv, sq, skv, d = shape
    q, k, v = cuda(b, hq, sq, d, dtype=dtype), cuda(b, hkv, skv, d, dtype=dtype), \
        cuda(b, hkv, skv, d, dtype=dtype)
    masks = {None: None,
             "padding": lambda: cuda(b, 1, 1, skv, dtype=torch.bool).expand(b, hq, sq, skv),
             "bool": lambda: cuda(b, hq, sq, skv, dtype=torch.bool),
             "additive": lambda: cuda(b, 1, sq, skv, dtype=dtype).expand(b, hq, sq, skv),
             "bias": lambda: cuda(1, hq, sq, skv, dtype=dtype).expand(b, hq, sq, skv)}
    m = masks[mask]() if mask else None
    scale = d ** -0.5
    out, lse = tattention.attention_forward(q, k, v, m, causal, scale, window, softcap,
                                            dropout_p, 1234)
    if backward:
        tattention.attention_backward(cuda(b, hq, sq, d, dtype=dtype), q, k, v, out, lse, m,
                                      causal, scale, window, softcap, dropout_p, 1234,
                                      bias_grad)


def _varlen(lengths_q, lengths_k, heads_q, heads_kv, d, dtype, *, mask=None, causal=False,
            window=0, softcap=0.0, dropout_p=0.0, backward=True, bias_grad=False):
    """transfuse.ops.varlen_attention's Triton forward (and backward) on packed sequences of
    these lengths (cu_seqlens int32 on the device); mask None, "bool" [B,1,1,max_k] or "bias"
    [1,Hq,max_q,max_k] of dtype, broadcast to [B, Hq, max_q, max_k] as ops/attention.py does."""
    lengths_k = lengths_k or lengths_q
    batch, max_q, max_k = len(lengths_q), max(lengths_q), max(lengths_k)
    q = cuda(sum(lengths_q), heads_q, d, dtype=dtype)
    k, v = (cuda(sum(lengths_k), heads_kv, d, dtype=dtype) for _ in range(2))
    cu_q, cu_k = (cuda(batch + 1, dtype=torch.int32) for _ in range(2))
    extent = (batch, heads_q, max_q, max_k)
    masks = {None: None,
             "bool": lambda: cuda(batch, 1, 1, max_k, dtype=torch.bool).expand(extent),
             "bias": lambda: cuda(1, heads_q, max_q, max_k, dtype=dtype).expand(extent)}
    m = masks[mask]() if mask else None
    layout = (cu_q, cu_k, max_q, max_k)
    scale = d ** -0.5
    out, lse = tattention.varlen_attention_forward(q, k, v, *layout, m, causal, scale, window,
                                                   softcap, dropout_p, 99)
    if backward:
        tattention.varlen_attention_backward(cuda(*q.shape, dtype=dtype), q, k, v, out, lse,
                                             *layout, m, causal, scale, window, softcap,
                                             dropout_p, 99, bias_grad)


def _norm_test_rows():
    from test_norm import DTYPES, GPU_RMS_HIDDEN, HIDDEN, ROWS
    for dtype in DTYPES:
        for cols in HIDDEN:
            for rows in ROWS:
                _norm(rows, cols, dtype, rms=False)                       # layer_norm_residual
                for mode, hidden in GPU_RMS_HIDDEN.items():               # rms_norm_residual
                    if cols in hidden:
                        _norm(rows, cols, dtype, rms=True, casting_mode=mode)
    for weight, bias in [(False, False), (True, False), (False, True), (True, True)]:
        _norm(5, 100, _F32, rms=False, weight=weight, bias=bias, residual=False)
    for mode in ("llama", "t5", "gemma"):
        for x_dtype, w_dtype in [(_BF16, _F32), (_F16, _F32), (_F32, _BF16)]:
            _norm(4, 64, x_dtype, rms=True, weight_dtype=w_dtype, casting_mode=mode)
    _norm(2, 65536, _F32, rms=False)                                      # largest_hidden_size
    _norm(2, 65536, _F32, rms=True)
    _norm(6, 16, _F32, rms=False, bias=False)                             # leading dims
    _norm(30, 16, _F32, rms=True, residual=False, backward=False)
    _norm(6, 64, _F32, rms=True, backward=False)                          # non-contiguous


def _activation_test_rows():
    """tests/test_activation.py's gpu runs. has_bias and approximate are run-time arguments of
    the kernels and the tile is fixed on GPU, so they build one variant per dtype and direction
    whatever the shape (the calls below are those of the main test; the others are alike)."""
    from test_activation import APPROXIMATIONS, DTYPES, HIDDEN, ROWS
    for dtype in DTYPES:
        for cols in HIDDEN:
            for approximate in APPROXIMATIONS:
                for i, rows in enumerate(ROWS):
                    _bias_gelu(rows, cols, dtype, bias=i % 2 == 0, approximate=approximate)
            for i, rows in enumerate(ROWS):  # gated_mul: likewise one variant per dtype and way
                for activation in ("silu", "gelu", "gelu_tanh"):
                    _gated_mul(rows, cols, dtype, joint=i % 2 == 1, activation=activation)


def _rotary_test_rows():
    """tests/test_rotary.py's gpu runs: one variant per dtype and head-dim bucket
    (next_power_of_2(D / 2)); `inverse` is a run-time argument."""
    from test_rotary import DTYPES, GPU_SHAPES
    for dtype in DTYPES:
        for shape in GPU_SHAPES:
            for shared_cos in (True, False):
                _rotary(*shape, dtype, shared_cos=shared_cos)
    _rotary(2, 3, 1, 5, 64, _F32, shared_cos=False)  # test_layouts_and_general_angles


def _int8_test_rows():
    from test_int8 import DTYPES, SHAPES
    for dtype in DTYPES:
        for m, k in [(1, 1), (3, 7), (17, 300), (40, 1000), (6, 32)]:    # quantize_per_token
            tint8.quantize_per_token(cuda(m, k, dtype=dtype))
    for m, n, k in [(1, 1, 1), (3, 5, 1), (5, 7, 15), (17, 130, 100), (64, 64, 64), (3, 5, 1100)]:
        tint8.int8_matmul(cuda(m, k, dtype=torch.int8), cuda(n, k, dtype=torch.int8))
    for m, n, k in SHAPES:
        if m == 0:
            continue
        for dtype in DTYPES:
            for bias in (False, True):
                _int8(m, n, k, dtype, "w8a8", bias)
                _int8(m, n, k, dtype, "w8a16", bias)
    for mode in ("w8a8", "w8a16"):                                        # leading dims + grads
        _int8(6, 24, 40, _F32, mode)
        tint8.int8_linear_w8a16(cuda(6, 24), cuda(40, 24, dtype=torch.int8), cuda(40), None)


def _attention_test_rows():
    """tests/test_attention.py's gpu runs (its GPU_* lists; causal, window and scale are runtime
    arguments of the kernels, so each call below stands for its causal and non-causal runs)."""
    from test_attention import GPU_HALF, GPU_HALF_BIAS_DTYPES, GPU_MASKS, GPU_SHAPES
    kinds = {"none": None, "padding": "padding", "bool": "bool", "additive": "additive",
             "bias_grad": "bias"}
    for shape in GPU_SHAPES:                                              # shapes_with_padding
        _attention(shape, _F32, mask="padding", causal=True)
    for kind in GPU_MASKS:                                                # mask_kinds
        _attention((2, 4, 2, 33, 70, 64), _F32, mask=kinds[kind], causal=True,
                   bias_grad=kind == "bias_grad")
    for shape, dtype in GPU_HALF:                                         # half_precision
        _attention(shape, dtype, mask="padding", causal=True)
    for dtype in GPU_HALF_BIAS_DTYPES:                                    # half ... bias_grad
        _attention((1, 2, 2, 40, 40, 32), dtype, mask="bias", bias_grad=True)
    for option in [dict(window=9), dict(window=9, causal=True), dict(softcap=2.0),
                   dict(softcap=2.0, causal=True), {}]:                   # window_softcap_scale
        _attention((1, 4, 2, 37, 53, 64), _F32, mask="padding", **option)
    for causal in (False, True):                                          # dropout
        _attention((2, 2, 1, 29, 45, 32), _F32, mask="additive", causal=causal, dropout_p=0.25)
    for causal in (False, True):                                          # rows all finfo.min
        _attention((2, 2, 1, 9, 300, 32), _F32, mask="bias", causal=causal, bias_grad=True)


def _varlen_attention_test_rows():
    """tests/test_varlen_attention.py's gpu runs (its GPU_* lists)."""
    from test_varlen_attention import GPU_CASES, GPU_HALF_DTYPES
    for lengths_q, lengths_k, heads_q, heads_kv, d in GPU_CASES:         # mixed_lengths
        _varlen(lengths_q, lengths_k, heads_q, heads_kv, d, _F32, causal=True)
    for dtype in GPU_HALF_DTYPES:                                         # half_precision
        _varlen([1, 17, 129, 64], None, 4, 2, 64, dtype, causal=True)


def _attention_cuda_test_rows():
    """tests/test_attention_cuda.py: the cuda backend's forward is CUDA C++ (no Triton); its
    backward (none asked there) would be Triton's."""


def _bench_rows():
    """benchmarks/gpu_quick.py: the triton backend on its key shapes."""
    for causal in (False, True):
        _attention((4, 32, 32, 4096, 4096, 128), _BF16, causal=causal, backward=False)
    _attention((1, 32, 8, 1, 32768, 128), _BF16, causal=True, backward=False)
    _varlen([128 + 125 * i for i in range(32)], None, 16, 16, 128, _BF16, causal=True,
            backward=False)                                               # varlen, 32 sequences
    for rms in (False, True):
        _norm(4096, 4096, _BF16, rms=rms, backward=False)
    _bias_gelu(8192, 4096, _BF16, backward=False)
    _gated_mul(8192, 4096, _BF16, backward=False)
    _rotary(4, 32, 8, 2048, 128, _BF16, shared_cos=False, backward=False)
    _int8(4096, 4096, 4096, _BF16, "w8a8", bias=False)
    _int8(1, 4096, 4096, _BF16, "w8a16", bias=False)
    tint8.int8_matmul(cuda(4096, 4096, dtype=torch.int8), cuda(4096, 4096, dtype=torch.int8))


def _int8_tile_rows():
    """benchmarks/gpu_quick.py's int8 tile sweep: the w8a8 GEMM at 4096^3 with each of its
    INT8_TILES in place of INT8_CONFIGS' large-m row."""
    import math
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_quick import INT8_TILES
    default = tint8.INT8_CONFIGS
    try:
        for tiles in INT8_TILES:
            tint8.INT8_CONFIGS = default[:-1] + ((math.inf, *tiles),)
            _int8(4096, 4096, 4096, _BF16, "w8a8", bias=False)
    finally:
        tint8.INT8_CONFIGS = default


def _models_rows():
    """benchmarks/gpu_models.py's patched models, bf16, on the triton backend (gpu_model_profile.py
    runs them so; `auto` takes CUDA at these sizes), as far as their Triton launches can be told
    from the rules (the padded calls of a batch with no padding aside): MiniLM-shaped BERT on
    packed tokens, Qwen3-0.6B-shaped prefill (its decoding attention runs on CUDA C++)."""
    from transfuse.bench_sentences import TOKEN_COUNTS
    _varlen(list(TOKEN_COUNTS[:8]), None, 12, 12, 32, _BF16, backward=False)
    _norm(sum(TOKEN_COUNTS[:8]), 384, _BF16, rms=False, backward=False)
    _bias_gelu(sum(TOKEN_COUNTS[:8]), 1536, _BF16, backward=False)
    _attention((1, 16, 8, 16, 16, 128), _BF16, causal=True, backward=False)


# (group, name, row): add rows here (new launchers, new shapes)
ROWS = [
    ("gpu-tests", "norm", _norm_test_rows),
    ("gpu-tests", "activation", _activation_test_rows),
    ("gpu-tests", "rotary", _rotary_test_rows),
    ("gpu-tests", "int8", _int8_test_rows),
    ("gpu-tests", "attention", _attention_test_rows),
    ("gpu-tests", "varlen-attention", _varlen_attention_test_rows),
    ("gpu-tests", "attention-cuda", _attention_cuda_test_rows),
    ("bench", "gpu_quick", _bench_rows),
    ("bench", "gpu_models", _models_rows),
    ("bench", "int8-tiles", _int8_tile_rows),
]


def variants(groups=("gpu-tests", "bench"), rows=None):
    """{row name: [Variant]} for the rows of `groups` (and of the names `rows`, if given)."""
    return {name: record(row) for group, name, row in ROWS
            if group in groups and (rows is None or name in rows)}


def distinct(found):
    seen = {}
    for vs in found.values():
        for v in vs:
            seen.setdefault(v, v)
    return list(seen)


def representative(vs, per_kernel_only=False):
    """A subset in which every kernel, and every value of each constexpr flag, dtype and option
    of that kernel, occurs at least once (greedy, in order); per_kernel_only: one variant of
    each kernel."""
    chosen, covered = [], set()
    for v in vs:
        features = {(v.name,)}
        if not per_kernel_only:
            features |= {(v.name, "c", item) for item in v[1]}
            features |= {(v.name, "s", item) for item in v[2]} | {(v.name, "o", item) for item in v[3]}
        if not features <= covered:
            chosen.append(v)
            covered |= features
    return chosen


def compile_variant(v, cc, spills=False):
    """Compile v for CUDA compute capability cc; -> (seconds, "" or, with spills, ptxas's
    registers and spill bytes of the build) (raises on failure)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    constexprs = {k: val for k, val in v[1]}
    signature = dict(v[2])
    options = dict(v[3])
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(v.fn, signature, constexprs),
                            target=GPUTarget("cuda", cc, 32), options=options)
    seconds = time.perf_counter() - start
    return seconds, (_ptxas_usage(kernel.asm["ptx"], cc) if spills else "")


def _ptxas_usage(ptx, cc):
    """"regs R, spill S/L bytes" of ptxas -v on the PTX (the ptxas triton compiles with)."""
    import re
    import subprocess
    import tempfile
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = (get_ptxas(cc) if inspect.signature(get_ptxas).parameters else get_ptxas()).path
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        log = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(path), "-o",
                              str(path.with_suffix(".o"))], capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (f"regs {regs.group(1) if regs else '?'}, spill "
            f"{'/'.join(spill.groups()) if spill else '?'} bytes")


def _compile_job(args):
    index, cc, spills = args
    v = _JOBS[index]
    try:
        seconds, usage = compile_variant(v, cc, spills and cc == 90)
        return index, cc, seconds, usage, None
    except Exception as error:  # reported with the variant
        return index, cc, None, "", f"{type(error).__name__}: {str(error)[:2000]}"


_JOBS = []


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print every variant")
    parser.add_argument("--compile", action="store_true", help="compile for the targets")
    parser.add_argument("--all", action="store_true", help="compile every variant")
    parser.add_argument("--per-kernel", action="store_true",
                        help="compile one variant of each kernel (a quick check)")
    parser.add_argument("--targets", default=",".join(map(str, TARGETS)))
    parser.add_argument("--groups", default="gpu-tests,bench")
    parser.add_argument("--rows", default=None,
                        help="only these rows (comma-separated names, e.g. attention)")
    parser.add_argument("--spills", action="store_true",
                        help="print the registers and spill bytes of each sm_90 build (without "
                             "the JIT's alignment / divisibility-by-16 specializations, which "
                             "on a GPU vectorize the loads: an upper bound)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    assert isinstance(tnorm._norm_forward_fused_kernel, JITFunction), \
        "run without TRITON_INTERPRET: the kernels must be JITFunctions"
    found = variants(tuple(args.groups.split(",")), args.rows and args.rows.split(","))
    every = distinct(found)
    per_kernel = {}
    for v in every:
        per_kernel[v.name] = per_kernel.get(v.name, 0) + 1
    print(f"triton {triton.__version__}, torch {torch.__version__}")
    for name, vs in found.items():
        print(f"row {name}: {len(vs)} variants")
    print(f"distinct variants: {len(every)}  " + "  ".join(f"{k}={n}" for k, n in
                                                          sorted(per_kernel.items())))
    if args.list:
        for v in every:
            print("  " + v.describe())
    if not args.compile:
        return 0
    chosen = every if args.all else representative(every, args.per_kernel)
    targets = [int(t) for t in args.targets.split(",")]
    _JOBS[:] = chosen
    jobs = [(i, cc, args.spills) for i in range(len(chosen)) for cc in targets]
    print(f"compiling {len(chosen)} variants for sm_{', sm_'.join(map(str, targets))} "
          f"({'all' if args.all else 'one per kernel' if args.per_kernel else 'representative'}"
          f"), {args.jobs} processes",
          flush=True)
    start = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_compile_job, jobs, chunksize=1)
    else:
        results = [_compile_job(job) for job in jobs]
    failures = [(chosen[i], cc, err) for i, cc, _, _, err in results if err]
    times = [t for _, _, t, _, _ in results if t is not None]
    for i, cc, _, usage, _ in results:
        if usage:
            print(f"sm_{cc} {usage}: {chosen[i].describe()}")
    for v, cc, err in failures:
        print(f"FAILED sm_{cc}: {v.describe()}\n    {err}")
    if times:
        print(f"compiled {len(times)} in {time.perf_counter() - start:.1f} s wall; per variant "
              f"and target: median {sorted(times)[len(times) // 2]:.2f} s, max {max(times):.2f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
