"""The transfuse ops: thin wrappers that validate, pick a backend and call a custom op."""
from .attention import attention
from .norm import layer_norm, rms_norm

__all__ = ["attention", "layer_norm", "rms_norm"]
