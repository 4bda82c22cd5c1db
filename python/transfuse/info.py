"""transfuse.info(): what this installation can run, and why a missing backend is missing."""
from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from . import backends


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "cuda": torch.version.cuda}
    for package in ("transfuse", "triton", "transformers"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def requested_backend():
    """TRANSFUSE_BACKEND as set here (None when unset), with why it cannot be used if it cannot."""
    value = os.environ.get(backends.ENV_VAR)
    if not value:
        return None
    try:
        backends.check_requested()
    except ValueError as error:
        return f"{value} (unusable: {error})"
    return value


def info() -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module, reason = backends.extension()
    if module is None:
        extension = f"missing: {reason}"
    else:
        extension = "built with CUDA" if module.with_cuda else "built (CPU only)"
    report = {"device": device_name(device), "backends": backends.available(),
              "extension": extension, "TRANSFUSE_BACKEND": requested_backend(),
              "versions": versions()}
    if module is not None:
        # without an int8 dot product w8a8 runs no faster than fp32, except where transfuse's
        # AVX2 int8 GEMM (vpmaddubsw) runs: AVX2 CPUs without AVX-512
        report["cpu_int8_dot"] = bool(module.cpu_int8_dot)
        report["cpu_int8_avx2"] = bool(module.cpu_int8_avx2)
        # transfuse's own GEMMs (ops.linear) run: fp32 (AVX-512, or AVX2 with FMA: any number of
        # rows), bf16 (AVX512_BF16); with AMX, ops.linear leaves float GEMMs to torch and w8a8
        # runs on the tiles
        report["cpu_gemm"] = bool(module.cpu_gemm)
        report["cpu_gemm_max_rows"] = "any" if module.cpu_gemm_max_rows else 0
        report["cpu_gemv"] = bool(module.cpu_gemv)
        report["cpu_gemm_bf16"] = bool(module.cpu_gemm_bf16)
        report["cpu_amx"] = bool(module.cpu_amx)
    return report
