"""The transfuse ops: thin wrappers that validate, pick a backend and call a custom op."""
from .norm import layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm"]
