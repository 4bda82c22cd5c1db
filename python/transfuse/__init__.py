"""transfuse: fused kernels (CUDA, Triton, C++) for PyTorch, patched into transformers models."""
from . import backends, nn, ops, reference
from .hf.attention import register as _register_attention
from .info import info
from .patch import patch, patched_modules, unpatch

__version__ = "0.1.0"
_register_attention()
__all__ = ["backends", "info", "nn", "ops", "patch", "patched_modules", "reference", "unpatch"]
