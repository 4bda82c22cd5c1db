"""Rules of attentions with a rotate-half rotary embedding.

  rotary_attention  a decoder's attention (Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, SmolLM3,
               Granite): its Q, K and V as projections (above; Qwen3's and Gemma 3's query and key
               then through their head norms), then transformers' apply_rotary_pos_emb (about ten
               torch ops) replaced by one transfuse.ops.rotary call over q and k, which also lays
               them out contiguously for the attention (SmolLM3's NoPE layers, use_rope unset:
               none, as the class); the rest as the class's forward (cache update, the configured
               attention function, o_proj).
  joint_rotary_attention  ModernBERT's attention (one Wqkv GEMM for q, k and v): its
               apply_rotary_pos_emb, which upcasts q and k to fp32 (about fourteen torch ops),
               replaced by one transfuse.ops.rotary call over q and k (fp32 math rounded once:
               the same values in fp32 and bf16); the rest as the class's forward.
"""
from __future__ import annotations

import inspect
import sys

import torch

from ... import ops
from ...ops.rotary import KERNEL_DTYPES as ROTARY_DTYPES
from .common import BACKEND_ATTR, FACTS_ATTR, _install
from .linear import _patch_projections
from .sources import (HEAD_NORM_FAMILIES, NOPE_FAMILIES, ROTARY_ATTENTION_ARGUMENTS, _family,
                      _reads_as)


def _attention_facts(cls):
    """(the name of the family's module, the name of the cache parameter, whether cache.update
    takes the call's kwargs, the family's name, whether its query and key go through head
    norms), read from the class at patch time."""
    parameters = inspect.signature(cls.forward).parameters
    family = _family(cls)
    return (cls.__module__, "cache" if "cache" in parameters else "past_key_values",
            _reads_as(cls.forward, ("self.layer_idx, kwargs=kwargs)",)), family,
            family in HEAD_NORM_FAMILIES)


def _rotate(q, k, cos, sin, family_module, backend):
    """The family's apply_rotary_pos_emb(q, k, cos, sin) through transfuse.ops.rotary where its
    kernels take the inputs (one dtype of theirs, [B or 1, S, D] angles needing no gradient)."""
    batch, _, seq, head_dim = q.shape
    if (q.dtype in ROTARY_DTYPES and k.dtype == cos.dtype == sin.dtype == q.dtype
            and cos.dim() == 3 and cos.shape == sin.shape and cos.shape[0] in (1, batch)
            and tuple(cos.shape[1:]) == (seq, head_dim) and head_dim % 2 == 0
            and not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))):
        return ops.rotary(q, k, cos, sin, backend=backend)
    return family_module.apply_rotary_pos_emb(q, k, cos, sin)


def _rotates(attention, family):
    """Whether the attention applies its rotary embedding (not in SmolLM3's NoPE layers)."""
    return family not in NOPE_FAMILIES or bool(attention.use_rope)


def _family_attention_arguments(module, family):
    """What the family's attention passes its attention function besides the common arguments
    (ROTARY_ATTENTION_ARGUMENTS: Mistral's, Qwen2's and Qwen3's sliding_window)."""
    arguments = ROTARY_ATTENTION_ARGUMENTS.get(family)
    return arguments[1](module) if arguments else {}


def _rotary_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                              *args, **kwargs):
    module_name, cache_name, update_takes_kwargs, family, head_norms = self.__dict__[FACTS_ATTR]
    family_module = sys.modules[module_name]
    # positional arguments past the mask, or 5.24's deprecated name of its cache: the class's
    if args or position_embeddings is None or (cache_name != "past_key_values"
                                               and "past_key_values" in kwargs):
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                  *args, **kwargs)
    cache = kwargs.pop(cache_name, None)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query = self.q_proj(hidden_states).view(hidden_shape)
    key = self.k_proj(hidden_states).view(hidden_shape)
    if head_norms:
        query, key = self.q_norm(query), self.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    if _rotates(self, family):
        query, key = _rotate(query, key, *position_embeddings, family_module,
                             self.__dict__.get(BACKEND_ATTR))
    if cache is not None:
        extra = {"kwargs": kwargs} if update_takes_kwargs else {}
        key, value = cache.update(key, value, self.layer_idx, **extra)
    attention = family_module.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, family_module.eager_attention_forward)
    output, weights = attention(
        self, query, key, value, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
        **_family_attention_arguments(self, family), **kwargs)
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


def _patch_rotary_attention(module, names):
    """The projections of q, k and v where they fit, and the forward."""
    _patch_projections(module, names)
    module.__dict__[FACTS_ATTR] = _attention_facts(type(module))
    return _install(module, _rotary_attention_forward)


def _joint_rotary_attention_forward(self, hidden_states, position_embeddings=None,
                                    attention_mask=None, **kwargs):
    family_module = sys.modules[type(self).__module__]
    if position_embeddings is None:  # (what the class does with it)
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                  **kwargs)
    input_shape = hidden_states.shape[:-1]
    qkv = self.Wqkv(hidden_states).view(*input_shape, 3, -1, self.head_dim)
    query, key, value = (t.transpose(1, 2) for t in qkv.unbind(dim=-3))
    query, key = _rotate(query, key, *position_embeddings, family_module,
                         self.__dict__.get(BACKEND_ATTR))
    attention = family_module.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, family_module.eager_attention_forward)
    output, weights = attention(
        self, query, key, value, attention_mask,
        dropout=self.attention_dropout if self.training else 0.0, scaling=self.head_dim**-0.5,
        sliding_window=self.sliding_window, deterministic=self.deterministic_flash_attn, **kwargs)
    return self.out_drop(self.Wo(output.reshape(*input_shape, -1).contiguous())), weights


def _patch_joint_rotary_attention(module, names):
    return _install(module, _joint_rotary_attention_forward)
