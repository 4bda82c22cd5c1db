"""transfuse.info(): what this installation can run, and why a missing backend is missing."""
from __future__ import annotations

import platform

import torch

from . import backends


def _version(module_name):
    try:
        module = __import__(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", "unknown")


def info() -> dict:
    from . import __version__
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    module, reason = backends.extension()
    return {
        "transfuse": __version__,
        "device": device,
        "backends": backends.available(),
        "extension": "built" + (" with CUDA" if getattr(module, "with_cuda", 0) else " (CPU only)")
                     if module is not None else f"missing: {reason}",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "triton": _version("triton"),
                     "transformers": _version("transformers")},
    }
