"""Which implementation runs an op: the `backend=` argument, else TRANSFUSE_BACKEND, else auto.

Backends: cuda (hand-written CUDA in transfuse._C), triton (kernels/, on GPU; on CPU tensors only
under TRITON_INTERPRET=1), cpu (C++ in transfuse._C), reference (plain PyTorch, always there).
`auto` takes the first available backend of the op's preference order for the tensor's device
(the order comes from the recorded benchmarks) and warns once when it has to skip one.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
CHOICES = BACKENDS + ("auto",)
ENV_VAR = "TRANSFUSE_BACKEND"

# Every op call reads ENV_VAR. os.environ.get costs 0.7 us when it is unset (Mapping.get raises
# and catches a KeyError); os.environ's own dict (which setenv and monkeypatch update) 0.05 us.
try:
    _ENVIRON_DATA, _ENV_KEY = os.environ._data, os.environ.encodekey(ENV_VAR)
except AttributeError:  # not CPython's os._Environ
    _ENVIRON_DATA = None


def environment_backend():
    """The TRANSFUSE_BACKEND environment variable, or None where it is unset."""
    if _ENVIRON_DATA is None:
        return os.environ.get(ENV_VAR)
    value = _ENVIRON_DATA.get(_ENV_KEY)
    return None if value is None else os.environ.decodevalue(value)

# Preference of `auto` per (case, device type), fastest measured first: on CUDA from the H200's
# calls in benchmarks/results/gpu-NVIDIA-H200 (bf16). Other cases (norms, bias + GELU, SiLU/GELU *
# up, rotary, quantization, the small cases of `sized`) take CUDA first: its kernel faster, or at
# most 1.3x slower on the large shapes timed (GELU * up, 8192 x 4096), and 3-5x cheaper to launch
# (below).
CUDA_FIRST, TRITON_FIRST = ("cuda", "triton", "reference"), ("triton", "cuda", "reference")
AUTO_ORDER = {
    # prefill, B4 H32 S4096 D128: Triton 382, CUDA 210 TFLOP/s (and 299 against 191 varlen)
    ("attention", "cuda"): TRITON_FIRST,
    # decoding (one query row), 32 q / 8 kv heads, KV 32768: CUDA 1936, Triton 213 GB/s
    ("attention_decode", "cuda"): CUDA_FIRST,
    # w8a8 4096^3: Triton 980, CUDA 563 TOPS (third call; 780 and 557 in the second)
    ("int8", "cuda"): TRITON_FIRST,
    # w8a16 M=1, N=K=4096: CUDA 14.4, Triton 44-77 us
    ("int8_weight_only", "cuda"): CUDA_FIRST,
}
# A Triton launch costs the host more than a CUDA kernel's through its binding: on the H200
# machine an op call took 174 against 37 us (attention), 132 against 28 (add + LayerNorm), 149
# against 43 (quantize_per_token), and there a small model is host-bound (the MiniLM-shaped BERT's
# padded batch of 64: 0.44 ms of kernels, 5.8 ms of host; patched with `auto` taking Triton for
# every prefill attention, 0.65x eager). So Triton's faster attention and int8 GEMMs are taken
# only for calls of at least TRITON_MIN_FLOPS (the Triton attention's 180 us, the w8a8 GEMM's
# 70 us), whose kernels keep the GPU busy for longer than their launch holds the host.
TRITON_MIN_FLOPS = 2 ** 36


def sized(case: str, flops: int) -> str:
    """case for a call of at least TRITON_MIN_FLOPS, else case + "_small" (CUDA first)."""
    return case if flops >= TRITON_MIN_FLOPS else case + "_small"


DEFAULT_ORDER = {"cuda": CUDA_FIRST, "cpu": ("cpu", "reference")}


@functools.lru_cache(maxsize=None)
def extension():
    """(transfuse._C module or None, why it is missing)."""
    try:
        return importlib.import_module("transfuse._C"), ""
    except ImportError as error:
        reason = f"transfuse._C could not be imported ({error})"
        log = os.path.join(os.path.dirname(__file__), "_build_error.txt")
        if os.path.exists(log):
            with open(log) as f:
                reason += f"; the build failed: {f.read().strip()}"
        return None, reason


@functools.lru_cache(maxsize=None)
def _triton_import():
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not installed ({error})"
    return ""


def missing_reason(backend: str, device_type: str) -> str:
    """Empty string when `backend` can run on tensors of `device_type`, else why not."""
    if backend == "reference":
        return ""
    if backend == "triton":
        reason = _triton_import()
        if reason:
            return reason
        if device_type == "cuda":
            return "" if torch.cuda.is_available() else "CUDA is not available"
        if device_type == "cpu":
            if os.environ.get("TRITON_INTERPRET") == "1":
                return ""
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        return f"Triton does not run on {device_type} tensors"
    module, reason = extension()
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend takes CPU tensors, not {device_type} tensors"
        return reason
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend takes CUDA tensors, not {device_type} tensors"
        if module is None:
            return reason
        if not getattr(module, "with_cuda", False):
            return "transfuse._C was built without CUDA (no CUDA torch or no nvcc at build time)"
        return ""
    raise ValueError(f"backend must be one of {CHOICES}, got {backend!r}")


_warned: set = set()


def warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def requested(backend=None):
    """(the backend asked for, lowercased, and who asked: "backend" for the argument, else the
    TRANSFUSE_BACKEND environment variable), "auto" when neither names one."""
    if backend:
        return backend.lower(), "backend"
    from_env = environment_backend()
    if from_env:
        return from_env.lower(), ENV_VAR
    return "auto", "backend"


def _check_name(name, source):
    if name not in CHOICES:
        unset = " (or unset it)" if source == ENV_VAR else ""
        raise ValueError(f"{source} must be one of {CHOICES}{unset}, got {name!r}")


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _no_cuda_reason():
    why = "no GPU" if torch.version.cuda else f"torch {torch.__version__} has no CUDA"
    return f"CUDA is not available to torch ({why})"


def check_requested(backend=None) -> str:
    """The backend that `backend` (else TRANSFUSE_BACKEND, else auto) names, checked before any
    work (transfuse.patch calls it): ValueError naming the argument or the variable when the name
    is unknown, or when the backend can run on no device of this machine (and why)."""
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"backend must be None or one of {CHOICES}, got {backend!r}")
    name, source = requested(backend)
    _check_name(name, source)
    if name == "auto":
        return name
    reasons = [missing_reason(name, device) for device in _devices()]
    if all(reasons):
        if not torch.cuda.is_available() and name in ("cuda", "triton"):
            reasons.append(_no_cuda_reason())
        raise ValueError(f"{source}={name!r} cannot run on this machine: {'; '.join(reasons)}")
    return name


@functools.lru_cache(maxsize=None)
def _resolve(op: str, name: str, device: torch.device, source: str) -> str:
    # keyed by the device itself: device.type costs 0.4 us, a call's budget is a few us
    _check_name(name, source)
    device_type = device.type
    if name != "auto":
        reason = missing_reason(name, device_type)
        if reason:
            raise ValueError(f"{source}={name!r} cannot run this {op} op: {reason}")
        return name
    order = AUTO_ORDER.get((op, device_type), DEFAULT_ORDER.get(device_type, ("reference",)))
    skipped = []
    for backend in order:
        reason = missing_reason(backend, device_type)
        if not reason:
            if skipped:
                warn_once((op, device_type), f"transfuse: {op} on {device_type} uses the {backend} "
                           f"backend because {'; '.join(skipped)}")
            return backend
        skipped.append(f"{backend} is unavailable: {reason}")
    raise ValueError(f"no transfuse backend can run {op} on {device_type} tensors")


def resolve(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs `op` on tensors of `device`: the `backend` argument, else the
    TRANSFUSE_BACKEND environment variable, else auto; errors name the one that asked.
    (requested() inlined: this runs on every op call.)"""
    if backend:
        return _resolve(op, backend.lower(), device, "backend")
    from_env = environment_backend()
    if from_env:
        return _resolve(op, from_env.lower(), device, ENV_VAR)
    return _resolve(op, "auto", device, "backend")


def available() -> dict:
    """For each backend and device type: True or the reason it is missing."""
    devices = _devices()
    table = {}
    for backend in BACKENDS:
        table[backend] = {d: (missing_reason(backend, d) or True) for d in devices}
    if "cuda" not in devices:
        table["cuda"]["cuda"] = _no_cuda_reason()
    return table
