"""Rules of a pre-norm decoder layer (Llama-like and Gemma 2 / 3's sandwich-norm layers).

  residual_rms_norm  a pre-norm decoder layer (Llama, Mistral, Qwen2, Qwen3, Gemma, SmolLM3,
               Granite): h + attn(...) and post_attention_layernorm of it in one pass of the fused
               RMSNorm (a FusedRMSNorm, from the norm rules), which returns the normed sum and the
               sum, the MLP's residual (Granite's branches times its residual_multiplier first). On
               CPU tensors in inference, where its attention and MLP carry their rules (each of
               these families), the whole layer in two transfuse._C calls around the cache's own
               update (csrc/bindings/decoder_layer.cpp), padded or over the tokens padding removal
               packed: the kernels the rules run, bit for bit, without their twenty-odd Python
               calls.
  sandwich_rms_norm  Gemma 2 / 3's decoder layer, whose norms also follow the attention and the
               MLP: the attention's residual added inside pre_feedforward_layernorm's pass; on
               CPU tensors in inference the whole layer in residual_rms_norm's two calls, given
               the two extra norms (and Gemma 2's attention softcap).
"""
from __future__ import annotations

import torch
from torch import nn

from ... import backends
from ...nn import FusedRMSNorm
from ...ops.activation import KERNEL_DTYPES as ACTIVATION_DTYPES
from ...ops.attention import MAX_HEAD_DIM, _broadcast_mask
from ...ops.norm import _rms_norm_dtypes
from ...ops.rotary import KERNEL_DTYPES as ROTARY_DTYPES
from ..attention import NAME as ATTENTION_NAME, _causal, _weights_requested, reads_no_mask
from .common import (BACKEND_ATTR, FACTS_ATTR, PACKED_KWARGS, PLAIN_TENSORS, _global_hooks,
                     _install, _own_hooks, _rule_forward)
from .linear import _linear_call_arguments
from .mlp import _gated_activation, _gated_mlp_forward
from .rotary_attention import _family_attention_arguments, _rotary_attention_forward, _rotates
from .sources import SCALED_RESIDUAL_FAMILIES, _decoder_parameters, _family


def _decoder_call(layer, norm, args, kwargs):
    """The layer's keyword arguments, defaults filled in, where its residual norm is fused; None
    (the class's forward) for positional arguments or 5.24's deprecated name of its cache."""
    parameters = (_decoder_parameters.__wrapped__ if torch.compiler.is_compiling()  # (no
                  else _decoder_parameters)(type(layer))  # warning of Dynamo's on lru_cache)
    if not isinstance(norm, FusedRMSNorm) or args or (
            "past_key_values" in kwargs and "past_key_values" not in parameters):
        return None
    return {**parameters, **kwargs}


def _add_and_norm(norm, hidden_states, residual):
    """(norm(residual + hidden_states), the sum): the add inside the fused norm's pass."""
    if hidden_states.dtype == residual.dtype:
        return norm(hidden_states, residual)
    residual = residual + hidden_states  # autocast: the sum promotes, as the class's add does
    return norm(residual), residual


def _residual_multiplier(layer):
    """What the layer scales each branch by before its residual add (Granite's
    residual_multiplier, as a float), or None (the other families add the branch itself)."""
    return float(layer.residual_multiplier) if layer.__dict__[FACTS_ATTR] else None


def _scaled(branch, multiplier):
    return branch if multiplier is None else branch * multiplier


def _decoder_forward(self, hidden_states, args, kwargs, norm, unfused):
    """The rule's call checked (else the class's forward), then the fused calls, else
    unfused(self, hidden_states, call)."""
    call = _decoder_call(self, norm, args, kwargs)
    if call is None:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    fused = _decoder_layer_fused(self, hidden_states, call)
    return fused if fused is not None else unfused(self, hidden_states, call)


def _residual_rms_norm_forward(self, hidden_states, *args, **kwargs):
    return _decoder_forward(self, hidden_states, args, kwargs, self.post_attention_layernorm,
                            _residual_rms_norm_modules)


def _residual_rms_norm_modules(self, hidden_states, call):
    multiplier = _residual_multiplier(self)
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **call)
    normed, residual = _add_and_norm(self.post_attention_layernorm,
                                     _scaled(attended, multiplier), hidden_states)
    return residual + _scaled(self.mlp(normed), multiplier)


def _sandwich_rms_norm_forward(self, hidden_states, *args, **kwargs):
    return _decoder_forward(self, hidden_states, args, kwargs, self.pre_feedforward_layernorm,
                            _sandwich_rms_norm_modules)


def _sandwich_rms_norm_modules(self, hidden_states, call):
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **call)
    normed, residual = _add_and_norm(self.pre_feedforward_layernorm,
                                     self.post_attention_layernorm(attended), hidden_states)
    return residual + self.post_feedforward_layernorm(self.mlp(normed))


# The decoder layer in two transfuse._C calls around its cache's update (decoder_layer.cpp), on
# CPU tensors in inference where every module runs what the calls run.
# The keyword arguments a layer's attention passes on (to the attention function, which ignores
# them, and to a 5.24 cache's update): what transformers' decoder stacks pass.
DECODER_IDLE_KWARGS = frozenset(("position_ids", "use_cache", "cache_position"))


def _decoder_layer_fused(layer, x, call):
    """The layer's output from transfuse._C.decoder_layer_qkv, the cache's update and
    decoder_layer_out where its modules would compute just that (_decoder_layer_arguments), else
    None (nothing done)."""
    attention = layer._modules.get("self_attn")
    if (type(x) is not torch.Tensor or x.device.type != "cpu" or x.dim() != 3 or not x.numel()
            or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch.is_autocast_enabled("cpu") or torch._C._get_tracing_state()
            or _global_hooks() or _rule_forward(attention) is not _rotary_attention_forward):
        return None
    _, cache_name, update_takes_kwargs, family, head_norms = attention.__dict__[FACTS_ATTR]
    rest = dict(call)
    position_embeddings, mask, cache = (rest.pop(name, None) for name in (
        "position_embeddings", "attention_mask", cache_name))
    packed = rest.keys() & PACKED_KWARGS  # (padding removal's prefill)
    if (not rest.keys() <= DECODER_IDLE_KWARGS | packed or _weights_requested(rest)
            or type(position_embeddings) is not tuple or len(position_embeddings) != 2
            or packed and (len(packed) != 4 or x.shape[0] != 1
                           or any(rest[name] is None for name in packed))
            or not packed and reads_no_mask(attention.config) == "packed"):  # (it says why)
        return None
    angles = position_embeddings if _rotates(attention, family) else (None, None)
    arguments = _decoder_layer_arguments(layer, attention, head_norms, x, *angles)
    if arguments is None:
        return None
    qkv_arguments, out_arguments = arguments
    module = backends.extension()[0]
    q, k, v = module.decoder_layer_qkv(x, *qkv_arguments, *angles)
    if cache is not None:
        k, v = cache.update(k, v, attention.layer_idx,
                            **({"kwargs": rest} if update_takes_kwargs else {}))
    # as the transfuse attention function (hf/attention.py) takes the call
    family_arguments = _family_attention_arguments(attention, family)
    window = family_arguments.get("sliding_window") or 0
    softcap = float(family_arguments.get("softcap") or 0.0)
    if packed:  # per sequence, the mask not read
        layout = (rest["cu_seq_lens_q"].to(torch.int32), rest["cu_seq_lens_k"].to(torch.int32),
                  int(rest["max_length_q"]), int(rest["max_length_k"]))
        return module.decoder_layer_out(x, q, k, v, None, *layout,
                                        bool(getattr(attention, "is_causal", True)),
                                        attention.scaling, int(window), softcap, *out_arguments)
    seq_q, seq_kv = q.shape[2], k.shape[2]
    causal = _causal(attention, q, mask, None)
    if causal and seq_kv > seq_q:
        k, v = k[:, :, :seq_q], v[:, :, :seq_q]
    window = int(window) if mask is None else 0
    mask = _broadcast_mask(mask, q, k, None)
    return module.decoder_layer_out(x, q, k, v, mask, None, None, 0, 0, causal, attention.scaling,
                                    window, softcap, *out_arguments)


def _decoder_layer_arguments(layer, attention, head_norms, x, cos, sin):
    """(decoder_layer_qkv's arguments after x and before cos and sin, decoder_layer_out's after
    softcap) for the layer (attention: its self-attention, with head norms or not) on x, where
    its modules run what the calls run: the rules' forwards, FusedRMSNorm norms, one kind of
    linear layer (float of x's dtype, or int8 in one mode), SiLU or GELU, x's dtype in every
    kernel, the cpu backend for each op; else None. cos and sin: the rotary embedding's angles,
    or None for a layer without one."""
    children = layer._modules
    mlp = children.get("mlp")
    sandwich = _rule_forward(layer) is _sandwich_rms_norm_forward
    # the input norm, the residual norm (before the MLP), the sandwich norms, the head norms
    norms = (children.get("input_layernorm"),
             children.get("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"))
    if sandwich:
        norms += (children.get("post_attention_layernorm"),
                  children.get("post_feedforward_layernorm"))
    if head_norms:
        norms += (attention._modules.get("q_norm"), attention._modules.get("k_norm"))
    dtype = x.dtype
    head_dim = attention.head_dim
    if (layer.training or attention.training or _own_hooks(layer) or _own_hooks(attention)
            or _rule_forward(mlp) is not _gated_mlp_forward or _own_hooks(mlp)
            or _gated_activation(mlp.act_fn) is None or dtype not in ACTIVATION_DTYPES
            or dtype not in ROTARY_DTYPES or head_dim % 2 or head_dim > MAX_HEAD_DIM
            or attention.config._attn_implementation != ATTENTION_NAME):
        return None
    batch, seq = x.shape[:2]
    for angles in (cos, sin) if cos is not None else ():
        if (type(angles) is not torch.Tensor or angles.dtype != dtype or angles.dim() != 3
                or angles.shape[0] not in (1, batch) or angles.shape[1:] != (seq, head_dim)
                or angles.stride(-1) != 1 or angles.requires_grad):
            return None
    norm_arguments = []
    chosen = {attention.__dict__.get(BACKEND_ATTR), mlp.__dict__.get(BACKEND_ATTR)}
    for n in norms:
        if (type(n) is not FusedRMSNorm or _own_hooks(n) or "forward" in n.__dict__
                or type(n.weight) not in PLAIN_TENSORS or n.weight.dtype != dtype):
            return None
        normalized_dtype, out_dtype = _rms_norm_dtypes(dtype, dtype, n.casting_mode)
        if out_dtype != dtype:
            return None
        chosen.add(n.backend)
        norm_arguments.append((n.weight, float(n.offset), float(n.eps), normalized_dtype,
                               out_dtype))
    linears = [attention._modules.get(name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [mlp._modules.get(name) for name in ("gate_proj", "up_proj", "down_proj")]
    layers = _linear_call_arguments(linears, x, chosen)
    if layers is None:
        return None
    weights, weight_scales, biases, torch_linears, mode = layers
    for backend in chosen:
        for op in ("int8" if mode else "linear", "norm", "attention", "rotary", "activation"):
            if backends.resolve(op, backend, x.device) != "cpu":
                return None
    sandwich_weights = []
    if sandwich:  # (the call gives them the residual norm's offset, eps and dtypes)
        if any(n[1:] != norm_arguments[1][1:] for n in norm_arguments[2:4]):
            return None
        sandwich_weights = [n[0] for n in norm_arguments[2:4]]
    head_norm_arguments = ([], 0.0, 0.0)  # (the head norms' weights, offset and eps)
    if head_norms:
        q_norm, k_norm = norm_arguments[-2:]
        if q_norm[1:] != k_norm[1:] or q_norm[3:] != norm_arguments[0][3:]:
            return None  # (the call takes one offset and eps, and the input norm's dtypes)
        head_norm_arguments = ([q_norm[0], k_norm[0]], *q_norm[1:3])
    return ((*norm_arguments[0], head_dim, weights[:3], weight_scales[:3], biases[:3],
             torch_linears[:3], mode, *head_norm_arguments),
            (weights[3:], weight_scales[3:], biases[3:], torch_linears[3:], mode,
             *norm_arguments[1], _gated_activation(mlp.act_fn), sandwich_weights,
             None if sandwich else _residual_multiplier(layer)))


def _patch_sandwich_rms_norm(module, names):
    """Only over a fused pre_feedforward_layernorm (the norm rules ran)."""
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names) and isinstance(
        module.pre_feedforward_layernorm, FusedRMSNorm) and _install(
        module, _sandwich_rms_norm_forward)


def _patch_residual_rms_norm(module, names):
    """Only over a fused post_attention_layernorm (the norm rules ran; norm=False leaves the
    layer alone). Its facts: whether its family scales the residual branches."""
    if not (all(isinstance(getattr(module, name, None), nn.Module) for name in names)
            and isinstance(module.post_attention_layernorm, FusedRMSNorm)):
        return False
    module.__dict__[FACTS_ATTR] = _family(type(module)) in SCALED_RESIDUAL_FAMILIES
    return _install(module, _residual_rms_norm_forward)
