"""The transfuse ops: thin wrappers that validate, pick a backend and call a custom op."""
from .activation import bias_gelu, gelu_mul, silu_mul
from .attention import attention, varlen_attention
from .int8 import int8_linear, int8_matmul, quantize_per_token
from .linear import linear
from .norm import layer_norm, rms_norm
from .rotary import rotary

__all__ = ["attention", "bias_gelu", "gelu_mul", "int8_linear", "int8_matmul", "layer_norm",
           "linear", "quantize_per_token", "rms_norm", "rotary", "silu_mul", "varlen_attention"]
