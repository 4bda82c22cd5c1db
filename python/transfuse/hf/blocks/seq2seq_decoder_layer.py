"""The rule of a BART-like decoder layer.

  seq2seq_decoder_layer  a BART-like decoder layer, post-norm (BART, Marian, PLBart,
               Blenderbot-small) or pre-norm (mBART, M2M100 / NLLB, Pegasus, Blenderbot,
               Whisper): at each
               decoding step whose cross-attention reads the encoder's keys and values from an
               EncoderDecoderCache (every step after the first), on CPU tensors in inference, the
               whole layer in two transfuse._C calls around the self-attention cache's own update
               (csrc/bindings/decoder_layer.cpp): the kernels its modules' rules run, bit for bit,
               without their some twenty Python calls. Any other call: the class's forward.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from ... import backends
from ...nn import FusedLayerNorm
from ...ops.attention import _broadcast_mask
from ..attention import NAME as ATTENTION_NAME, _causal, _weights_requested, reads_no_mask
from .common import BACKEND_ATTR, FACTS_ATTR, _global_hooks, _install, _own_hooks
from .decoder_layer import DECODER_IDLE_KWARGS
from .linear import _linear_call_arguments
from .mlp import _gated_activation
from .sources import (SCALED_QUERY_ATTENTION_SOURCE, SEQ2SEQ_ATTENTION_SOURCE,
                      SEQ2SEQ_PRE_NORM_SOURCE, _reads_as)
from .table import SEQ2SEQ_NORMS


def _seq2seq_decoder_layer_forward(self, hidden_states, *args, **kwargs):
    fused = _seq2seq_decoder_layer_fused(self, hidden_states, args, kwargs)
    return type(self).forward(self, hidden_states, *args, **kwargs) if fused is None else fused


def _seq2seq_decoder_layer_fused(layer, x, args, kwargs):
    """The layer's output from transfuse._C.seq2seq_decoder_layer_qkv, the self-attention cache's
    update and seq2seq_decoder_layer_out, for a step whose cross-attention reads the encoder's keys
    and values from the cache (every decoding step after the first), on CPU tensors in inference
    where its modules compute just that (_seq2seq_layer_arguments); else None (nothing done)."""
    if (len(args) > 2 or type(x) is not torch.Tensor or x.device.type != "cpu" or x.dim() != 3
            or not x.numel() or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu") or torch._C._get_tracing_state()
            or _global_hooks()):
        return None
    (cache_class, cache_name, update_takes_kwargs, pre_norm, attention_class,
     query_scaled) = layer.__dict__[FACTS_ATTR]
    rest = dict(kwargs)
    named = ("attention_mask", "encoder_hidden_states")
    if any(name in rest for name in named[:len(args)]):
        return None  # (given twice: the class's forward says so)
    mask, encoder_states = (*args, *(rest.pop(name, None) for name in named[len(args):]))
    cross_mask, cache = rest.pop("encoder_attention_mask", None), rest.pop(cache_name, None)
    attention = layer._modules.get("self_attn")
    index = getattr(attention, "layer_idx", None)
    if (encoder_states is None or not isinstance(cache, cache_class)
            or not cache.is_updated.get(index) or not rest.keys() <= DECODER_IDLE_KWARGS
            or _weights_requested(rest) or reads_no_mask(attention.config) == "packed"):
        return None
    cross_layers = cache.cross_attention_cache.layers
    if not 0 <= index < len(cross_layers):
        return None
    cross_k, cross_v = cross_layers[index].keys, cross_layers[index].values
    if not (type(cross_k) is torch.Tensor and type(cross_v) is torch.Tensor
            and cross_k.dtype == x.dtype and cross_k.dim() == 4
            and cross_k.shape[0] == x.shape[0]):
        return None
    arguments = _seq2seq_layer_arguments(layer, attention, attention_class, x, pre_norm)
    if arguments is None:
        return None
    qkv_arguments, out_arguments = arguments
    # (Whisper's query times the scale, then an attention scaling by 1)
    scale, query_scale = (1.0, attention.scaling) if query_scaled else (attention.scaling, None)
    module = backends.extension()[0]
    q, k, v = module.seq2seq_decoder_layer_qkv(x, *qkv_arguments, query_scale)
    k, v = cache.self_attention_cache.update(
        k, v, index, **({"kwargs": rest} if update_takes_kwargs else {}))
    # as the transfuse attention function (hf/attention.py) takes the two calls
    causal = _causal(attention, q, mask, None)
    if causal and k.shape[2] > q.shape[2]:
        k, v = k[:, :, :q.shape[2]], v[:, :, :q.shape[2]]
    return module.seq2seq_decoder_layer_out(
        x, q, k, v, _broadcast_mask(mask, q, k, None), causal, scale, cross_k, cross_v,
        _broadcast_mask(cross_mask, q, cross_k, None), *out_arguments, query_scale)


def _plain_activation(act):
    """The name seq2seq_decoder_layer_out takes for act ("silu", "gelu", "gelu_tanh", "relu"): a
    SiLU, transformers GELU or ReLU module, unhooked, running its class's forward; else None."""
    if type(act) is nn.ReLU:
        return None if _own_hooks(act) or "forward" in act.__dict__ else "relu"
    return _gated_activation(act)


def _seq2seq_layer_arguments(layer, attention, attention_class, x, pre_norm):
    """(seq2seq_decoder_layer_qkv's arguments after x, seq2seq_decoder_layer_out's after
    cross_mask) for the BART-like `layer` (attention: its self-attention) on x where its modules
    run what the calls run: attention_class (the one the rule read) for both attentions, the
    transfuse attention, three FusedLayerNorm of x's dtype, the linear layers of one kind
    (_linear_call_arguments), a plain activation, no dropout, the cpu backend for each op; else
    None."""
    children = layer._modules
    cross = children.get("encoder_attn")
    activation = _plain_activation(children.get("activation_fn"))
    if (activation is None or layer.training or type(attention) is not attention_class
            or type(cross) is not attention_class or attention.training or cross.training
            or getattr(cross, "is_causal", False)  # (not these families': the call's is not)
            or _own_hooks(layer) or _own_hooks(attention) or _own_hooks(cross)
            or "forward" in attention.__dict__ or "forward" in cross.__dict__
            or attention.head_dim != cross.head_dim or attention.scaling != cross.scaling
            or attention.config._attn_implementation != ATTENTION_NAME
            or cross.config._attn_implementation != ATTENTION_NAME):
        return None
    dtype = x.dtype
    norms = [children.get(name) for name in SEQ2SEQ_NORMS]
    chosen = {attention.__dict__.get(BACKEND_ATTR), layer.__dict__.get(BACKEND_ATTR)}
    for n in norms:
        if (type(n) is not FusedLayerNorm or _own_hooks(n) or "forward" in n.__dict__
                or n._parameters["weight"] is None or n._parameters["bias"] is None
                or n._parameters["weight"].dtype != dtype or n._parameters["bias"].dtype != dtype):
            return None
        chosen.add(n.backend)
    linears = [attention._modules.get(name) for name in ("q_proj", "k_proj", "v_proj", "out_proj")]
    linears += [cross._modules.get(name) for name in ("q_proj", "out_proj")]
    linears += [children.get("fc1"), children.get("fc2")]
    layers = _linear_call_arguments(linears, x, chosen)
    if layers is None:
        return None
    weights, weight_scales, biases, torch_linears, mode = layers
    for backend in chosen:
        for op in ("int8" if mode else "linear", "norm", "attention"):
            if backends.resolve(op, backend, x.device) != "cpu":
                return None
    first = norms[0]._parameters
    qkv_norm = (first["weight"], first["bias"], float(norms[0].eps)) if pre_norm else (
        None, None, 0.0)
    return ((*qkv_norm, attention.head_dim, weights[:3], weight_scales[:3], biases[:3],
             torch_linears[:3], mode),
            (weights[3:], weight_scales[3:], biases[3:], torch_linears[3:], mode,
             [n._parameters["weight"] for n in norms], [n._parameters["bias"] for n in norms],
             [float(n.eps) for n in norms], activation, pre_norm))


def _patch_seq2seq_decoder_layer(module, names):
    """Where its attention's class reads as the rule expects (SEQ2SEQ_ATTENTION_SOURCE, or
    Whisper's SCALED_QUERY_ATTENTION_SOURCE) and transformers' EncoderDecoderCache is there. Its
    facts: the cache's class, the name of the cache parameter, whether the cache's update takes
    the call's kwargs, whether the layer is pre-norm, its attention's class, whether that scales
    the query before the attention."""
    attention = getattr(module, "self_attn", None)
    cls = type(attention)
    try:
        from transformers.cache_utils import EncoderDecoderCache
    except ImportError:
        return False
    if not (isinstance(attention, nn.Module) and type(module.encoder_attn) is cls
            and isinstance(getattr(attention, "layer_idx", None), int)):
        return False
    cache_name = "cache" if "cache" in inspect.signature(cls.forward).parameters else (
        "past_key_values")
    reads = [_reads_as(cls.forward, tuple(line.replace("CACHE", cache_name) for line in source))
             for source in (SEQ2SEQ_ATTENTION_SOURCE, SCALED_QUERY_ATTENTION_SOURCE)]
    if not any(reads):
        return False
    module.__dict__[FACTS_ATTR] = (EncoderDecoderCache, cache_name,
                                   _reads_as(cls.forward, ("self.layer_idx, kwargs=kwargs)",)),
                                   _reads_as(type(module).forward, SEQ2SEQ_PRE_NORM_SOURCE), cls,
                                   reads[1])
    return _install(module, _seq2seq_decoder_layer_forward)
