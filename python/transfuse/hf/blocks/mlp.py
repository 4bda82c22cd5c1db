"""Rules of feed-forward blocks: gated MLPs and BERT's dense + GELU.

  gated_mlp    act_fn(gate_proj(x)) * up_proj(x) with act_fn SiLU (Llama, Mistral, Qwen2, Qwen3,
               SmolLM3, Granite) or GELU (Gemma 1-3's tanh form): gate and up as projections, their
               product through transfuse.ops.silu_mul / gelu_mul (one pass instead of two; on CUDA
               it reads the two halves of the joint GEMM's output in place). Another act_fn: the
               projections alone.
  joint_gated_mlp  ModernBERT's MLP, act(input) * gate over the two halves of one Wi GEMM's
               output: the product through one transfuse.ops.gelu_mul (silu_mul), reading the
               halves in place; Wi, its dropout and Wo as the class's forward calls them.
  bias_gelu    gelu(dense(h)) (BERT-style Intermediate, exact or tanh GELU): on CPU tensors with
               a float dense layer, one transfuse.ops.linear with the bias and GELU in its
               GEMM's epilogue; else the GEMM (float or transfuse int8) without its bias (no
               copy of the bias into the output first), then one pass of
               transfuse.ops.bias_gelu.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...nn import Int8Linear
from ...ops.activation import KERNEL_DTYPES as ACTIVATION_DTYPES, gated_mul
from .common import BACKEND_ATTR, _install
from .linear import _linear, _own_forward, _patch_projections, _plain_linear
from .sources import _reads_as

SILU_CLASSES = {nn.SiLU}
GELU_ACTIVATIONS = {"none": "gelu", "tanh": "gelu_tanh"}  # F.gelu's approximate -> gated_mul's


def _silu_class(cls):
    """torch's SiLU or transformers' SiLUActivation (F.silu); those found are kept in
    SILU_CLASSES, which the rule's forward reads."""
    if cls not in SILU_CLASSES and cls.__name__ == "SiLUActivation" and _reads_as(
            cls.forward, ("return nn.functional.silu(input)",)):
        SILU_CLASSES.add(cls)
    return cls in SILU_CLASSES


def _is_silu(act):
    """A SiLU module (SILU_CLASSES), unhooked, running its class's forward."""
    if act is None or act._forward_hooks or act._forward_pre_hooks or "forward" in act.__dict__:
        return False
    return type(act) in SILU_CLASSES


def _gated_activation(act):
    """The name transfuse.ops.activation.gated_mul takes for act ("silu", "gelu", "gelu_tanh"):
    a SiLU or transformers GELU module, unhooked, running its class's forward; else None."""
    if _is_silu(act):
        return "silu"
    approximate = _gelu_approximation(act)
    return None if approximate is None else GELU_ACTIVATIONS[approximate]


def _known_activation(act):
    """Whether the gated rules take act (_gated_activation), once transformers' SiLU class is
    known (_silu_class)."""
    if isinstance(act, nn.Module):
        _silu_class(type(act))
    return _gated_activation(act) is not None


def _gated_mlp_forward(self, x):
    activation = _gated_activation(self.act_fn)
    if activation is None:  # swapped since
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.dtype not in ACTIVATION_DTYPES or up.dtype != gate.dtype:
        return self.down_proj(self.act_fn(gate) * up)
    return self.down_proj(gated_mul(gate, up, activation,
                                    backend=self.__dict__.get(BACKEND_ATTR)))


def _patch_gated_mlp(module, names):
    """The projections of gate and up where they fit; the forward where act_fn is SiLU or GELU."""
    joined = _patch_projections(module, names)
    if _known_activation(getattr(module, "act_fn", None)) and isinstance(
            getattr(module, "down_proj", None), nn.Module):
        return _install(module, _gated_mlp_forward) and "gated_mlp"
    return joined and "projections"


def _joint_gated_mlp_forward(self, hidden_states):
    activation = _gated_activation(self.act)
    if activation is None:  # swapped since
        return type(self).forward(self, hidden_states)
    input, gate = self.Wi(hidden_states).chunk(2, dim=-1)
    if input.dtype not in ACTIVATION_DTYPES:
        return self.Wo(self.drop(self.act(input) * gate))
    return self.Wo(self.drop(gated_mul(input, gate, activation,
                                       backend=self.__dict__.get(BACKEND_ATTR))))


def _patch_joint_gated_mlp(module, names):
    return _known_activation(getattr(module, "act", None)) and _install(
        module, _joint_gated_mlp_forward)


def _gelu_approximation(act):
    """"none" / "tanh" for transformers' GELU modules that compute F.gelu, else None."""
    if act is None or act._forward_hooks or act._forward_pre_hooks or "forward" in act.__dict__:
        return None
    fn = getattr(act, "act", None)
    if type(act).__name__ == "GELUActivation" and fn is F.gelu:
        return "none"
    if (type(act).__name__ == "GELUTanh" and isinstance(fn, functools.partial)
            and fn.func is F.gelu and not fn.args and fn.keywords == {"approximate": "tanh"}):
        return "tanh"
    return None


def _product_without_bias(dense, x, backend):
    """dense(x) without its bias, for an nn.Linear or a transfuse Int8Linear left as built; None
    for anything else."""
    if _plain_linear(dense):
        return _linear(x, dense.weight, None, backend)
    if type(dense) is Int8Linear and not (dense._forward_hooks or dense._forward_pre_hooks):
        return ops.int8_linear(x, dense.weight, dense.weight_scale, None, dense.mode,
                               backend=dense.backend)
    return None


def _bias_gelu_forward(self, hidden_states):
    fused = _cpu_linear_gelu(self, hidden_states)
    if fused is not None:
        return fused
    dense = self.dense
    approximate = _gelu_approximation(self.intermediate_act_fn)
    product = None
    if not (approximate is None or getattr(dense, "bias", None) is None
            or _own_forward(dense) or torch.is_autocast_enabled(hidden_states.device.type)
            or dense.bias.dtype != hidden_states.dtype):
        product = _product_without_bias(dense, hidden_states, self.__dict__.get(BACKEND_ATTR))
    if product is None:
        return type(self).forward(self, hidden_states)
    return ops.bias_gelu(product, dense.bias, approximate, backend=self.__dict__.get(BACKEND_ATTR))


def _cpu_linear_gelu(self, hidden_states):
    """The GEMM with bias and GELU in its epilogue (transfuse.ops.linear) for a plain nn.Linear on
    CPU tensors, where the rule applies; else None."""
    dense = self.dense
    approximate = _gelu_approximation(self.intermediate_act_fn)
    if (hidden_states.device.type != "cpu" or approximate is None or not _plain_linear(dense)
            or torch.is_autocast_enabled("cpu")
            or dense.weight.dtype != hidden_states.dtype
            or (dense.bias is not None and dense.bias.dtype != hidden_states.dtype)):
        return None
    return ops.linear(hidden_states, dense.weight, dense.bias,
                      activation="gelu" if approximate == "none" else "gelu_tanh",
                      backend=self.__dict__.get(BACKEND_ATTR))


def _patch_bias_gelu(module, names):
    return _gelu_approximation(getattr(module, "intermediate_act_fn", None)) is not None and (
        _install(module, _bias_gelu_forward))
