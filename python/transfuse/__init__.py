"""transfuse: fused kernels (CUDA, Triton, C++) for PyTorch, patched into transformers models."""
from . import backends, nn, ops, reference
from .hf.attention import register as _register_attention
from .hf.quantizer import Int8Config, register as _register_quantizer
from .info import info
from .patch import patch, patched_modules, unpatch
from .quantize import quantize

__version__ = "0.1.0"
_register_attention()
_register_quantizer()
__all__ = ["Int8Config", "backends", "info", "nn", "ops", "patch", "patched_modules", "quantize",
           "reference", "unpatch"]
