"""MPNet's rules (all-mpnet-base-v2).

MPNet's encoder adds a relative position bias (per head, by the bucket of j - i) to every layer's
attention scores: it computes a [B, heads, S, S] tensor once per call, and its self-attention
computes softmax(q k^T / sqrt(d) + bias + mask) v in eager torch, outside transformers' attention
interface, under containers that pass no kwargs down. The rules (relative_bias_attention,
_container, _layer, _stack): its self-attention through transfuse.ops.attention (mask: the bias
plus the padding mask; packed tokens: varlen_attention), its container with the residual add
inside the fused norm, its layer as encoder_layer's (one call, given the bias), its stack
computing the bias once for one row of the longest sequence ([1, heads, L, L]; packed sequences
read it at their own positions, the bias being the same for every start) and running the layers
fused where they all fit. Padding removal (hf/unpad.py) packs its padded batches while every
layer carries these rules (PACKED_STACK_ATTR). Recorded outputs (attention weights, hidden
states) run the classes' forwards.
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ... import backends, ops
from ...nn import FusedLayerNorm
from ..attention import _combined_mask
from ..unpad import PACKED_STACK_ATTR
from .common import (BACKEND_ATTR, FACTS_ATTR, FORWARD_ATTR, _global_hooks, _install, _own_hooks,
                     _rule_forward)
from .encoder_layer import OTHER_FUSED_LAYERS, _fused_call, _layer_call_arguments, _layers_fused
from .linear import _linear_forward
from .sources import _forward_reads_as
from .table import BLOCK_RULES


def _relative_bias_attention_forward(self, hidden_states, attention_mask=None, position_bias=None,
                                     output_attentions=False, **kwargs):
    """transfuse.ops.attention with mask = position_bias + attention_mask (packed tokens, with
    padding removal's kwargs: varlen_attention, the bias read at each sequence's positions); the
    class's forward where the attention weights are asked for."""
    packed = kwargs.get("cu_seq_lens_q")
    if output_attentions:
        if packed is not None:
            raise ValueError("output_attentions=True cannot return the weights of packed tokens")
        return type(self).forward(self, hidden_states, attention_mask, position_bias, True)
    shape = hidden_states.shape[:-1]
    q, k, v = (self._modules[name](hidden_states).view(*shape, -1, self.attention_head_size)
               for name in ("q", "k", "v"))
    scale, backend = 1 / math.sqrt(self.attention_head_size), self.__dict__.get(BACKEND_ATTR)
    dropout = self.dropout.p if self.training else 0.0
    if packed is not None:
        attended = ops.varlen_attention(
            q[0], k[0], v[0], packed, kwargs["cu_seq_lens_k"], kwargs["max_length_q"],
            kwargs["max_length_k"], mask=position_bias, scale=scale, dropout_p=dropout,
            backend=backend, check_offsets=False)
    else:
        attended = ops.attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            mask=_combined_mask(attention_mask, position_bias), scale=scale, dropout_p=dropout,
            backend=backend).transpose(1, 2)
    return (self._modules["o"](attended.reshape(*shape, -1)),)


def _relative_bias_container_forward(self, hidden_states, attention_mask=None,
                                     position_bias=None, output_attentions=False, **kwargs):
    """The class's computation, kwargs passed to the self-attention, the residual add inside a
    fused norm's pass."""
    outputs = self.attn(hidden_states, attention_mask, position_bias,
                        output_attentions=output_attentions, **kwargs)
    attended, norm = self.dropout(outputs[0]), self.LayerNorm
    if isinstance(norm, FusedLayerNorm) and attended.dtype == hidden_states.dtype:
        return (norm(attended, residual=hidden_states)[0],) + outputs[1:]
    return (norm(attended + hidden_states),) + outputs[1:]


def _relative_bias_layer_forward(self, hidden_states, attention_mask=None, position_bias=None,
                                 output_attentions=False, **kwargs):
    """One transfuse._C.encoder_layer call where it fits (_fused_call, a bias of one row,
    _relative_bias_layer_arguments); else the class's computation, kwargs passed down."""
    if not (output_attentions or position_bias is None or position_bias.shape[0] != 1
            or _global_hooks() or torch._C._get_tracing_state()):
        call = _fused_call(hidden_states, attention_mask, kwargs)
        module = None if call is None else backends.extension()[0]
        arguments = None if module is None else _relative_bias_layer_arguments(self, hidden_states)
        out = None if arguments is None else module.encoder_layer(hidden_states, *call,
                                                                  *arguments, position_bias)
        if out is not None:  # (None: a kernel declined the call)
            return (out,)
    outputs = self.attention(hidden_states, attention_mask, position_bias=position_bias,
                             output_attentions=output_attentions, **kwargs)
    attention_output = outputs[0]
    return (self.output(self.intermediate(attention_output), attention_output),) + outputs[1:]


def _relative_bias_layer_arguments(layer, x):
    """As _fused_layer_arguments, for an MPNet layer whose attention containers run their rules
    (the classes it was patched with, no hooks)."""
    attention_class, inner_class = layer.__dict__[FACTS_ATTR]
    children = layer._modules
    attention = children.get("attention")
    inner = attention._modules.get("attn") if type(attention) is attention_class else None
    if (type(inner) is not inner_class or _own_hooks(attention) or _own_hooks(inner)
            or _rule_forward(attention) is not _relative_bias_container_forward
            or _rule_forward(inner) is not _relative_bias_attention_forward):
        return None
    rules = (children.get("intermediate"), children.get("output"))
    for m in rules:
        if m is None or not m.__dict__.get(FORWARD_ATTR) or _own_hooks(m):
            return None
    linears = [inner._modules.get(name) for name in ("q", "k", "v", "o")]
    linears += [m._modules.get("dense") for m in rules]
    return _layer_call_arguments(
        inner, inner.num_attention_heads, 1 / math.sqrt(inner.attention_head_size), x, linears,
        (attention._modules.get("LayerNorm"), rules[1]._modules.get("LayerNorm")),
        (attention._modules.get("dropout"), rules[1]._modules.get("dropout")),
        rules[0]._modules.get("intermediate_act_fn"), (attention, *rules),
        ((_linear_forward,),) * 4 + ((None, _linear_forward),) * 2)


def _relative_bias_stack_forward(self, hidden_states, attention_mask=None, output_attentions=False,
                                 output_hidden_states=False, return_dict=False, **kwargs):
    """The bias for one row of the longest sequence, then the layers (all fused where they fit,
    _layers_fused); the class's forward where outputs are recorded or the batch is empty."""
    packed = kwargs.get("cu_seq_lens_q") is not None
    if output_attentions or output_hidden_states or not hidden_states.shape[0]:
        if packed:
            raise ValueError("per-layer outputs of packed tokens cannot be returned")
        return type(self).forward(self, hidden_states, attention_mask, output_attentions,
                                  output_hidden_states, return_dict, **kwargs)
    longest = kwargs["max_length_q"] if packed else hidden_states.shape[1]
    position_bias = self.compute_position_bias(hidden_states[:1, :longest])
    out = _layers_fused(self._modules.get("layer"), hidden_states, attention_mask, kwargs,
                        position_bias)
    if out is None:
        out = hidden_states
        for layer in self.layer:
            out = layer(out, attention_mask, position_bias, output_attentions=False, **kwargs)[0]
    if not (return_dict or packed):  # (padding removal reads a model output)
        return (out,)
    return self.__dict__[FACTS_ATTR](last_hidden_state=out)


def _relative_bias_takes_packed(stack):
    """Whether padding removal may hand the MPNet stack packed tokens: its rule, and each layer's
    rules at every level, pass the kwargs down to the transfuse attention."""
    layers = stack._modules.get("layer")
    if (stack.__dict__.get(FORWARD_ATTR) != "relative_bias_stack"
            or type(layers) is not nn.ModuleList):
        return False
    for layer in layers._modules.values():
        attention = layer._modules.get("attention")
        inner = None if attention is None else attention._modules.get("attn")
        if (_rule_forward(layer) is not _relative_bias_layer_forward
                or _rule_forward(attention) is not _relative_bias_container_forward
                or _rule_forward(inner) is not _relative_bias_attention_forward):
            return False
    return True


def _patch_relative_bias(module, names):
    """The self-attention and its container as they are; the layer where its containers have the
    classes the rule reads; the stack where its family names the output class."""
    kind = BLOCK_RULES[type(module).__name__][0]
    if not all(isinstance(getattr(module, name, None), nn.Module) for name in names):
        return False
    if kind == "relative_bias_layer":
        container = module.attention
        inner = getattr(container, "attn", None)
        if not (isinstance(inner, nn.Module)
                and _forward_reads_as(type(container), "relative_bias_container", ())
                and _forward_reads_as(type(inner), "relative_bias_attention", ())):
            return False
        module.__dict__[FACTS_ATTR] = (type(container), type(inner))
    elif kind == "relative_bias_stack":
        output_class = getattr(sys.modules[type(module).__module__], "BaseModelOutput", None)
        if output_class is None or not isinstance(module.layer, nn.ModuleList):
            return False
        module.__dict__[FACTS_ATTR] = output_class
        module.__dict__[PACKED_STACK_ATTR] = _relative_bias_takes_packed
    forward = {"relative_bias_attention": _relative_bias_attention_forward,
               "relative_bias_container": _relative_bias_container_forward,
               "relative_bias_layer": _relative_bias_layer_forward,
               "relative_bias_stack": _relative_bias_stack_forward}[kind]
    return _install(module, forward)


OTHER_FUSED_LAYERS[_relative_bias_layer_forward] = _relative_bias_layer_arguments
