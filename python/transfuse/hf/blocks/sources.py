"""What a class's forward must read for a rule to replace it.

Each rule names the class's forward lines it was written for (_expected_source, matched in order
with comments and line breaks ignored); a class whose forward reads otherwise (another
transformers version) is left alone.
"""
from __future__ import annotations

import functools
import inspect
import re
import sys

import torch

from .table import _DECODERS, _SANDWICH_DECODERS

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


# MPNet's self-attention, its container, layer and stack (relative_bias.py), and the stack's
# computation of the bias
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
