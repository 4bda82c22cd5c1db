"""Modules backed by the fused norm ops; state-dict compatible with the modules they replace."""
from __future__ import annotations

import torch
from torch import nn

from . import ops


class FusedLayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose forward runs transfuse.ops.layer_norm (same parameters, same state dict).

    forward(x, residual=None) returns y, or (y, x + residual) when a residual is given.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None, backend=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"normalized_shape must be one dimension, got {self.normalized_shape}")
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.LayerNorm, backend=None) -> "FusedLayerNorm":
        """A FusedLayerNorm sharing `module`'s parameters (training one trains the other)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.normalized_shape = tuple(module.normalized_shape)
        fused.eps = module.eps
        fused.elementwise_affine = module.elementwise_affine
        fused.weight = module.weight
        fused.bias = module.bias
        fused.backend = backend
        fused.train(module.training)
        return fused

    def forward(self, x, residual=None):
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual, backend=self.backend)


class FusedRMSNorm(nn.Module):
    """RMSNorm y = x_hat * (offset + weight), with the casts of an HF family (`casting_mode`).

    The parameter is `weight`, as in LlamaRMSNorm, GemmaRMSNorm and T5LayerNorm.
    forward(x, residual=None) returns y, or (y, x + residual) when a residual is given.
    """

    def __init__(self, hidden_size, eps=1e-6, offset=0.0, casting_mode="llama", device=None,
                 dtype=None, backend=None):
        super().__init__()
        init = torch.zeros if offset == 1.0 else torch.ones
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        self.eps = eps
        self.offset = offset
        self.casting_mode = casting_mode
        self.backend = backend

    @classmethod
    def from_module(cls, module: nn.Module, eps, offset=0.0, casting_mode="llama",
                    backend=None) -> "FusedRMSNorm":
        """A FusedRMSNorm sharing `module.weight` (training one trains the other)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.weight = module.weight
        fused.eps, fused.offset, fused.casting_mode = eps, offset, casting_mode
        fused.backend = backend
        fused.train(module.training)
        return fused

    def forward(self, x, residual=None):
        return ops.rms_norm(x, self.weight, self.eps, residual, self.offset,
                            casting_mode=self.casting_mode, backend=self.backend)

    def extra_repr(self):
        return (f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}, "
                f"casting_mode={self.casting_mode!r}")
