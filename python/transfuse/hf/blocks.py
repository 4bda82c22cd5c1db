"""Block rules: rewrites that span several modules of a transformer block, per family, as tables.

A rule becomes the forward of one module instance (types.MethodType, marked with FORWARD_ATTR so
that unpatch_blocks removes it; a deep copy of the model rebinds it to the copy). Each forward
checks at call time that the modules it uses are still those it was written for, and runs the
class's own forward otherwise, so a later swap (int8 layers, a user's module) never computes
something else.

  projections  sibling nn.Linear layers that read the same input (attention's Q, K and V; a
               gated MLP's gate and up), or sibling transfuse Int8Linear layers of one mode, run
               as one GEMM (int8: one quantization of the input in w8a8). Their weights (and
               biases, int8 scales) live in one storage, each tensor a view of its rows:
               the Parameter objects, the state dict and an optimizer see
               nothing new (save_pretrained clones such disjoint views). The first sibling
               called computes x @ [W_q; W_k; W_v]^T and keeps it, per thread, until every
               sibling has taken its columns from it (each checks that its input is the same
               tensor, unmodified since: for inference-mode tensors, which count no
               modifications, the same tensor). While autograd records, and on devices outside
               JOINED_GEMM_DEVICES / JOINED_INT8_DEVICES (the CPU, where it measured slower),
               every layer runs on its own.
  residual_norm  LayerNorm(dropout(dense(h)) + input) (BERT-style SelfOutput / Output): the
               residual add runs inside the fused norm's pass (a FusedLayerNorm, from the norm
               rules) instead of a separate one.
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
  seq2seq_decoder_layer  a BART-like decoder layer, post-norm (BART, Marian, PLBart,
               Blenderbot-small) or pre-norm (mBART, M2M100 / NLLB, Pegasus, Blenderbot,
               Whisper): at each
               decoding step whose cross-attention reads the encoder's keys and values from an
               EncoderDecoderCache (every step after the first), on CPU tensors in inference, the
               whole layer in two transfuse._C calls around the self-attention cache's own update
               (csrc/bindings/decoder_layer.cpp): the kernels its modules' rules run, bit for bit,
               without their some twenty Python calls. Any other call: the class's forward.
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
  gated_mlp    act_fn(gate_proj(x)) * up_proj(x) with act_fn SiLU (Llama, Mistral, Qwen2, Qwen3,
               SmolLM3, Granite) or GELU (Gemma 1-3's tanh form): gate and up as projections, their
               product through transfuse.ops.silu_mul / gelu_mul (one pass instead of two; on CUDA
               it reads the two halves of the joint GEMM's output in place). Another act_fn: the
               projections alone.
  joint_gated_mlp  ModernBERT's MLP, act(input) * gate over the two halves of one Wi GEMM's
               output: the product through one transfuse.ops.gelu_mul (silu_mul), reading the
               halves in place; Wi, its dropout and Wo as the class's forward calls them.
  linear       any other torch.nn.Linear (that class only, unhooked, not used by its parent's
               rule): its forward through transfuse.ops.linear, so that on CPU tensors a
               decoding step's output projections and head run transfuse's GEMV
               (csrc/cpu/gemv.cpp) rather than torch's, which read fp32 weights at 12 GB/s on
               the AMD EPYC.
  encoder_layer  a BERT-style encoder layer without cross-attention, chunking or a cache. CPU
               inference (no autograd) with the transfuse attention over packed tokens or an
               unmasked batch, every module as built or as its rule left it: the whole layer in
               one transfuse._C.encoder_layer call (csrc/bindings/encoder_layer.cpp), the same
               kernels as the modules' rules (torch's GEMM where transfuse.ops.linear leaves a
               call to it), bit for bit, without some ten Python calls between
               them (on all-MiniLM-L6-v2's real sentences that Python was about a tenth of a
               batch's time). Otherwise the class's computation with its containers' Python
               skipped (the layer's, its attention's and self-attention's forwards,
               transformers' kwarg-renaming wrappers, apply_chunking_to_forward's signature
               inspection): Q, K, V, the configured attention function, then the output,
               intermediate and output layers (each its own rule) called as modules. A hooked or
               overridden container runs the class's forward.
               DistilBERT's block (TransformerBlock: the same computation, its linears under
               the linear rule, an unchunked feed-forward) takes the same call, else its
               class's forward.
  encoder_stack  a BERT-style encoder (and DistilBERT's Transformer): where every layer would run
               its encoder_layer rule's one call (the checks above, each layer's rule installed
               and unhooked), the calls one after another, without the module calls, kwargs and
               output objects between them; else the class's forward. Inside padding removal
               (hf/unpad.py) where it applies.
  relative_bias  MPNet's encoder (all-mpnet-base-v2), whose attention adds a relative position
               bias and computes itself outside transformers' attention interface, under
               containers that pass no kwargs down: its self-attention through
               transfuse.ops.attention (mask: the bias plus the padding mask; packed tokens:
               varlen_attention), its container with the residual add inside the fused norm,
               its layer as encoder_layer's (one call, given the bias), its stack computing the
               bias once for one row of the longest sequence (not [B, heads, S, S]; packed
               sequences read it at their own positions) and running the layers fused where they
               all fit. Padding removal (hf/unpad.py) packs its padded batches while every layer
               carries these rules (PACKED_STACK_ATTR). Recorded outputs (attention weights,
               hidden states) run the classes' forwards.
  embeddings   BERT's (and ELECTRA's) embeddings on given token ids and token types, CPU
               inference: LayerNorm(word[ids] + token_type[types] + position[positions]) in one
               transfuse._C.embeddings_forward call (csrc/bindings/embeddings.cpp), the
               module's operations in its order (bit for bit), without its six module calls;
               else the class's forward.
  bias_gelu    gelu(dense(h)) (BERT-style Intermediate, exact or tanh GELU): on CPU tensors with
               a float dense layer, one transfuse.ops.linear with the bias and GELU in its
               GEMM's epilogue; else the GEMM (float or transfuse int8) without its bias (no
               copy of the bias into the output first), then one pass of
               transfuse.ops.bias_gelu.

On CPU tensors the rules' float GEMMs (the projections run one by one, the dense layers before a
residual norm or a GELU) go through transfuse.ops.linear, whose fp32 and bf16 GEMMs are
transfuse's own.

Each rule names the class's forward lines it was written for (_expected_source, matched in order
with comments and line breaks ignored); a class whose forward reads otherwise (another
transformers version) is left alone.
"""
from __future__ import annotations

import functools
import inspect
import math
import re
import sys
import threading
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module

from .. import backends, ops
from ..nn import FusedLayerNorm, FusedRMSNorm, Int8Linear
from ..ops.linear import _own_kernel_takes
from .attention import (NAME as ATTENTION_NAME, _causal, _combined_mask,
                        _weights_requested, reads_no_mask)
from .unpad import PACKED_STACK_ATTR, _outputs_recorded
from ..ops.activation import KERNEL_DTYPES as ACTIVATION_DTYPES, gated_mul
from ..ops.attention import MAX_HEAD_DIM, _broadcast_mask
from ..ops.norm import KERNEL_DTYPES as NORM_DTYPES, _rms_norm_dtypes
from ..ops.rotary import KERNEL_DTYPES as ROTARY_DTYPES

FORWARD_ATTR = "_transfuse_block_forward"
PROJECTION_ATTR = "_transfuse_projection"
BACKEND_ATTR = "_transfuse_block_backend"
FACTS_ATTR = "_transfuse_block_facts"  # what a rule read from the module's class at patch time
SILU_CLASSES = {nn.SiLU}
GELU_ACTIVATIONS = {"none": "gelu", "tanh": "gelu_tanh"}  # F.gelu's approximate -> gated_mul's

# Devices whose tensors run fused projections as one GEMM. Not the CPU: on all-MiniLM-L6-v2
# (2 threads, AVX2, fp32, real sentences, batch 8) the joint Q/K/V GEMM measured 0.97x the three
# separate ones, model-level (benchmarks/results/block-rules/); there each layer runs on its own.
JOINED_GEMM_DEVICES = ("cuda",)
# Devices whose tensors run int8 siblings as one int8 GEMM (w8a8: one quantization of the input).
# Not the CPU either: w8a8 there (AMD EPYC, 2 threads, one interleaved A/B) read 1.01x on
# MiniLM's real sentences, 1.00x at 8 x 128, and 0.84x decoding the SmolLM-135M shape (the
# joint call's Python bookkeeping costs more than two quantizations of one token).
JOINED_INT8_DEVICES = ("cuda",)

_BERT_LIKE = ("Bert", "Roberta", "XLMRoberta", "Electra", "Camembert")
_DECODERS = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "SmolLM3", "Granite")
# decoders whose layers norm the attention's and the MLP's outputs too (sandwich_rms_norm)
_SANDWICH_DECODERS = ("Gemma2", "Gemma3")
# encoder-decoder models whose decoder layers are BART's, post-norm or pre-norm
_SEQ2SEQ_DECODERS = ("Bart", "Marian", "PLBart", "BlenderbotSmall", "MBart", "M2M100", "Pegasus",
                     "Blenderbot", "Whisper")
SEQ2SEQ_NORMS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")

# class name -> (rule, the attributes it uses)
BLOCK_RULES = {
    **{f"{family}SelfAttention": ("projections", ("query", "key", "value"))
       for family in _BERT_LIKE},
    **{f"{family}{part}": ("residual_norm", ("dense", "dropout", "LayerNorm"))
       for family in _BERT_LIKE for part in ("SelfOutput", "Output")},
    "MPNetOutput": ("residual_norm", ("dense", "dropout", "LayerNorm")),
    # MPNet: BERT's layer with a relative position bias in its attention (RELATIVE_BIAS_*)
    "MPNetSelfAttention": ("relative_bias_attention", ()),  # (q, k, v, o: the linear rule's)
    "MPNetAttention": ("relative_bias_container", ("attn", "LayerNorm", "dropout")),
    "MPNetLayer": ("relative_bias_layer", ("attention", "intermediate", "output")),
    "MPNetEncoder": ("relative_bias_stack", ("layer",)),
    **{f"{family}Intermediate": ("bias_gelu", ("dense", "intermediate_act_fn"))
       for family in (*_BERT_LIKE, "MPNet")},
    **{f"{family}Layer": ("encoder_layer", ("attention", "intermediate", "output"))
       for family in _BERT_LIKE},
    **{f"{family}Encoder": ("encoder_stack", ("layer",)) for family in _BERT_LIKE},
    # DistilBERT's block and stack: the same computation under other names (DISTILBERT_*)
    "TransformerBlock": ("encoder_layer", ("attention", "sa_layer_norm", "ffn",
                                           "output_layer_norm")),
    "Transformer": ("encoder_stack", ("layer",)),
    # (RoBERTa's embeddings number positions from the ids: another forward)
    **{f"{family}Embeddings": ("embeddings", ("word_embeddings", "token_type_embeddings",
                                              "position_embeddings", "LayerNorm", "dropout"))
       for family in ("Bert", "Electra")},
    **{f"{family}Attention": ("rotary_attention", ("q_proj", "k_proj", "v_proj"))
       for family in (*_DECODERS, *_SANDWICH_DECODERS)},
    **{f"{family}MLP": ("gated_mlp", ("gate_proj", "up_proj"))
       for family in (*_DECODERS, *_SANDWICH_DECODERS)},
    "ModernBertAttention": ("joint_rotary_attention", ()),  # (Wqkv, Wo: the linear rule's)
    "ModernBertMLP": ("joint_gated_mlp", ()),  # (Wi, Wo: the linear rule's)
    **{f"{family}DecoderLayer": ("residual_rms_norm",
                                 ("input_layernorm", "self_attn", "post_attention_layernorm",
                                  "mlp")) for family in _DECODERS},
    **{f"{family}DecoderLayer": ("sandwich_rms_norm",
                                 ("input_layernorm", "self_attn", "post_attention_layernorm",
                                  "pre_feedforward_layernorm", "mlp",
                                  "post_feedforward_layernorm")) for family in _SANDWICH_DECODERS},
    **{f"{family}DecoderLayer": ("seq2seq_decoder_layer", ("self_attn", "encoder_attn",
                                                          *SEQ2SEQ_NORMS))
       for family in _SEQ2SEQ_DECODERS},
    "Linear": ("linear", ()),  # torch.nn.Linear itself (_patch_linear checks the class)
}

# What the class's forward must read, in this order, for a rule to replace it: for projections,
# a call of each sibling (the fused call checks at run time that they share one input).
RESIDUAL_NORM_SOURCE = ("hidden_states = self.dense(hidden_states)",
                        "hidden_states = self.dropout(hidden_states)",
                        "hidden_states = self.LayerNorm(hidden_states + input_tensor)",
                        "return hidden_states")


# A BART-like decoder layer's forward, post-norm (BART, Marian, PLBart, Blenderbot-small) or
# pre-norm (mBART, M2M100, Pegasus, Blenderbot), and its attention's.
_SEQ2SEQ_CROSS_SOURCE = ("if encoder_hidden_states is not None:", "residual = hidden_states",
                         "self.encoder_attn(", "key_value_states=encoder_hidden_states,",
                         "attention_mask=encoder_attention_mask,")
_SEQ2SEQ_RESIDUAL_ADD = ("hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, "
                         "training=self.training)", "hidden_states = residual + hidden_states")
_SEQ2SEQ_FFN_SOURCE = ("hidden_states = self.activation_fn(self.fc1(hidden_states))",
                       "hidden_states = nn.functional.dropout(hidden_states, "
                       "p=self.activation_dropout, training=self.training)",
                       "hidden_states = self.fc2(hidden_states)", *_SEQ2SEQ_RESIDUAL_ADD)
SEQ2SEQ_POST_NORM_SOURCE = (
    "residual = hidden_states", "self.self_attn(", *_SEQ2SEQ_RESIDUAL_ADD,
    "hidden_states = self.self_attn_layer_norm(hidden_states)", *_SEQ2SEQ_CROSS_SOURCE,
    *_SEQ2SEQ_RESIDUAL_ADD, "hidden_states = self.encoder_attn_layer_norm(hidden_states)",
    "residual = hidden_states", *_SEQ2SEQ_FFN_SOURCE,
    "hidden_states = self.final_layer_norm(hidden_states)", "return hidden_states")
SEQ2SEQ_PRE_NORM_SOURCE = (
    "residual = hidden_states", "hidden_states = self.self_attn_layer_norm(hidden_states)",
    "self.self_attn(", *_SEQ2SEQ_RESIDUAL_ADD, *_SEQ2SEQ_CROSS_SOURCE[:2],
    "hidden_states = self.encoder_attn_layer_norm(hidden_states)", *_SEQ2SEQ_CROSS_SOURCE[2:],
    *_SEQ2SEQ_RESIDUAL_ADD, "residual = hidden_states",
    "hidden_states = self.final_layer_norm(hidden_states)", *_SEQ2SEQ_FFN_SOURCE,
    "return hidden_states")
# (CACHE: the name of its cache parameter, transformers 5.17's past_key_values or 5.24's cache)
SEQ2SEQ_ATTENTION_SOURCE = (
    "query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)",
    "if CACHE is not None: if isinstance(CACHE, EncoderDecoderCache):",
    "is_updated = CACHE.is_updated.get(self.layer_idx)", "if is_cross_attention:",
    ".cross_attention_cache", "else:", ".self_attention_cache",
    "current_states = key_value_states if is_cross_attention else hidden_states",
    "if is_cross_attention and CACHE is not None and is_updated:",
    ".layers[self.layer_idx].keys", ".layers[self.layer_idx].values", "else:",
    "key_states = self.k_proj(current_states)", "value_states = self.v_proj(current_states)",
    "key_states = key_states.view(kv_shape).transpose(1, 2)",
    "value_states = value_states.view(kv_shape).transpose(1, 2)",
    ".update(key_states, value_states, self.layer_idx",
    "attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(",
    "attn_output, attn_weights = attention_interface( self, query_states, key_states, "
    "value_states, attention_mask, dropout=0.0 if not self.training else self.dropout, "
    "scaling=self.scaling, **kwargs, )",
    "attn_output = attn_output.reshape(*input_shape, -1).contiguous()",
    "attn_output = self.out_proj(attn_output)", "return attn_output, attn_weights")
# Whisper's: its query times the scale before the attention (which then scales by 1)
SCALED_QUERY_ATTENTION_SOURCE = (
    "query_states = (self.q_proj(hidden_states) * self.scaling).view(hidden_shape).transpose(1, "
    "2).contiguous()",
    "if CACHE is not None and isinstance(CACHE, EncoderDecoderCache):",
    "is_updated = CACHE.is_updated.get(self.layer_idx)", "if is_cross_attention:",
    "CACHE.is_updated[self.layer_idx] = True", "CACHE = CACHE.cross_attention_cache", "else:",
    "CACHE = CACHE.self_attention_cache",
    "current_states = key_value_states if key_value_states is not None else hidden_states",
    "if is_cross_attention and CACHE and is_updated:",
    "key_states = CACHE.layers[self.layer_idx].keys",
    "value_states = CACHE.layers[self.layer_idx].values", "else:",
    "key_states = self.k_proj(current_states).view(kv_shape).transpose(1, 2).contiguous()",
    "value_states = self.v_proj(current_states).view(kv_shape).transpose(1, 2).contiguous()",
    "key_states, value_states = CACHE.update(key_states, value_states, self.layer_idx",
    "attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(",
    "attn_output, attn_weights = attention_interface( self, query_states, key_states, "
    "value_states, attention_mask, dropout=0.0 if not self.training else self.dropout, "
    "scaling=1.0, output_attentions=output_attentions, **kwargs, )",
    "attn_output = attn_output.reshape(*input_shape, -1).contiguous()",
    "attn_output = self.out_proj(attn_output)", "return attn_output, attn_weights")

# A decoder layer's forward: the attention gets each named parameter of the forward by its own
# name ("name=name,", in the signature's order: transformers 5.17 names the cache
# past_key_values, 5.24 cache), then **kwargs.
RESIDUAL_RMS_NORM_SOURCE = (
    ("residual = hidden_states", "hidden_states = self.input_layernorm(hidden_states)",
     "hidden_states, _ = self.self_attn(", "hidden_states=hidden_states,"),
    ("**kwargs,", "hidden_states = residual + hidden_states", "residual = hidden_states",
     "hidden_states = self.post_attention_layernorm(hidden_states)",
     "hidden_states = self.mlp(hidden_states)", "hidden_states = residual + hidden_states",
     "return hidden_states"))
# Granite's layers scale each branch before its residual add (its attention's scale is
# config.attention_multiplier, its embeddings' and logits' multipliers are the model's own)
SCALED_RESIDUAL_FAMILIES = ("Granite",)
RESIDUAL_ADD_SOURCE = "hidden_states = residual + hidden_states"
SCALED_RESIDUAL_ADD_SOURCE = "hidden_states = residual + hidden_states * self.residual_multiplier"
# Gemma 2 / 3's: the same head, then norms of the attention's and of the MLP's outputs
SANDWICH_RMS_NORM_TAIL = (
    "**kwargs,", "hidden_states = self.post_attention_layernorm(hidden_states)",
    "hidden_states = residual + hidden_states", "residual = hidden_states",
    "hidden_states = self.pre_feedforward_layernorm(hidden_states)",
    "hidden_states = self.mlp(hidden_states)",
    "hidden_states = self.post_feedforward_layernorm(hidden_states)",
    "hidden_states = residual + hidden_states", "return hidden_states")


# A decoder attention's forward (Llama's; transformers 5.17 names the cache past_key_values and
# updates it without kwargs, 5.24 names it cache), with the family's attention arguments
# (ROTARY_ATTENTION_ARGUMENTS) between scaling and **kwargs.
ROTARY_ATTENTION_SOURCE = (
    ("query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)",
     "key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)",
     "value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)",
     "cos, sin = position_embeddings",
     "query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)",
     ".update(key_states, value_states, self.layer_idx",
     "attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface( "
     "self.config._attn_implementation, eager_attention_forward )",
     "attn_output, attn_weights = attention_interface( self, query_states, key_states, "
     "value_states, attention_mask, dropout=0.0 if not self.training else "
     "self.attention_dropout, scaling=self.scaling,"),
    ("**kwargs, )", "attn_output = attn_output.reshape(*input_shape, -1).contiguous()",
     "attn_output = self.o_proj(attn_output)", "return attn_output, attn_weights"))
# family -> (what its forward passes the attention function, that argument's value)
ROTARY_ATTENTION_ARGUMENTS = {
    "Mistral": ('sliding_window=getattr(self.config, "sliding_window", None),',
                lambda module: {"sliding_window": getattr(module.config, "sliding_window", None)}),
    **dict.fromkeys(("Qwen2", "Qwen3", "Gemma3", "SmolLM3"), (
        "sliding_window=self.sliding_window,",
        lambda module: {"sliding_window": module.sliding_window})),
    "Gemma2": ("sliding_window=self.sliding_window, softcap=self.attn_logit_softcapping,",
               lambda module: {"sliding_window": module.sliding_window,
                               "softcap": module.attn_logit_softcapping}),
}
# Gemma 2 / 3 write the attention's dropout the other way round
DROPOUT_SOURCE = "dropout=0.0 if not self.training else self.attention_dropout,"
REVERSED_DROPOUT_FAMILIES = ("Gemma2", "Gemma3")
REVERSED_DROPOUT_SOURCE = "dropout=self.attention_dropout if self.training else 0.0,"
# Qwen3's attention normalizes each head's query and key (an RMSNorm over head_dim, the modules
# q_norm and k_norm) before the rotary embedding: its first two lines instead of Llama's
# (Gemma 3's: after the transpose, its next two lines; the same values, each norm over head_dim)
HEAD_NORM_FAMILIES = ("Qwen3", "Gemma3")
HEAD_NORM_SOURCE = (
    "query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)",
    "key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)")
TRANSPOSED_HEAD_NORM_SOURCE = ("query_states = self.q_norm(query_states)",
                               "key_states = self.k_norm(key_states)")
# SmolLM3's attention rotates q and k only where its layer's use_rope is set (by default every
# fourth layer has no position embedding: "NoPE")
NOPE_FAMILIES = ("SmolLM3",)
NOPE_SOURCE = "if self.use_rope:"
# transformers' rotate-half rotary embedding (the family module's apply_rotary_pos_emb and
# rotate_half), which transfuse.ops.rotary computes
ROTATE_HALF_SOURCE = ("def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):",
                      "cos = cos.unsqueeze(unsqueeze_dim)", "sin = sin.unsqueeze(unsqueeze_dim)",
                      "q_embed = (q * cos) + (rotate_half(q) * sin)",
                      "k_embed = (k * cos) + (rotate_half(k) * sin)", "return q_embed, k_embed")
ROTATE_HALF_HELPER_SOURCE = ("x1 = x[..., : x.shape[-1] // 2]", "x2 = x[..., x.shape[-1] // 2 :]",
                             "return torch.cat((-x2, x1), dim=-1)")
# ModernBERT's attention (transformers 5.17 to 5.24) and its rotary embedding, computed in fp32
JOINT_ROTARY_ATTENTION_SOURCE = (
    "input_shape = hidden_states.shape[:-1]", "qkv = self.Wqkv(hidden_states)",
    "qkv = qkv.view(*input_shape, 3, -1, self.head_dim)",
    "query_states, key_states, value_states = qkv.unbind(dim=-3)",
    "query_states = query_states.transpose(1, 2)", "key_states = key_states.transpose(1, 2)",
    "value_states = value_states.transpose(1, 2)", "cos, sin = position_embeddings",
    "query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, "
    "unsqueeze_dim=1)",
    "attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface( "
    "self.config._attn_implementation, eager_attention_forward )",
    "attn_output, attn_weights = attention_interface( self, query_states, key_states, "
    "value_states, attention_mask, dropout=self.attention_dropout if self.training else 0.0, "
    "scaling=self.head_dim**-0.5, sliding_window=self.sliding_window, "
    "deterministic=self.deterministic_flash_attn, **kwargs, )",
    "attn_output = attn_output.reshape(*input_shape, -1).contiguous()",
    "attn_output = self.out_drop(self.Wo(attn_output))", "return attn_output, attn_weights")
UPCAST_ROTATE_HALF_SOURCE = (
    "def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):", "original_dtype = q.dtype",
    "cos = cos.unsqueeze(unsqueeze_dim)", "sin = sin.unsqueeze(unsqueeze_dim)",
    "q_embed = (q.float() * cos) + (rotate_half(q.float()) * sin)",
    "k_embed = (k.float() * cos) + (rotate_half(k.float()) * sin)",
    "return q_embed.to(original_dtype), k_embed.to(original_dtype)")

# A BERT-style layer's forward and its feed_forward_chunk; its attention container's forward and
# the self-attention's (transformers 5.17 names the cache past_key_values, 5.24 cache).
ENCODER_LAYER_SOURCE = (
    "self_attention_output, _ = self.attention( hidden_states, attention_mask,",
    "attention_output = self_attention_output",
    "if self.is_decoder and encoder_hidden_states is not None:",
    "layer_output = apply_chunking_to_forward( self.feed_forward_chunk, "
    "self.chunk_size_feed_forward, self.seq_len_dim, attention_output )", "return layer_output")
FEED_FORWARD_SOURCE = ("intermediate_output = self.intermediate(attention_output)",
                       "layer_output = self.output(intermediate_output, attention_output)",
                       "return layer_output")
ATTENTION_CONTAINER_SOURCE = (
    "attention_mask = attention_mask if not self.is_cross_attention else encoder_attention_mask",
    "attention_output, attn_weights = self.self( hidden_states, "
    "encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,",
    "attention_output = self.output(attention_output, hidden_states)",
    "return attention_output, attn_weights")
SELF_ATTENTION_SOURCE = (
    "input_shape = hidden_states.shape[:-1]",
    "hidden_shape = (*input_shape, -1, self.attention_head_size)",
    "query_layer = self.query(hidden_states).view(*hidden_shape).transpose(1, 2)",
    "key_layer = self.key(hidden_states).view(*hidden_shape).transpose(1, 2)",
    "value_layer = self.value(hidden_states).view(*hidden_shape).transpose(1, 2)",
    "attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface( "
    "self.config._attn_implementation, eager_attention_forward )",
    "attn_output, attn_weights = attention_interface( self, query_layer, key_layer, value_layer, "
    "attention_mask, dropout=0.0 if not self.training else self.dropout.p, "
    "scaling=self.scaling, **kwargs, )",
    "attn_output = attn_output.reshape(*input_shape, -1).contiguous()",
    "return attn_output, attn_weights")

# A BERT-style encoder's forward: each layer called in turn, then the output (whose cache is the
# one given, only where use_cache).
STACK_OUTPUT_CLASS = "BaseModelOutputWithPastAndCrossAttentions"
ENCODER_STACK_SOURCE = (
    "for i, layer_module in enumerate(self.layer): hidden_states = layer_module( hidden_states, "
    "attention_mask, encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,",
    "**kwargs, )", f"return {STACK_OUTPUT_CLASS}( last_hidden_state=hidden_states,",
    "if use_cache else None, )")

# DistilBERT's block (TransformerBlock), its self-attention, feed-forward and stack (Transformer):
# a BERT layer's computation, Q / K / V / output named q_lin, k_lin, v_lin, out_lin, the norms
# sa_layer_norm and output_layer_norm, the intermediate and output layers ffn.lin1 and ffn.lin2.
DISTILBERT_LAYER_SOURCE = (
    "attention_output, _ = self.attention( hidden_states, attention_mask=attention_mask, "
    "**kwargs, )", "attention_output = self.sa_layer_norm(attention_output + hidden_states)",
    "ffn_output = self.ffn(attention_output)",
    "ffn_output = self.output_layer_norm(ffn_output + attention_output)", "return ffn_output")
DISTILBERT_ATTENTION_SOURCE = (
    "query_layer = self.q_lin(hidden_states).view(*hidden_shape).transpose(1, 2)",
    "key_layer = self.k_lin(hidden_states).view(*hidden_shape).transpose(1, 2)",
    "value_layer = self.v_lin(hidden_states).view(*hidden_shape).transpose(1, 2)",
    *SELF_ATTENTION_SOURCE[5:8], "attn_output = self.out_lin(attn_output)",
    "return attn_output, attn_weights")
DISTILBERT_FFN_SOURCE = (
    "return apply_chunking_to_forward(self.ff_chunk, self.chunk_size_feed_forward, "
    "self.seq_len_dim, input)",)
DISTILBERT_FFN_CHUNK_SOURCE = ("x = self.lin1(input)", "x = self.activation(x)",
                               "x = self.lin2(x)", "x = self.dropout(x)", "return x")
DISTILBERT_STACK_SOURCE = (
    "for layer_module in self.layer: hidden_states = layer_module( hidden_states, "
    "attention_mask, **kwargs, )", "return BaseModelOutput(last_hidden_state=hidden_states)")
DISTILBERT_CLASSES = ("TransformerBlock", "Transformer")

# BERT's embeddings (transformers 5.17 names the cache's length past_key_values_length, 5.24
# cache_length).
EMBEDDINGS_SOURCE = (
    "if position_ids is None: position_ids = self.position_ids[:,",
    "if token_type_ids is None:",
    "if inputs_embeds is None: inputs_embeds = self.word_embeddings(input_ids)",
    "token_type_embeddings = self.token_type_embeddings(token_type_ids)",
    "embeddings = inputs_embeds + token_type_embeddings",
    "position_embeddings = self.position_embeddings(position_ids)",
    "embeddings = embeddings + position_embeddings", "embeddings = self.LayerNorm(embeddings)",
    "embeddings = self.dropout(embeddings)", "return embeddings")
CACHE_LENGTH_NAMES = frozenset(("cache_length", "past_key_values_length"))

GATED_MLP_SOURCE = ("down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))",
                    "return down_proj")
JOINT_GATED_MLP_SOURCE = ("input, gate = self.Wi(hidden_states).chunk(2, dim=-1)",
                          "return self.Wo(self.drop(self.act(input) * gate))")

BIAS_GELU_SOURCE = ("hidden_states = self.dense(hidden_states)",
                    "hidden_states = self.intermediate_act_fn(hidden_states)",
                    "return hidden_states")


@functools.lru_cache(maxsize=None)
def _decoder_parameters(cls):
    """The named parameters of a decoder layer's forward after hidden_states, with defaults."""
    parameters = list(inspect.signature(cls.forward).parameters.values())[2:]
    return {p.name: p.default for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD}


def _distilbert(cls):
    """Whether the class is DistilBERT's block or stack (names a user's model may use too)."""
    return cls.__name__ in DISTILBERT_CLASSES and cls.__module__.endswith(".modeling_distilbert")


def _family(cls):
    """The family of a BLOCK_RULES class name: its longest prefix among the decoders, else ''."""
    return max((f for f in (*_DECODERS, *_SANDWICH_DECODERS) if cls.__name__.startswith(f)),
               key=len, default="")


def _expected_source(kind, names, cls):
    if kind == "residual_norm":
        return RESIDUAL_NORM_SOURCE
    if kind == "gated_mlp":
        return GATED_MLP_SOURCE
    if kind == "joint_gated_mlp":
        return JOINT_GATED_MLP_SOURCE
    if kind == "rotary_attention":
        head, tail = ROTARY_ATTENTION_SOURCE
        family = _family(cls)
        if family == "Gemma3":
            head = (*head[:3], *TRANSPOSED_HEAD_NORM_SOURCE, *head[3:])
        elif family in HEAD_NORM_FAMILIES:
            head = (*HEAD_NORM_SOURCE, *head[2:])
        if family in REVERSED_DROPOUT_FAMILIES:
            head = (*head[:-1], head[-1].replace(DROPOUT_SOURCE, REVERSED_DROPOUT_SOURCE))
        if family in NOPE_FAMILIES:
            at = head.index("cos, sin = position_embeddings")
            head = (*head[:at], NOPE_SOURCE, *head[at:])
        argument = ROTARY_ATTENTION_ARGUMENTS.get(family, ("",))[0]
        return (*head[:-1], f"{head[-1]} {argument} {tail[0]}".replace("  ", " "), *tail[1:])
    if kind == "joint_rotary_attention":
        return JOINT_ROTARY_ATTENTION_SOURCE
    if kind == "bias_gelu":
        return BIAS_GELU_SOURCE
    if kind == "encoder_layer":
        return DISTILBERT_LAYER_SOURCE if _distilbert(cls) else ENCODER_LAYER_SOURCE
    if kind == "encoder_stack":
        return DISTILBERT_STACK_SOURCE if _distilbert(cls) else ENCODER_STACK_SOURCE
    if kind == "embeddings":
        return EMBEDDINGS_SOURCE
    if kind in RELATIVE_BIAS_KINDS:
        return RELATIVE_BIAS_KINDS[kind]
    if kind in ("residual_rms_norm", "sandwich_rms_norm"):
        head, tail = RESIDUAL_RMS_NORM_SOURCE
        tail = tail if kind == "residual_rms_norm" else SANDWICH_RMS_NORM_TAIL
        if _family(cls) in SCALED_RESIDUAL_FAMILIES:
            tail = tuple(SCALED_RESIDUAL_ADD_SOURCE if line == RESIDUAL_ADD_SOURCE else line
                         for line in tail)
        return (*head, *(f"{name}={name}," for name in _decoder_parameters(cls)), *tail)
    return tuple(f"self.{name}(" for name in names)


def _normalized_source(function):
    """function's source with comments dropped and every run of white space one space ('' when
    there is no source)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return ""
    return " ".join(re.sub(r"#[^\n]*", "", source).split())


def _reads_as(function, lines):
    """The lines (normalized likewise) occur in function's source in this order."""
    source, position = _normalized_source(function), 0
    for line in lines:
        position = source.find(line, position)
        if position < 0:
            return False
    return True


def _hub_function(obj):
    """obj, or the function in it where Hugging Face's `kernels` package (which transformers >= 5.25
    installs) made a module of it (use_kernel_forward_from_hub): that module's forward calls the
    function, unless kernels.kernelize() gave a model a hub kernel of the same math instead."""
    if isinstance(obj, torch.nn.Module):
        return inspect.getclosurevars(type(obj).forward).nonlocals.get("func", obj)
    return obj


@functools.lru_cache(maxsize=None)
def _forward_reads_as(cls, kind, names):
    if kind in ("rotary_attention", "joint_rotary_attention"):  # the rotate-half embedding
        family_module = sys.modules[cls.__module__]
        if not (_reads_as(_hub_function(getattr(family_module, "apply_rotary_pos_emb", None)),
                          ROTATE_HALF_SOURCE if kind == "rotary_attention"
                          else UPCAST_ROTATE_HALF_SOURCE)
                and _reads_as(getattr(family_module, "rotate_half", None),
                              ROTATE_HALF_HELPER_SOURCE)):
            return False
    if kind == "encoder_layer" and not _distilbert(cls) and not _reads_as(
            getattr(cls, "feed_forward_chunk", None), FEED_FORWARD_SOURCE):
        return False
    if kind == "seq2seq_decoder_layer":  # (and its attention's: _patch_seq2seq_decoder_layer)
        return (_reads_as(cls.forward, SEQ2SEQ_POST_NORM_SOURCE)
                or _reads_as(cls.forward, SEQ2SEQ_PRE_NORM_SOURCE))
    if kind == "relative_bias_stack" and not _reads_as(
            getattr(cls, "compute_position_bias", None), POSITION_BIAS_SOURCE):
        return False
    return _reads_as(cls.forward, _expected_source(kind, names, cls))


# ------------------------------------------------------------------------------------------------
# projections
# ------------------------------------------------------------------------------------------------

def _plain_linear(module):
    """An nn.Linear computing F.linear: that class, unhooked, running the class's forward or one
    of the linear forwards of the rules."""
    return type(module) is nn.Linear and not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or _own_forward(module))


def _rule_forward(module):
    """The function of the forward installed on the instance (a rule's), or None."""
    return getattr(module.__dict__.get("forward"), "__func__", None)


def _own_forward(module):
    """Whether the instance has a forward of its own that is not a rule's linear forward."""
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "__func__", None) not in (
        _linear_forward, _projection_forward)


def _rows_of_one_storage(tensors):
    """[sum of rows, cols]: the tensors as one matrix when they are consecutive row blocks of
    one storage (same dtype, device, columns), else None."""
    first = tensors[0]
    offset, rows, row_size = first.storage_offset(), 0, math.prod(first.shape[1:])
    for t in tensors:
        if (t.dtype != first.dtype or t.device != first.device or not t.is_contiguous()
                or t.shape[1:] != first.shape[1:]
                or t.storage_offset() != offset + rows * row_size
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        rows += t.shape[0]
    return first.as_strided((rows,) + tuple(first.shape[1:]), first.stride(), offset)


def _share_storage(tensors):
    """Move the tensors' values into one storage, each a view of its rows (in place: .data).
    Inference tensors (a model built under torch.inference_mode) get inference tensors: a normal
    tensor's storage swapped into one leaves a tensor without a version counter, which F.linear
    refuses."""
    inference = any(t.is_inference() for t in tensors)
    with torch.inference_mode() if inference else torch.no_grad():
        joined = torch.cat([t.detach() for t in tensors])
        for t, part in zip(tensors, joined.split([t.shape[0] for t in tensors])):
            t.data = part


def _version(x):
    """x's in-place modification counter (inference tensors have none: 0)."""
    return 0 if x.is_inference() else x._version


class _Projection:
    """The siblings' joint GEMM, and per thread its last output until each sibling took its
    part."""

    def __init__(self, parent, names):
        self.parent, self.names = parent, names
        self.linears = [getattr(parent, name) for name in names]
        self.local = threading.local()

    def __getstate__(self):  # deep copies and pickles start with no output kept
        return {k: v for k, v in self.__dict__.items() if k != "local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.local = threading.local()

    def intact(self):
        """The siblings are the layers fused at patch time, untouched since, all of one kind
        (float, or int8 of one mode and backend), with biases all or none."""
        current = [self.parent._modules.get(name) for name in self.names]
        if any(a is not b for a, b in zip(current, self.linears)):
            return False
        kinds = {_sibling_kind(m) for m in current}
        return None not in kinds and len(kinds) == 1 and len(
            {m.bias is None for m in current}) == 1

    def joined(self, attribute):
        tensors = [getattr(m, attribute) for m in self.linears]
        if tensors[0] is None:
            return None
        matrix = _rows_of_one_storage(tensors)
        if matrix is None:  # e.g. after .to() or load_state_dict(assign=True): share again
            _share_storage(tensors)
            matrix = _rows_of_one_storage(tensors)
        return matrix

    def part(self, index, x):
        """Columns of sibling `index` of x @ W_joined^T + b_joined."""
        state = self.local
        cached = getattr(state, "entry", None)
        if cached is None or cached[0] is not x or cached[1] != _version(x) or index in cached[3]:
            first = self.linears[0]
            if type(first) is Int8Linear:  # one quantization of x (w8a8), one GEMM
                output = ops.int8_linear(x, self.joined("weight"), self.joined("weight_scale"),
                                         self.joined("bias"), first.mode, backend=first.backend)
            else:
                output = _linear(x, self.joined("weight"), self.joined("bias"),
                                 self.parent.__dict__.get(BACKEND_ATTR))
            cached = (x, _version(x), output, set())
        cached[3].add(index)
        state.entry = None if len(cached[3]) == len(self.linears) else cached
        start = sum(m.out_features for m in self.linears[:index])
        return cached[2][..., start:start + self.linears[index].out_features]


def _linear(x, weight, bias, backend):
    """F.linear(x, weight, bias); for CPU tensors of one dtype (no autocast) through
    transfuse.ops.linear (its own GEMV and GEMMs)."""
    if (x.device.type == "cpu" and weight.device == x.device and weight.dtype == x.dtype
            and (bias is None or bias.dtype == x.dtype) and not torch.is_autocast_enabled("cpu")):
        return ops.linear(x, weight, bias, backend=backend)
    return F.linear(x, weight, bias)


def _dense(module, x, backend):
    """module(x): for a plain nn.Linear, _linear."""
    if _plain_linear(module):
        return _linear(x, module.weight, module.bias, backend)
    return module(x)


def _sibling_kind(module):
    """"float" for a plain nn.Linear, (mode, backend) for a transfuse Int8Linear as built
    (unhooked), else None: siblings of one kind can run as one GEMM."""
    if _plain_linear(module):
        return "float"
    if type(module) is Int8Linear and not (
            module._forward_hooks or module._forward_pre_hooks or _own_forward(module)):
        return module.mode, module.backend
    return None


def _projection_forward(self, x):
    projection, index = self.__dict__[PROJECTION_ATTR]
    int8 = type(self) is Int8Linear
    own = Int8Linear.forward if int8 else nn.Linear.forward
    if x.device.type not in (JOINED_INT8_DEVICES if int8 else JOINED_GEMM_DEVICES):
        return own(self, x) if int8 else _linear(
            x, self.weight, self.bias, projection.parent.__dict__.get(BACKEND_ATTR))
    if torch.compiler.is_compiling():  # the joint GEMM keeps per-thread state: not traced
        return own(self, x)
    records = torch.is_grad_enabled() and (x.requires_grad or any(
        p.requires_grad for m in projection.linears for p in m.parameters()))
    if records or not projection.intact():
        return own(self, x)
    return projection.part(index, x)


def _patch_projections(module, names):
    linears = [getattr(module, name, None) for name in names]
    if not all(isinstance(m, nn.Module) and "forward" not in m.__dict__ for m in linears):
        return False  # (not the linear rule's either: one forward per module)
    kinds = {_sibling_kind(m) for m in linears}
    if None in kinds or len(kinds) != 1 or len(
            {(m.in_features, m.bias is None, m.weight.dtype, m.weight.device)
             for m in linears}) != 1:
        return False
    projection = _Projection(module, names)
    for attribute in ("weight", "weight_scale", "bias"):
        if getattr(linears[0], attribute, None) is not None:
            _share_storage([getattr(m, attribute) for m in linears])
    for index, linear in enumerate(linears):
        linear.__dict__[PROJECTION_ATTR] = (projection, index)
        _install(linear, _projection_forward)
    return True


# ------------------------------------------------------------------------------------------------
# linear
# ------------------------------------------------------------------------------------------------

def _linear_forward(self, x):
    return _linear(x, self.weight, self.bias, self.__dict__.get(BACKEND_ATTR))


def _patch_linear(module, names):
    return _plain_linear(module) and _install(module, _linear_forward)


# ------------------------------------------------------------------------------------------------
# residual_norm
# ------------------------------------------------------------------------------------------------

def _residual_norm_forward(self, hidden_states, input_tensor):
    if not isinstance(self.LayerNorm, FusedLayerNorm):  # norm=False, or swapped since
        return type(self).forward(self, hidden_states, input_tensor)
    backend = self.__dict__.get(BACKEND_ATTR)
    hidden_states = self.dropout(_dense(self.dense, hidden_states, backend))
    if hidden_states.dtype != input_tensor.dtype:  # autocast: the sum promotes, as the class's
        return self.LayerNorm(hidden_states + input_tensor)
    return self.LayerNorm(hidden_states, residual=input_tensor)[0]


def _patch_residual_norm(module, names):
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names) and _install(
        module, _residual_norm_forward)


# ------------------------------------------------------------------------------------------------
# residual_rms_norm
# ------------------------------------------------------------------------------------------------

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


def _residual_rms_norm_forward(self, hidden_states, *args, **kwargs):
    call = _decoder_call(self, self.post_attention_layernorm, args, kwargs)
    if call is None:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    fused = _decoder_layer_fused(self, hidden_states, call)
    if fused is not None:
        return fused
    multiplier = _residual_multiplier(self)
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **call)
    normed, residual = _add_and_norm(self.post_attention_layernorm,
                                     _scaled(attended, multiplier), hidden_states)
    return residual + _scaled(self.mlp(normed), multiplier)


def _sandwich_rms_norm_forward(self, hidden_states, *args, **kwargs):
    call = _decoder_call(self, self.pre_feedforward_layernorm, args, kwargs)
    if call is None:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    fused = _decoder_layer_fused(self, hidden_states, call)
    if fused is not None:
        return fused
    attended, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **call)
    normed, residual = _add_and_norm(self.pre_feedforward_layernorm,
                                     self.post_attention_layernorm(attended), hidden_states)
    return residual + self.post_feedforward_layernorm(self.mlp(normed))


# The decoder layer in two transfuse._C calls around its cache's update (decoder_layer.cpp), on
# CPU tensors in inference where every module runs what the calls run.
# The keyword arguments a layer's attention passes on (to the attention function, which ignores
# them, and to a 5.24 cache's update): what transformers' decoder stacks pass.
DECODER_IDLE_KWARGS = frozenset(("position_ids", "use_cache", "cache_position"))
PLAIN_TENSORS = (torch.Tensor, nn.Parameter)  # (not a subclass such as tensor parallel's DTensor)


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


# ------------------------------------------------------------------------------------------------
# seq2seq_decoder_layer
# ------------------------------------------------------------------------------------------------

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


def _linear_call_arguments(linears, x, chosen):
    """(weights, weight_scales, biases, torch_linears, int8_mode) of a fused call for `linears`
    on x where each computes what the call's Linears do: all nn.Linear of x's dtype under the
    linear or projections rule's forward or none (torch_linears: the calls transfuse.ops.linear
    leaves to torch, and those of the class's own F.linear), or all unhooked Int8Linear of one
    mode (alone or as projections); plain tensors, their biases (or None) of x's dtype. Adds the
    backends the rules chose to `chosen`. Else None."""
    int8 = type(linears[0]) is Int8Linear
    if x.device.type in (JOINED_INT8_DEVICES if int8 else JOINED_GEMM_DEVICES):
        return None  # (sibling projections would run as one GEMM there)
    mode = linears[0].mode if int8 else ""
    weights, weight_scales, biases, torch_linears = [], [], [], []
    for m in linears:
        forward = _rule_forward(m)
        if type(m) is Int8Linear and int8 and m.mode == mode and not _own_hooks(m) and (
                forward in (None, _projection_forward)):
            weights.append(m._buffers["weight"])
            weight_scales.append(m._buffers["weight_scale"])
            chosen.add(m.backend)
        elif type(m) is nn.Linear and not int8 and not _own_hooks(m) and (
                forward in (None, _linear_forward, _projection_forward)):
            weight = m._parameters["weight"]
            if weight.dtype != x.dtype:
                return None
            weights.append(weight)
            # the class's forward is F.linear; the rules' go through transfuse.ops.linear
            torch_linears.append(forward is None or not _own_kernel_takes(x, weight))
            if forward is not None:  # (a projection's: its parent's backend)
                holder = (m.__dict__[PROJECTION_ATTR][0].parent
                          if forward is _projection_forward else m)
                chosen.add(holder.__dict__.get(BACKEND_ATTR))
        else:
            return None
        bias = m._parameters.get("bias")
        if type(weights[-1]) not in PLAIN_TENSORS or bias is not None and (
                type(bias) not in PLAIN_TENSORS or bias.dtype != x.dtype):
            return None  # (a sharded DTensor's: the modules)
        biases.append(bias)
    return weights, weight_scales, biases, torch_linears, mode


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


# ------------------------------------------------------------------------------------------------
# rotary_attention
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# gated_mlp
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# bias_gelu
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# encoder_layer
# ------------------------------------------------------------------------------------------------

# The varlen kwargs that padding removal passes each layer (hf/unpad.py), and what else the
# transfuse attention function takes and ignores there (BertModel passes position_ids down).
PACKED_KWARGS = frozenset(("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"))
FUSED_LAYER_KWARGS = PACKED_KWARGS | {"position_ids"}


def _own_hooks(module):
    """The module's own hooks (nn.Module.__call__ would run them around its forward), but for
    transformers' output-capturing hooks while nothing is being recorded: one call with
    output_hidden_states or output_attentions leaves them on the layers for good, and they return
    at once unless a forward records (_capturing_hook)."""
    if module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks:
        return True
    hooks = module._forward_hooks
    return bool(hooks) and (torch.compiler.is_compiling()  # (which cannot read the recording)
                            or not all(map(_capturing_hook, hooks.values()))
                            or _outputs_recorded())


def _capturing_hook(hook):
    """Whether the hook is transformers' output-capturing one (utils/output_capturing.py, its
    install_output_capuring_hook: it returns at once unless its model's forward records)."""
    return (getattr(hook, "__module__", None) == "transformers.utils.output_capturing"
            and getattr(hook, "__qualname__", "").endswith(".output_capturing_hook"))


def _global_hooks():
    return (_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
            or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks)


def _fused_layer_arguments(layer, inner, x):
    """transfuse._C.encoder_layer's arguments after x, cu_seqlens and max_seqlen for the BERT-style
    `layer` (inner: its self-attention) where its modules run what the call runs on x (the rules'
    forwards through transfuse.ops.linear or int8_linear, biases and affine norms of x's dtype,
    every backend the cpu one), else None (_layer_call_arguments). (Registries read directly,
    loops without generators: these checks run for every layer of every call. The configured
    attention implementation (a config's attributes cost microseconds) and global hooks: checked
    by the callers.)"""
    children = layer._modules
    rules = (children["attention"]._modules.get("output"), children.get("intermediate"),
             children.get("output"))
    for m in rules:
        if m is None or not m.__dict__.get(FORWARD_ATTR) or _own_hooks(m):
            return None
    linears = [inner._modules.get(name) for name in ("query", "key", "value")]
    linears += [m._modules.get("dense") for m in rules]
    # q, k and v without a rule's forward would be torch's F.linear; the dense layers' rules
    # call them
    return _layer_call_arguments(
        inner, inner.num_attention_heads, inner.scaling, x, linears,
        (rules[0]._modules.get("LayerNorm"), rules[2]._modules.get("LayerNorm")),
        (rules[0]._modules.get("dropout"), rules[2]._modules.get("dropout")),
        rules[1]._modules.get("intermediate_act_fn"), rules,
        ((_linear_forward, _projection_forward),) * 3 + ((None, _linear_forward,
                                                          _projection_forward),) * 3)


def _distilbert_layer_arguments(layer, inner, x):
    """As _fused_layer_arguments, for DistilBERT's block (inner: its self-attention): its six
    nn.Linear layers each with the linear rule's forward (or transfuse Int8Linear layers)."""
    children = layer._modules
    ffn = children["ffn"]._modules
    linears = [inner._modules.get(name) for name in ("q_lin", "k_lin", "v_lin", "out_lin")]
    linears += [ffn.get("lin1"), ffn.get("lin2")]
    return _layer_call_arguments(
        inner, inner.n_heads, inner.scaling, x, linears,
        (children.get("sa_layer_norm"), children.get("output_layer_norm")),
        (ffn.get("dropout"),), ffn.get("activation"), (layer,), ((_linear_forward,),) * 6)


def _layer_call_arguments(inner, heads, scale, x, linears, norms, dropouts, activation, holders,
                          forwards):
    """transfuse._C.encoder_layer's arguments after x, cu_seqlens and max_seqlen for a layer of
    self-attention `inner` of `heads` heads scaling its scores by `scale` (not causal, without
    attention dropout), the six
    `linears` (query, key, value, attention output, intermediate, output), the two `norms`
    (FusedLayerNorm), `dropouts` (nn.Dropout, inactive) and `activation` (transformers' exact or
    tanh GELU): heads, scale, weights, weight_scales, biases, torch_linears, int8_mode,
    norm_weights, norm_biases, eps, activation; else None. forwards[i]: the instance forwards
    (the rules', None for the class's) under which float linear i computes what the call does.
    holders: the modules whose rules chose a backend besides the linears and norms. torch_linears:
    the float layers that transfuse.ops.linear leaves to torch's F.linear (and F.gelu) on x."""
    if getattr(inner, "is_causal", False) or (inner.training and inner.dropout.p):
        return None
    approximate = _gelu_approximation(activation)
    if approximate is None:
        return None
    for n in norms:
        if (type(n) is not FusedLayerNorm or _own_hooks(n) or "forward" in n.__dict__
                or n._parameters["weight"] is None or n._parameters["bias"] is None):
            return None
    for d in dropouts:
        if (type(d) is not nn.Dropout or _own_hooks(d) or "forward" in d.__dict__
                or (d.training and d.p != 0)):
            return None
    int8 = type(linears[0]) is Int8Linear
    device, dtype = x.device, x.dtype
    if device.type in (JOINED_INT8_DEVICES if int8 else JOINED_GEMM_DEVICES):
        return None  # (the modules would run Q, K and V as one GEMM)
    mode = linears[0].mode if int8 else ""
    chosen = {norms[0].backend, norms[1].backend, inner.__dict__.get(BACKEND_ATTR)}
    for m in holders:
        chosen.add(m.__dict__.get(BACKEND_ATTR))
    weights, weight_scales, biases, torch_linears = [], [], [], []
    for index, m in enumerate(linears):
        forward = _rule_forward(m)
        if type(m) is Int8Linear and int8 and m.mode == mode and not _own_hooks(m) and (
                forward in (None, _projection_forward)):
            weight = m._buffers["weight"]
            weight_scales.append(m._buffers["weight_scale"])
            chosen.add(m.backend)
        elif (type(m) is nn.Linear and not int8 and not _own_hooks(m)
              and forward in forwards[index]):
            weight = m._parameters["weight"]
            if weight.dtype != dtype:
                return None
            torch_linears.append(not _own_kernel_takes(x, weight))
            chosen.add(m.__dict__.get(BACKEND_ATTR))
        else:
            return None
        bias = m._parameters.get("bias")
        if bias is None or bias.dtype != dtype:
            return None
        weights.append(weight)
        biases.append(bias)
    for backend in chosen:
        for op in (("int8", "activation") if int8 else ("linear",)) + ("norm", "attention"):
            if backends.resolve(op, backend, device) != "cpu":
                return None
    return (heads, float(scale), weights, weight_scales, biases, torch_linears, mode,
            [n._parameters["weight"] for n in norms],
            [n._parameters["bias"] for n in norms], [float(n.eps) for n in norms],
            "gelu" if approximate == "none" else "gelu_tanh")


def _fused_call(x, attention_mask, kwargs):
    """(cu_seqlens, max_seqlen) for transfuse._C.encoder_layer when this call of a layer (or of
    the stack) can run fused: CPU inference (no autograd, autocast or compile), packed tokens or
    an unmasked batch, no other kwargs than FUSED_LAYER_KWARGS, no attention weights asked for;
    else None."""
    if (x.device.type != "cpu" or x.dim() != 3 or torch.is_grad_enabled()
            or attention_mask is not None or not kwargs.keys() <= FUSED_LAYER_KWARGS
            or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
            or _weights_requested(kwargs)):
        return None
    cu_seqlens, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    packed = kwargs.keys() & PACKED_KWARGS
    if packed and not (
            len(packed) == 4 and kwargs["cu_seq_lens_k"] is cu_seqlens and x.shape[0] == 1
            and kwargs["max_length_k"] == longest and cu_seqlens.dtype == torch.int32):
        return None
    return cu_seqlens, int(longest or 0)


def _self_attention(layer):
    """The layer's self-attention module when its containers run what the rule reads (the
    classes it was patched with, no cross-attention, chunking, hooks or own forwards), else
    None. (Global hooks: checked by the caller.)"""
    attention_class, self_attention_class = layer.__dict__[FACTS_ATTR]
    attention = layer._modules.get("attention")
    inner = attention._modules.get("self") if type(attention) is attention_class else None
    if (type(inner) is not self_attention_class or layer.chunk_size_feed_forward
            or attention.is_cross_attention or _own_hooks(attention) or _own_hooks(inner)
            or "forward" in attention.__dict__ or "forward" in inner.__dict__):
        return None
    return inner


def _encoder_layer_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                           *args, **kwargs):
    inner = _self_attention(self)
    if (inner is None or args or encoder_hidden_states is not None
            or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
            or _global_hooks() or torch._C._get_tracing_state()):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  *args, **kwargs)
    for name in ("encoder_attention_mask", "cache", "past_key_values"):  # (None) not passed on
        kwargs.pop(name, None)
    call = _fused_call(hidden_states, attention_mask, kwargs)
    module = None if call is None else backends.extension()[0]
    arguments = None
    if module is not None and inner.config._attn_implementation == ATTENTION_NAME:
        arguments = _fused_layer_arguments(self, inner, hidden_states)
    out = None if arguments is None else module.encoder_layer(hidden_states, *call, *arguments)
    if out is not None:  # (None: a kernel declined the call)
        return out
    family_module = sys.modules[type(inner).__module__]
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, inner.attention_head_size)
    query = inner.query(hidden_states).view(*hidden_shape).transpose(1, 2)
    key = inner.key(hidden_states).view(*hidden_shape).transpose(1, 2)
    value = inner.value(hidden_states).view(*hidden_shape).transpose(1, 2)
    attention_function = family_module.ALL_ATTENTION_FUNCTIONS.get_interface(
        inner.config._attn_implementation, family_module.eager_attention_forward)
    output, _ = attention_function(
        inner, query, key, value, attention_mask,
        dropout=0.0 if not inner.training else inner.dropout.p, scaling=inner.scaling,
        encoder_hidden_states=None, **kwargs)  # (the container passes it on to the function)
    attention = self._modules["attention"]
    attention_output = attention.output(output.reshape(*input_shape, -1).contiguous(),
                                        hidden_states)
    return self.output(self.intermediate(attention_output), attention_output)


def _distilbert_attention(layer):
    """DistilBERT's block's self-attention when its modules run what the rule reads (the classes
    it was patched with, no chunking, hooks or own forwards), else None. (Global hooks: checked by
    the caller.)"""
    attention_class, ffn_class = layer.__dict__[FACTS_ATTR]
    inner, ffn = layer._modules.get("attention"), layer._modules.get("ffn")
    if (type(inner) is not attention_class or type(ffn) is not ffn_class
            or ffn.chunk_size_feed_forward or _own_hooks(inner) or _own_hooks(ffn)
            or "forward" in inner.__dict__ or "forward" in ffn.__dict__):
        return None
    return inner


def _distilbert_layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    """DistilBERT's block in one transfuse._C.encoder_layer call where it fits (as BERT's layer:
    _fused_call, _distilbert_layer_arguments), else the class's forward."""
    inner = _distilbert_attention(self)
    if inner is not None and not (_global_hooks() or torch._C._get_tracing_state()):
        call = _fused_call(hidden_states, attention_mask, kwargs)
        module = None if call is None else backends.extension()[0]
        if module is not None and inner.config._attn_implementation == ATTENTION_NAME:
            arguments = _distilbert_layer_arguments(self, inner, hidden_states)
            out = None if arguments is None else module.encoder_layer(hidden_states, *call,
                                                                      *arguments)
            if out is not None:  # (None: a kernel declined the call)
                return out
    return type(self).forward(self, hidden_states, attention_mask, **kwargs)


# kwargs a BERT-style stack takes and passes on that are harmless as None (use_cache: its output
# holds the cache when asked, and none is given)
STACK_NONE_KWARGS = ("encoder_attention_mask", "cache", "past_key_values")


def _encoder_stack_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                           *args, **kwargs):
    """Every layer fused (_stack_fused); else the class's forward (each layer deciding for
    itself)."""
    out = None
    if not (args or encoder_hidden_states is not None):
        out = _stack_fused(self, hidden_states, attention_mask, kwargs)
    if out is None:
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states,
                                  *args, **kwargs)
    return out


def _distilbert_stack_forward(self, hidden_states, attention_mask=None, **kwargs):
    """DistilBERT's stack: as _encoder_stack_forward."""
    out = _stack_fused(self, hidden_states, attention_mask, kwargs)
    if out is None:
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    return out


def _stack_fused(self, hidden_states, attention_mask, kwargs):
    """The stack's output where every layer would run fused (_layers_fused), else None."""
    rest = {name: value for name, value in kwargs.items()
            if name != "use_cache" and not (name in STACK_NONE_KWARGS and value is None)}
    out = _layers_fused(self._modules.get("layer"), hidden_states, attention_mask, rest)
    return None if out is None else self.__dict__[FACTS_ATTR](last_hidden_state=out)


def _layers_fused(layers, x, attention_mask, kwargs, bias=None):
    """x through the ModuleList `layers` where every layer would run fused (_fused_call,
    _fused_layers): their transfuse._C.encoder_layer calls one after another (each adding the
    attention `bias`, MPNet's), without the module calls between them; else None."""
    if type(layers) is not nn.ModuleList or _global_hooks() or torch._C._get_tracing_state():
        return None
    call = _fused_call(x, attention_mask, kwargs)
    module = None if call is None else backends.extension()[0]
    fused = None if module is None else _fused_layers(layers, x)
    if fused is None:
        return None
    for arguments in fused:
        x = module.encoder_layer(x, *call, *arguments, bias)
        if x is None:  # a kernel declined the call: the caller runs the layers from the start
            return None
    return x


def _fused_layers(layers, x):
    """For each layer (its encoder_layer rule installed, no hooks of its own, fitting on x):
    transfuse._C.encoder_layer's arguments after x, cu_seqlens and max_seqlen; else None."""
    fused, config = [], None  # config: the last one seen to name the transfuse attention
    for layer in layers._modules.values():
        forward = _rule_forward(layer)
        if forward is _encoder_layer_forward:
            attention, layer_arguments = _self_attention, _fused_layer_arguments
        elif forward is _distilbert_layer_forward:
            attention, layer_arguments = _distilbert_attention, _distilbert_layer_arguments
        elif forward is _relative_bias_layer_forward:  # (its attention is the rule's own)
            arguments = None if _own_hooks(layer) else _relative_bias_layer_arguments(layer, x)
            if arguments is None:
                return None
            fused.append(arguments)
            continue
        else:
            return None
        inner = None if _own_hooks(layer) else attention(layer)
        if inner is None:
            return None
        if inner.config is not config:
            if inner.config._attn_implementation != ATTENTION_NAME:
                return None
            config = inner.config
        arguments = layer_arguments(layer, inner, x)
        if arguments is None:
            return None
        fused.append(arguments)
    return fused


def _patch_encoder_stack(module, names):
    """Where the family's module names the output class the forward returns."""
    distilbert = _distilbert(type(module))
    output_class = getattr(sys.modules[type(module).__module__],
                           "BaseModelOutput" if distilbert else STACK_OUTPUT_CLASS, None)
    if output_class is None or not isinstance(module._modules.get("layer"), nn.ModuleList):
        return False
    module.__dict__[FACTS_ATTR] = output_class
    return _install(module, _distilbert_stack_forward if distilbert else _encoder_stack_forward)


# ------------------------------------------------------------------------------------------------
# relative_bias (MPNet)
# ------------------------------------------------------------------------------------------------

# MPNet's encoder adds a relative position bias (per head, by the bucket of j - i) to every
# layer's attention scores: it computes a [B, heads, S, S] tensor once per call, and its
# self-attention computes softmax(q k^T / sqrt(d) + bias + mask) v in eager torch, outside
# transformers' attention interface, under containers that pass no kwargs down. The four rules
# below (self-attention, its container, layer, stack) run that through transfuse's attention, pass
# padding removal's kwargs down, and compute the bias once for one row of the longest sequence
# ([1, heads, L, L], broadcast over the batch; packed sequences read it at their own positions,
# the bias being the same for every start).
RELATIVE_BIAS_ATTENTION_SOURCE = (
    "input_shape = hidden_states.shape[:-1]",
    "hidden_shape = (*input_shape, -1, self.attention_head_size)",
    "q = self.q(hidden_states).view(hidden_shape).transpose(1, 2)",
    "k = self.k(hidden_states).view(hidden_shape).transpose(1, 2)",
    "v = self.v(hidden_states).view(hidden_shape).transpose(1, 2)",
    "attention_scores = torch.matmul(q, k.transpose(-1, -2))",
    "attention_scores = attention_scores / math.sqrt(self.attention_head_size)",
    "if position_bias is not None: attention_scores += position_bias",
    "if attention_mask is not None: attention_scores = attention_scores + attention_mask",
    "attention_probs = nn.functional.softmax(attention_scores, dim=-1)",
    "attention_probs = self.dropout(attention_probs)", "c = torch.matmul(attention_probs, v)",
    "o = self.o(c)", "outputs = (o, attention_probs) if output_attentions else (o,)",
    "return outputs")
RELATIVE_BIAS_CONTAINER_SOURCE = (
    "self_outputs = self.attn( hidden_states, attention_mask, position_bias, "
    "output_attentions=output_attentions, )",
    "attention_output = self.LayerNorm(self.dropout(self_outputs[0]) + hidden_states)",
    "outputs = (attention_output,) + self_outputs[1:]", "return outputs")
RELATIVE_BIAS_LAYER_SOURCE = (
    "self_attention_outputs = self.attention( hidden_states, attention_mask, "
    "position_bias=position_bias, output_attentions=output_attentions, )",
    "attention_output = self_attention_outputs[0]", "outputs = self_attention_outputs[1:]",
    *FEED_FORWARD_SOURCE[:2], "outputs = (layer_output,) + outputs", "return outputs")
RELATIVE_BIAS_STACK_SOURCE = (
    "position_bias = self.compute_position_bias(hidden_states)",
    "for i, layer_module in enumerate(self.layer):",
    "layer_outputs = layer_module( hidden_states, attention_mask, position_bias, "
    "output_attentions=output_attentions, **kwargs, )", "hidden_states = layer_outputs[0]",
    "return BaseModelOutput( last_hidden_state=hidden_states,")
# compute_position_bias(x): from x only its batch size, length and device
POSITION_BIAS_SOURCE = ("bsz, qlen, klen = x.size(0), x.size(1), x.size(1)",
                        "relative_position = memory_position - context_position",
                        "values = values.expand((bsz, -1, qlen, klen)).contiguous()",
                        "return values")
RELATIVE_BIAS_KINDS = {"relative_bias_attention": RELATIVE_BIAS_ATTENTION_SOURCE,
                       "relative_bias_container": RELATIVE_BIAS_CONTAINER_SOURCE,
                       "relative_bias_layer": RELATIVE_BIAS_LAYER_SOURCE,
                       "relative_bias_stack": RELATIVE_BIAS_STACK_SOURCE}


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


# ------------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------------

def _plain_embedding(module, dtype):
    """An nn.Embedding of that class, unhooked, running the class's forward (a lookup: no max_norm
    renormalizing the table in place) on a table of `dtype`."""
    return (type(module) is nn.Embedding and not _own_hooks(module)
            and "forward" not in module.__dict__ and module.max_norm is None
            and module._parameters["weight"].dtype == dtype)


def _fused_embeddings_arguments(embeddings, input_ids):
    """transfuse._C.embeddings_forward's tables and norm for `embeddings` on CPU ids in
    inference (no autograd, autocast or compile), where its modules compute what the call does
    (tables of a dtype the norm kernels take), else None."""
    children = embeddings._modules
    word, norm, dropout = (children.get("word_embeddings"), children.get("LayerNorm"),
                           children.get("dropout"))
    if (input_ids.device.type != "cpu" or torch.is_grad_enabled() or _global_hooks()
            or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
            or torch._C._get_tracing_state() or type(word) is not nn.Embedding):
        return None
    dtype = word._parameters["weight"].dtype
    if dtype not in NORM_DTYPES:
        return None
    tables = (word, children.get("token_type_embeddings"), children.get("position_embeddings"))
    for table in tables:
        if not _plain_embedding(table, dtype):
            return None
    if (type(norm) is not FusedLayerNorm or _own_hooks(norm) or "forward" in norm.__dict__
            or norm._parameters["weight"] is None or norm._parameters["bias"] is None
            or backends.resolve("norm", norm.backend, input_ids.device) != "cpu"
            or type(dropout) is not nn.Dropout or _own_hooks(dropout)
            or "forward" in dropout.__dict__ or (dropout.training and dropout.p != 0)):
        return None
    return (*(t._parameters["weight"] for t in tables), norm._parameters["weight"],
            norm._parameters["bias"], float(norm.eps))


def _embeddings_forward(self, input_ids=None, token_type_ids=None, position_ids=None,
                        inputs_embeds=None, *args, **kwargs):
    module = None
    if (input_ids is not None and token_type_ids is not None and inputs_embeds is None
            and not args and len(kwargs) <= 1 and kwargs.keys() <= CACHE_LENGTH_NAMES
            and input_ids.dim() == 2
            and (position_ids is not None or "position_ids" in self._buffers)):
        arguments = _fused_embeddings_arguments(self, input_ids)
        module = None if arguments is None else backends.extension()[0]
    if module is None:
        return type(self).forward(self, input_ids, token_type_ids, position_ids, inputs_embeds,
                                  *args, **kwargs)
    if position_ids is None:  # as the class's forward: the positions after the cache's
        start = next(iter(kwargs.values()), 0)
        position_ids = self._buffers["position_ids"][:, start:start + input_ids.shape[1]]
    return module.embeddings_forward(input_ids, token_type_ids, position_ids, *arguments)


def _patch_embeddings(module, names):
    return _install(module, _embeddings_forward)


def _patch_encoder_layer(module, names):
    """Where the layer's attention container and self-attention read as the rule expects."""
    if _distilbert(type(module)):
        return _patch_distilbert_layer(module)
    attention = getattr(module, "attention", None)
    inner = getattr(attention, "self", None)
    if not (isinstance(attention, nn.Module) and isinstance(inner, nn.Module)
            and all(isinstance(getattr(module, name, None), nn.Module) for name in names)
            and _reads_as(type(attention).forward, ATTENTION_CONTAINER_SOURCE)
            and _reads_as(type(inner).forward, SELF_ATTENTION_SOURCE)):
        return False
    module.__dict__[FACTS_ATTR] = (type(attention), type(inner))
    return _install(module, _encoder_layer_forward)


def _patch_distilbert_layer(module):
    """Where its self-attention and feed-forward read as the rule expects."""
    attention, ffn = getattr(module, "attention", None), getattr(module, "ffn", None)
    if not (isinstance(attention, nn.Module) and isinstance(ffn, nn.Module)
            and _reads_as(type(attention).forward, DISTILBERT_ATTENTION_SOURCE)
            and _reads_as(type(ffn).forward, DISTILBERT_FFN_SOURCE)
            and _reads_as(getattr(type(ffn), "ff_chunk", None), DISTILBERT_FFN_CHUNK_SOURCE)):
        return False
    module.__dict__[FACTS_ATTR] = (type(attention), type(ffn))
    return _install(module, _distilbert_layer_forward)


_PATCHERS = {"projections": _patch_projections, "linear": _patch_linear,
             "residual_norm": _patch_residual_norm,
             "residual_rms_norm": _patch_residual_rms_norm, "bias_gelu": _patch_bias_gelu,
             "sandwich_rms_norm": _patch_sandwich_rms_norm,
             "rotary_attention": _patch_rotary_attention, "gated_mlp": _patch_gated_mlp,
             "joint_rotary_attention": _patch_joint_rotary_attention,
             "joint_gated_mlp": _patch_joint_gated_mlp,
             "encoder_layer": _patch_encoder_layer, "encoder_stack": _patch_encoder_stack,
             "embeddings": _patch_embeddings,
             "seq2seq_decoder_layer": _patch_seq2seq_decoder_layer,
             **dict.fromkeys(RELATIVE_BIAS_KINDS, _patch_relative_bias)}


def _install(module, forward):
    module.forward = types.MethodType(forward, module)
    module.__dict__[FORWARD_ATTR] = True
    return True


def patch_blocks(model, backend=None, attention=True):
    """Install the block rules on every module of `model` they fit (the ops they call run on
    `backend`; FORWARD_ATTR names the rule that was installed); returns
    ({qualified name: rule} for what was installed, sorted names of the classes of BLOCK_RULES
    left alone because their forward reads otherwise). Instances whose modules do not fit (int8
    or hooked layers, an overridden forward) stay as they are. attention=False leaves out MPNet's
    rules (RELATIVE_BIAS_KINDS), which run the transfuse attention."""
    done, unexpected = {}, set()
    taken = set()  # ids of the modules a rule of their parent uses (named_modules: parents first)
    for name, module in model.named_modules():
        rule = BLOCK_RULES.get(type(module).__name__)
        if rule is None or (rule[0] == "linear" and id(module) in taken) or (
                type(module).__name__ in DISTILBERT_CLASSES and not _distilbert(type(module))) or (
                rule[0] in RELATIVE_BIAS_KINDS and not attention):
            continue
        kind, names = rule
        if FORWARD_ATTR in module.__dict__:  # patched before
            if backend is not None:
                module.__dict__[BACKEND_ATTR] = backend
        elif not _forward_reads_as(type(module), kind, names):
            unexpected.add(type(module).__name__)
            continue
        elif "forward" not in module.__dict__ and (applied := _PATCHERS[kind](module, names)):
            kind = applied if isinstance(applied, str) else kind
            module.__dict__[FORWARD_ATTR] = kind  # (projections: the siblings' forwards)
            module.__dict__[BACKEND_ATTR] = backend
            done[name] = kind
        else:
            continue
        taken.update(id(getattr(module, n, None)) for n in names)
    return done, sorted(unexpected)


def unpatch_blocks(model):
    """Remove the block forwards; fused projections get storages of their own again."""
    for module in model.modules():
        if module.__dict__.pop(FORWARD_ATTR, None):
            module.__dict__.pop("forward", None)
            module.__dict__.pop(BACKEND_ATTR, None)
            module.__dict__.pop(FACTS_ATTR, None)
            module.__dict__.pop(PACKED_STACK_ATTR, None)
            if module.__dict__.pop(PROJECTION_ATTR, None) is not None:
                for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                    with torch.inference_mode() if t.is_inference() else torch.no_grad():
                        t.data = t.data.clone()  # (an inference tensor's: one too, as above)
