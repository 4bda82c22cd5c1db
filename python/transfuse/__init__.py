"""transfuse: fused kernels (CUDA, Triton, C++) for PyTorch, patched into transformers models."""
from . import backends, nn, ops, reference
from .info import info
from .patch import patch, patched_modules, unpatch

__version__ = "0.1.0"
__all__ = ["backends", "info", "nn", "ops", "patch", "patched_modules", "reference", "unpatch"]
