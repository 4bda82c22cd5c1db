"""Modules backed by the fused ops: norms state-dict compatible with the modules they replace,
and the int8 linear layer."""
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


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-channel fp32 scales (symmetric), whose
    forward runs transfuse.ops.int8_linear in `mode` ("w8a8": activations quantized per token on
    the fly; "w8a16": weight-only).

    State dict: `weight` int8 [out_features, in_features], `weight_scale` float32 [out_features]
    (buffers: frozen) and `bias` (a Parameter, trainable) when there is one. The input keeps its
    dtype; the output has the input's dtype. Casting the module (`.half()`, `.to(torch.bfloat16)`)
    casts the bias only: `weight` stays int8 and `weight_scale` float32 (see `_apply`).
    """

    def __init__(self, in_features, out_features, bias=True, mode="w8a8", device=None,
                 dtype=None, backend=None):
        super().__init__()
        if mode not in ops.int8.MODES:
            raise ValueError(f"mode must be one of {ops.int8.MODES}, got {mode!r}")
        self.in_features, self.out_features, self.mode, self.backend = (
            in_features, out_features, mode, backend)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32,
                                                        device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias \
            else None

    @classmethod
    def from_float(cls, module: nn.Module, mode="w8a8", backend=None) -> "Int8Linear":
        """Quantize an nn.Linear (or transformers' Conv1D, whose weight is [in, out]) per output
        channel; the bias Parameter is shared with `module`."""
        weight = float_weight(module)
        if weight is None:
            raise TypeError(f"module must be an nn.Linear or transformers Conv1D, got "
                            f"{type(module).__name__}")
        out_features, in_features = weight.shape
        new = cls(in_features, out_features, bias=False, mode=mode, device=weight.device,
                  backend=backend)
        new.set_float_weight(weight)
        new.bias = module.bias
        new.train(module.training)
        return new

    def _apply(self, fn, recurse=True):
        """nn.Module's conversion hook (.to, .half, .cuda, .type, ...): device moves reach every
        tensor; a dtype change of `weight` or `weight_scale` is undone from the tensor as it was
        before (never cast back), so their values stay exact."""
        before = {name: self._buffers[name] for name in ("weight", "weight_scale")}
        super()._apply(fn, recurse)
        for name, tensor in before.items():
            after = self._buffers[name]
            if after is not None and tensor is not None and after.dtype != tensor.dtype:
                self._buffers[name] = tensor.to(after.device)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """weight * weight_scale as fp32 [out_features, in_features]."""
        return self.weight.float() * self.weight_scale[:, None]

    def set_float_weight(self, weight: torch.Tensor) -> None:
        """Quantize the float `weight` [out_features, in_features] per output channel (scale =
        row absmax / 127) into `weight` and `weight_scale`, in place: the inverse of
        dequantized_weight() up to rounding (|error| <= weight_scale / 2 per row)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(weight.shape)}")
        with torch.no_grad():
            q, scale = ops.quantize_per_token(weight.detach().float(), backend="reference")
            self.weight.copy_(q)
            self.weight_scale.copy_(scale)

    def forward(self, x):
        # (the registry dicts read directly: nn.Module.__getattr__ costs 0.5 us an attribute, a
        # tenth of a decoding step's call; bias is None when unregistered)
        buffers = self._buffers
        return ops.int8_linear(x, buffers["weight"], buffers["weight_scale"],
                               self._parameters.get("bias"), self.mode, backend=self.backend)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, mode={self.mode!r}")


def tied_parameter_ids(model: nn.Module) -> set:
    """ids of the parameters more than one module of `model` holds (a head tied to an embedding)."""
    owners = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), set()).add(id(module))
    return {key for key, modules in owners.items() if len(modules) > 1}


def float_weight(module: nn.Module):
    """The [out_features, in_features] weight of an nn.Linear or a transformers Conv1D (a view),
    or None for any other module."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
            and module.weight.dim() == 2:
        return module.weight.T
    return None
