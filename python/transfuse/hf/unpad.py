"""Padding removal for patched transformers models: a padded batch runs as packed tokens.

A padded batch [B, S] with attention_mask [B, S] holds T real tokens; every layer but attention
works token by token, so the model can run on the T tokens alone, [1, T, hidden], with attention
over the packed sequences (transfuse.ops.varlen_attention, reached through the padding-free
kwargs cu_seq_lens_q/k and max_length_q/k that transformers passes down to the attention
function). The result is scattered back to [B, S, hidden]; pad positions of last_hidden_state
hold zeros (as with FlashAttention-2's unpadding in transformers), where the unpatched model gives
values nobody should read (a pad row attends to the real tokens).

Three ways in, by family (UNPAD_RULES, keyed by the base model's or encoder's class name):
  "stack": the model computes its embeddings on the padded batch as usual (so positions,
           token types and their embeddings are exactly the unpatched ones); its encoder stack,
           `stack` attribute, a module called as stack(hidden [B, S, H], attention_mask, **kwargs)
           (or with the hidden states as inputs_embeds=, CLIP's), runs on the packed tokens. The
           base model's forward records the 2D attention mask for it. Norms after the stack (CLIP
           text's final norm) see the zeros at pad positions.
  "model": the whole base model runs on packed input ids / embeddings with the packed
           position_ids of the padded call (the given ones, else the model's own default:
           arange(S) per row, or for POSITIONS_FROM_MASK the real tokens counted, as OPT
           numbers them); its final output is scattered back. For families whose embeddings are
           token-wise and whose positions come from position_ids only (rotary or learned
           absolute).
  "layers": an encoder whose embeddings (and positions: from the padded shape, or numbered from
           the ids) are computed in its own forward, followed by its `stack` attribute, a
           ModuleList of layers each called as layer(hidden [B, S, H], attention_mask, **kwargs)
           (BART-like encoders: BART, mBART, Marian, Pegasus, M2M100 / NLLB, Blenderbot,
           PLBart; T5's and mT5's encoder stacks, whose first block is given the relative
           position bias of the longest sequence, LAYER_FORWARDS). Each layer packs a padded
           input (the first one: the embeddings), runs on the packed tokens and returns them
           packed; norms after the layers run on the packed tokens too, and the encoder's output
           is scattered back.
Only calls that run the "transfuse" attention (it reads the padding-free kwargs) are unpadded
(MPNet's: through its block rules, hf/blocks/relative_bias.py, which compute its relative
position bias for the longest sequence rather than for all T packed tokens).
Packed calls build no attention mask (attention.masks_unread; each attention reads the sequence
boundaries), nor do the calls of a "model" rule that have no padding and the default positions
(each attention takes its module's causality and sliding window: transformers' masks would say
the same, and EmbeddingGemma's bidirectional ones cost a fifth of a short query on a CPU).
A call keeps the padded path when there is nothing to skip (no mask, or no zero in it), when the
mask is not 2D, when a KV cache holds tokens already or is not a DynamicCache (a decoder's
prefill into an empty DynamicCache, of plain or sliding-window layers, runs packed into a cache of
its own; the given one is then filled through its update in the padded [B, heads, S, D] layout
that the decoding steps use), when outputs are being recorded
(output_hidden_states / output_attentions would be packed), when encoder_hidden_states are given
(cross-attention), and under torch.compile (the packed size is data-dependent) unless patched
with unpad="always": then torch.compile breaks the graph where the batch is packed and unpacked
(and cannot take fullgraph=True on padded batches).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import types

import torch

from .attention import NAME as ATTENTION_NAME, masks_unread

FORWARD_ATTR = "_transfuse_unpad_forward"
INNER_ATTR = "_transfuse_unpad_inner"  # a stack's or layer's own forward at patch time (a rule's)
# On a stack whose block rule takes packed tokens whatever the config's attention implementation
# (MPNet's, whose attention is outside transformers' interface): a function of the stack saying
# whether it does now, which padding removal asks instead of reading the config.
PACKED_STACK_ATTR = "_transfuse_packed_stack"

# base model (or encoder) class name -> (way in, attribute of the token-wise stack for "stack" or
# of the layers for "layers", decoder with a KV cache)
UNPAD_RULES = {
    "BertModel": ("stack", "encoder", False),
    "RobertaModel": ("stack", "encoder", False),
    "DistilBertModel": ("stack", "transformer", False),
    "ElectraModel": ("stack", "encoder", False),
    "AlbertModel": ("stack", "encoder", False),
    "MPNetModel": ("stack", "encoder", False),
    # CLIP text: its encoder is causal through the is_causal=True its model passes down
    "CLIPTextModel": ("stack", "encoder", False),
    "ModernBertModel": ("model", None, False),
    "LlamaModel": ("model", None, True),
    "MistralModel": ("model", None, True),
    "Qwen2Model": ("model", None, True),
    "Qwen3Model": ("model", None, True),
    "SmolLM3Model": ("model", None, True),
    "GraniteModel": ("model", None, True),
    "GemmaModel": ("model", None, True),
    "Gemma2Model": ("model", None, True),
    "Gemma3TextModel": ("model", None, True),
    "GPT2Model": ("model", None, True),
    "PhiModel": ("model", None, True),
    "GPTNeoXModel": ("model", None, True),
    "OPTDecoder": ("model", None, True),
    "BartEncoder": ("layers", "layers", False),
    "MBartEncoder": ("layers", "layers", False),
    "MarianEncoder": ("layers", "layers", False),
    "PegasusEncoder": ("layers", "layers", False),
    "M2M100Encoder": ("layers", "layers", False),
    "BlenderbotEncoder": ("layers", "layers", False),
    "BlenderbotSmallEncoder": ("layers", "layers", False),
    "PLBartEncoder": ("layers", "layers", False),
    # T5's stack is its encoder and its decoder; the decoder keeps the padded path
    "T5Stack": ("layers", "block", False),
    "MT5Stack": ("layers", "block", False),
}
# "model" rules whose forward, given no position_ids, numbers the real tokens of each row
# (cumsum(attention_mask) - 1: left padding shifts nothing), not arange(S).
POSITIONS_FROM_MASK = {"OPTDecoder"}

# The 2D padding mask of the running base model call, for its "stack" to read.
_padding_mask = contextvars.ContextVar("transfuse_padding_mask", default=None)
# The Packing of the running "layers" rule's encoder call, for its layers to read.
_layers_packing = contextvars.ContextVar("transfuse_layers_packing", default=None)


def _outputs_recorded():
    """True while transformers records per-layer outputs (output_hidden_states/attentions)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # older transformers: recording requests come through kwargs only
        return False
    return bool(_active_collector.get())


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class):
    """The name the model's forward gives its KV cache ("cache" on newer transformers)."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _fresh_dynamic_cache(cache):
    """True for an empty DynamicCache of plain or sliding-window layers: one that a packed
    prefill can fill (_fill_cache; static, quantized or offloaded caches keep the padded path)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
    return (type(cache) is DynamicCache and not getattr(cache, "offloading", False)
            and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
                    and not layer.is_initialized and not getattr(layer, "record_past", False)
                    for layer in cache.layers))


def _off_under_compile(module):
    """True while torch.compile traces a model patched with unpad=True (not "always")."""
    return torch.compiler.is_compiling() and module.__dict__[FORWARD_ATTR] != "always"


def _padding(attention_mask, kwargs, config):
    """For a call that padding removal can take: the bool [B, S] mask of its real tokens, or
    False when it has none to skip (no mask, or no zero in it); else None."""
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.dim() != 2):
        return None
    if kwargs.get("encoder_hidden_states") is not None or _outputs_recorded():
        return None
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.get(flag, getattr(config, flag, False)):
            return None
    if getattr(config, "is_decoder", False):  # an encoder family run as a decoder (BERT)
        return None
    if attention_mask is None:
        return False
    valid = attention_mask.bool()
    return False if bool(valid.all()) else valid


class Packing:
    """Where the real tokens of a [B, S] batch lie, and the varlen kwargs that describe them."""

    def __init__(self, valid):
        self.shape = tuple(valid.shape)
        self.index = valid.reshape(-1).nonzero().squeeze(1)  # flat positions of real tokens
        lengths = valid.sum(1, dtype=torch.int32)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=valid.device)
        cu[1:] = lengths.cumsum(0)
        longest = int(lengths.max()) if len(lengths) else 0
        self.kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                           max_length_k=longest)

    def packed(self, x):
        """Whether x [1, T, ...] holds this packing's tokens (not a padded [B, S, ...] batch:
        T is below B * S, as some token is padding)."""
        return tuple(x.shape[:2]) == (1, len(self.index))

    def pack(self, x):
        """[B, S, ...] -> [1, T, ...] (the real tokens, in order)."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index).unsqueeze(0)

    def unpack(self, x):
        """[1, T, ...] -> [B, S, ...] with zeros at pad positions (differentiable)."""
        flat = x.new_zeros((self.shape[0] * self.shape[1],) + tuple(x.shape[2:]))
        return flat.index_copy(0, self.index, x[0]).view(self.shape + tuple(x.shape[2:]))


def _replace_last_hidden_state(output, packing):
    output["last_hidden_state"] = packing.unpack(output["last_hidden_state"])
    return output


# The two forwards below become bound methods of the patched modules (types.MethodType, so that a
# deep copy of the model rebinds them to the copies); they call the class's own forward (a
# stack: the block rule's forward it had when patched, where it had one).

def _stack_forward(self, hidden_states=None, attention_mask=None, *args, **kwargs):
    original = self.__dict__.get(INNER_ATTR) or functools.partial(type(self).forward, self)
    if hidden_states is None:  # a stack whose first argument is named inputs_embeds (CLIP's)
        hidden_states = kwargs.pop("inputs_embeds")
    valid = None if _off_under_compile(self) else _padding_mask.get()
    if valid is None or args or tuple(valid.shape) != tuple(hidden_states.shape[:2]):
        return original(hidden_states, attention_mask, *args, **kwargs)
    packing = Packing(valid)
    output = original(packing.pack(hidden_states), None, **kwargs, **packing.kwargs)
    return _replace_last_hidden_state(output, packing)


def _packed_input(hidden_states):
    """(the running "layers" call's Packing, hidden_states packed: as given, or from the padded
    batch), or None outside such a call and for a call of another shape."""
    packing = _layers_packing.get()
    if packing is None:
        return None
    if packing.packed(hidden_states):
        return packing, hidden_states
    if tuple(hidden_states.shape[:2]) == packing.shape:
        return packing, packing.pack(hidden_states)
    return None


def _layer_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
    original = self.__dict__.get(INNER_ATTR) or functools.partial(type(self).forward, self)
    packed = None if _off_under_compile(self) or args else _packed_input(hidden_states)
    if packed is None:
        return original(hidden_states, attention_mask, *args, **kwargs)
    packing, hidden_states = packed
    return original(hidden_states, None, **kwargs, **packing.kwargs)


def _t5_block_forward(self, hidden_states, attention_mask=None, position_bias=None, *args,
                      **kwargs):
    """A T5 encoder block (T5Block, MT5Block): as _layer_forward, and the first block, which
    the stack gives no position bias yet, gets its relative position bias for the longest packed
    sequence, [1, heads, L, L], which each sequence reads at its own positions (the bias is a
    function of the key's position minus the query's); the blocks after it get it from the
    stack, as the first block returns it."""
    original = self.__dict__.get(INNER_ATTR) or functools.partial(type(self).forward, self)
    packed = None
    if not (_off_under_compile(self) or any(a is not None for a in args)
            or kwargs.get("cache") is not None):
        packed = _packed_input(hidden_states)
    if packed is None:
        return original(hidden_states, attention_mask, position_bias, *args, **kwargs)
    packing, hidden_states = packed
    if position_bias is None:
        attention, longest = self.layer[0].SelfAttention, packing.kwargs["max_length_q"]
        if attention.has_relative_attention_bias:
            position_bias = attention.compute_bias(longest, longest, device=hidden_states.device)
        else:  # (as T5Attention's own)
            position_bias = hidden_states.new_zeros(1, attention.n_heads, longest, longest)
    return original(hidden_states, None, position_bias, *args, **kwargs, **packing.kwargs)


# "layers" rules whose layers take more than the hidden states and the mask
LAYER_FORWARDS = {"T5Stack": _t5_block_forward, "MT5Stack": _t5_block_forward}


def _packed_layers_call(original, config, valid, kwargs):
    """An encoder of the "layers" rule: its forward, building no mask, its layers reading the
    packing; the output scattered back (a tuple's first entry, with return_dict=False)."""
    packing = Packing(valid)
    token = _layers_packing.set(packing)
    try:
        output = _without_masks("packed", config, original, **kwargs)
    finally:
        _layers_packing.reset(token)
    states = output[0]
    if not packing.packed(states):  # no layer ran (all dropped): padded as it came
        return output
    if isinstance(output, tuple):
        return (packing.unpack(states), *output[1:])
    return _replace_last_hidden_state(output, packing)


def _base_forward(self, *args, **kwargs):
    original = functools.partial(type(self).forward, self)
    kind, stack_name, decoder = UNPAD_RULES[type(self).__name__]
    names = ("input_ids", "attention_mask")  # the leading positional arguments of every rule's
    if len(args) > len(names):               # model; more of them: passed through untouched
        return original(*args, **kwargs)
    kwargs.update(zip(names, args))
    # a cache is read before the mask: decoding steps (a cache holding tokens) leave at once
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    valid = None
    if (_runs_packed_attention(self, kind, stack_name) and not _off_under_compile(self)
            and (cache is None or (decoder and _fresh_dynamic_cache(cache)))):
        valid = _padding(kwargs.get("attention_mask"), kwargs, self.config)
    if valid is False:
        if kind == "model" and kwargs.get("position_ids") is None:
            # no padding, the default positions: every attention takes its module's causality
            # and window, which is what transformers' masks would say
            return _without_masks("flags", self.config, original, **kwargs)
        valid = None
    if valid is not None and decoder:
        valid = _with_cache(self, valid, kwargs)
    if valid is None:
        return original(**kwargs)
    if kind == "layers":
        return _packed_layers_call(original, self.config, valid, kwargs)
    if kind == "stack":
        token = _padding_mask.set(valid)
        try:
            return original(**kwargs)
        finally:
            _padding_mask.reset(token)
    return _packed_model_call(original, self.config, valid, kwargs,
                              type(self).__name__ in POSITIONS_FROM_MASK)


def _runs_packed_attention(model, kind, stack_name):
    """Whether the model's attention reads padding removal's kwargs: the transfuse attention
    configured, or (PACKED_STACK_ATTR) the stack's rule says so."""
    stack = getattr(model, stack_name) if kind == "stack" else None
    takes_packed = None if stack is None else stack.__dict__.get(PACKED_STACK_ATTR)
    if takes_packed is not None:
        return takes_packed(stack)
    return getattr(model.config, "_attn_implementation", None) == ATTENTION_NAME


def _with_cache(module, valid, kwargs):
    """For a decoder: `valid` when the call uses no KV cache, or one a packed prefill can fill
    (then kwargs name it, created here when the model would create one), else None."""
    name = (_cache_argument.__wrapped__ if torch.compiler.is_compiling()  # (no warning of
            else _cache_argument)(type(module))  # Dynamo's on lru_cache)
    cache = kwargs.get(name, kwargs.get("past_key_values"))
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", False)
    if cache is None and not use_cache:
        return valid
    if cache is None:
        from transformers.cache_utils import DynamicCache
        cache = DynamicCache(config=module.config)
    if not _fresh_dynamic_cache(cache):
        return None
    kwargs.pop("past_key_values", None)
    kwargs[name] = cache
    return valid


def _fill_cache(cache, packed_cache, packing):
    """Each layer's packed keys / values [1, heads, T, D] -> [B, heads, S, D], zeros at pads
    (which the padding mask hides from every later step), given to `cache` through its own
    update, as the padded prefill would (a sliding-window layer keeps its last positions)."""
    for layer_idx, layer in enumerate(packed_cache.layers):
        keys, values = (packing.unpack(getattr(layer, name).transpose(1, 2)).transpose(1, 2)
                        for name in ("keys", "values"))
        cache.update(keys, values, layer_idx)


def _without_masks(why, config, call, **kwargs):
    """call(**kwargs), the call of the model with this config, with transformers building none of
    its attention masks (attention.masks_unread; not while torch.compile traces it: with
    unpad="always" the masks are built)."""
    if torch.compiler.is_compiling():
        return call(**kwargs)
    token = masks_unread.set((why, config))
    try:
        return call(**kwargs)
    finally:
        masks_unread.reset(token)


def _packed_model_call(original, config, valid, kwargs, positions_from_mask=False):
    """The base model on packed input ids (or embeddings) and the padded call's positions (the
    given ones, else arange(S) per row, or with positions_from_mask each row's real tokens
    counted); a KV cache it fills is handed back in the padded layout."""
    packing = Packing(valid)
    inputs = {}
    for name in ("input_ids", "inputs_embeds"):
        if kwargs.get(name) is not None:
            inputs[name] = packing.pack(kwargs.pop(name))
    position_ids = kwargs.pop("position_ids", None)
    if position_ids is None and positions_from_mask:
        position_ids = valid.long().cumsum(1) - 1
    elif position_ids is None:
        position_ids = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0)
    inputs["position_ids"] = packing.pack(position_ids.expand(valid.shape))
    kwargs.pop("attention_mask")
    if kwargs.get("cache_position") is not None:  # the packed call's own cache slots
        kwargs["cache_position"] = torch.arange(len(packing.index), device=valid.device)
    cache_name = "cache" if kwargs.get("cache") is not None else "past_key_values"
    cache = kwargs.get(cache_name)
    if cache is not None:  # the packed call fills a cache of plain layers (its own layout)
        from transformers.cache_utils import DynamicCache
        kwargs[cache_name] = packed_cache = DynamicCache()
    output = _without_masks("packed", config, original, attention_mask=None, **inputs, **kwargs,
                            **packing.kwargs)
    if cache is not None:
        _fill_cache(cache, packed_cache, packing)
        for name, value in list(output.items()):  # (the output's own name of its cache)
            if value is packed_cache:
                output[name] = cache
    return _replace_last_hidden_state(output, packing)


def patch_unpad(model, mode=True):
    """Install padding removal on every base model of a rule in `model`; returns their names.
    mode "always": also while torch.compile traces the model (see transfuse.patch)."""
    done = []
    for name, module in model.named_modules():
        rule = UNPAD_RULES.get(type(module).__name__)
        if rule is None or "forward" in module.__dict__:  # a rule's model, not patched before
            continue
        kind, stack_name, _ = rule
        targets = [(module, _base_forward)]
        if kind == "stack":
            targets.append((getattr(module, stack_name), _stack_forward))
        elif kind == "layers":
            forward = LAYER_FORWARDS.get(type(module).__name__, _layer_forward)
            targets.extend((layer, forward) for layer in getattr(module, stack_name))
        for target, forward in targets:
            if target is not module and "forward" in target.__dict__:  # runs inside
                target.__dict__[INNER_ATTR] = target.__dict__["forward"]
            target.forward = types.MethodType(forward, target)
            target.__dict__[FORWARD_ATTR] = mode
        done.append(name or type(module).__name__)
    return done


def unpatch_unpad(model):
    for module in model.modules():
        if module.__dict__.pop(FORWARD_ATTR, None):
            module.__dict__.pop("forward", None)
            if INNER_ATTR in module.__dict__:
                module.forward = module.__dict__.pop(INNER_ATTR)
