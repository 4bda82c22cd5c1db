"""The "transfuse" attention implementation of transformers.

`register()` (run by `import transfuse`) adds it to AttentionInterface and, with the same name, to
AttentionMaskInterface: without the mask entry transformers would build no mask for it and pass
attention_mask=None, silently ignoring padding. The mask function is transformers' sdpa_mask: a
bool mask (True = attend), or None where a causal or full pattern needs no mask, in which case the
module's `is_causal` decides, exactly as for SDPA; models whose transformers class does not support
SDPA get eager attention's additive masks instead (`masks_skippable`). Inside a call that padding
removal runs (hf/unpad.py) and whose masks no attention reads (`masks_unread`), transformers builds
none: the call is packed (each attention reads the sequence boundaries) or has no padding (the
module's causality and sliding window say what the mask would). Select it with
`from_pretrained(..., attn_implementation="transfuse")`,
`model.set_attn_implementation("transfuse")` or `transfuse.patch(model, attention=True)`.

Calls that must return the attention weights (output_attentions=True) run the family's eager
attention; the request is read from kwargs and from transformers' output-capturing context (GPT-2
pops the flag before its attention runs). So do calls given attention sinks (GPT-OSS's s_aux, a
sinks argument elsewhere: one more logit per head in each softmax), which the kernels do not
compute, with a warning; a sparse attention's selected keys (indices, block_indices: DeepSeek
V3.2's for implementations other than eager and SDPA) raise a ValueError. Only attention modules
whose code goes through transformers' attention interface can run this implementation
(`calls_interface`); BLOOM's and Falcon's compute their own, and transfuse.patch leaves them (and
names them in its warning).
"""
from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import warnings

import torch

from .. import backends
from ..ops.attention import attention, varlen_attention

try:  # transformers' context variable of the outputs its capture_outputs decorator collects
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # no transformers, or one without it: recording requests come in kwargs only
    _active_collector = None

NAME = "transfuse"
# ("packed" or "flags", the model's config) while padding removal runs a model call whose attention
# reads no mask (see the module's docstring), else None.
masks_unread = contextvars.ContextVar("transfuse_masks_unread", default=None)


def reads_no_mask(config):
    """"packed" or "flags" inside such a call of the model whose config this is (not of another
    model run within it, from a hook say), else None; None too while torch.compile traces, as
    Dynamo cannot read a ContextVar (and padding removal sets none then)."""
    state = None if torch.compiler.is_compiling() else masks_unread.get()
    return state[0] if state is not None and state[1] is config else None


def _causal(module, query, attention_mask, is_causal):
    """As transformers' SDPA integration decides it: the module's causality (or the call's
    is_causal) applies through the flag only when no mask is given and there is more than one
    query row (one query row sees every key either way). For a model given eager's masks
    (masks_skippable), no mask means every key, as eager reads it: its modules' is_causal (or
    its absence, which SDPA takes for True) need not say anything (Splinter's encoder has none)."""
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
        config = getattr(module, "config", None) if attention_mask is None else None
        if config is not None and not reads_no_mask(config) and not masks_skippable(type(config)):
            is_causal = False
    return bool(is_causal) and attention_mask is None and query.shape[2] > 1


def _combined_mask(attention_mask, position_bias):
    """T5's position bias as the additive mask, -inf where the bool mask hides a key (as SDPA's
    integration does, so that the bias keeps its gradient)."""
    if position_bias is None:
        return attention_mask
    if attention_mask is None:
        return position_bias
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, float("-inf"))
    return position_bias + attention_mask


# Attention arguments that change the result and that the transfuse kernels do not compute: the
# sinks the family's eager attention applies, and the keys a sparse attention selected.
SINK_ARGUMENTS = ("s_aux", "sinks")
SPARSE_ARGUMENTS = ("indices", "block_indices")


def _uncomputed(module, kwargs):
    """The sink arguments this call passes (it then runs the eager attention); a ValueError for
    sparse attention's selected keys."""
    sparse = [name for name in SPARSE_ARGUMENTS if kwargs.get(name) is not None]
    if sparse:
        raise ValueError(f"transfuse: {type(module).__name__} passes {', '.join(sparse)} (the keys "
                         f"its sparse attention selected), which the transfuse attention does not "
                         f"compute; load this model with attn_implementation='sdpa' or 'eager'")
    sinks = [name for name in SINK_ARGUMENTS if kwargs.get(name) is not None]
    if sinks:
        backends.warn_once(("attention", "sinks"), f"transfuse: {type(module).__name__} passes "
                           f"attention sinks ({', '.join(sinks)}), which the transfuse kernels do "
                           f"not compute; those calls run the model's eager attention")
    return sinks


def _collector():
    """The dict the running capture_outputs call collects per-layer outputs into (its keys name
    what is recorded: "attentions", "cross_attentions", ...), or None outside such a call."""
    return None if _active_collector is None else _active_collector.get()


def _weights_requested(kwargs):
    """output_attentions=True asked for this call's attention weights. Most families pass the flag
    down in kwargs; some (GPT-2) pop it, so the request is also read where transformers records
    it: the output collector of the running capture_outputs call."""
    if kwargs.get("output_attentions"):
        return True
    collected = _collector()
    return bool(collected) and any(key.endswith("attentions") for key in collected)


def _eager_with_weights(module, query, key, value, attention_mask, causal, dropout, scaling,
                        sliding_window=None, **kwargs):
    """The family's own eager attention (it returns the weights), fed the additive float mask it
    expects: the bool mask, or without one the causal pattern and window the kernels would apply,
    as 0 / finfo.min."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"output_attentions=True: {type(module).__name__} has no "
                         "eager_attention_forward to fall back on; use attn_implementation='eager'")
    seq_q, seq_kv = query.shape[2], key.shape[2]
    window = int(sliding_window or 0) if attention_mask is None else 0  # (as attention_forward)
    if causal or window:
        rows = torch.arange(seq_q, device=query.device).view(-1, 1) + (seq_kv - seq_q)
        cols = torch.arange(seq_kv, device=query.device).view(1, -1)
        attention_mask = (cols <= rows) | (not causal)  # (a bool: every key)
        if window:
            attention_mask = attention_mask & ((rows - cols).abs() < window)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        hidden = torch.tensor(torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device)
        attention_mask = torch.where(attention_mask, torch.zeros_like(hidden), hidden)
    return eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                 sliding_window=sliding_window, **kwargs)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, position_bias=None, softcap=None, sliding_window=None,
                      **kwargs):
    """AttentionInterface entry: [B, H, S, D] query/key/value (K/V not expanded for GQA) ->
    ([B, Sq, Hq, D], None)."""
    causal = _causal(module, query, attention_mask, is_causal)
    if torch.is_autocast_enabled(query.device.type):
        # the eager attention's matmuls run in autocast's dtype (its rotary embedding may have
        # left query and key in fp32 and value in bf16)
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    sinks = _uncomputed(module, kwargs)
    if sinks and kwargs.get("cu_seq_lens_q") is not None:
        raise ValueError(f"transfuse: {type(module).__name__} passes attention sinks on packed "
                         f"sequences (cu_seq_lens_q), which its eager attention cannot separate")
    if sinks or _weights_requested(kwargs):
        if not sinks:
            backends.warn_once(("attention", "output_attentions"), "transfuse: "
                               "output_attentions=True needs the attention weights; those calls "
                               "run the model's eager attention")
        return _eager_with_weights(module, query, key, value, attention_mask, causal, dropout,
                                   scaling, position_bias=position_bias, softcap=softcap,
                                   sliding_window=sliding_window, **kwargs)
    value_dim = value.shape[-1]
    if value_dim != query.shape[-1]:
        query, key, value, scaling = _one_head_dim(query, key, value, scaling)
    if kwargs.get("cu_seq_lens_q") is not None:
        return _packed_attention(module, query, key, value, dropout, scaling, is_causal, softcap,
                                 sliding_window, position_bias, **kwargs)[..., :value_dim], None
    if reads_no_mask(getattr(module, "config", None)) == "packed":
        # transformers built no mask: the call would mix the sequences
        raise RuntimeError(f"transfuse: {type(module).__name__} was called on packed tokens "
                           f"without the sequence boundaries (cu_seq_lens_q) in its kwargs")
    seq_q, seq_kv = query.shape[2], key.shape[2]
    if causal and seq_kv > seq_q:
        # An empty static cache at prefill: transformers skipped the mask because the keys past
        # seq_q are unwritten cache slots (SDPA's top-left causal ignores them); drop them.
        key, value = key[:, :, :seq_q], value[:, :, :seq_q]
        if position_bias is not None:
            position_bias = position_bias[..., :seq_q]
    mask = _combined_mask(attention_mask, position_bias)
    # With a mask, the window is in it already (built in cache coordinates); without one, the keys
    # end at the current query, which is the alignment the kernel's window assumes.
    window = int(sliding_window or 0) if attention_mask is None else 0
    out = attention(query, key, value, mask=mask, causal=causal, scale=scaling,
                    dropout_p=float(dropout or 0.0), window=window, softcap=float(softcap or 0.0))
    return out.transpose(1, 2)[..., :value_dim].contiguous(), None


def _one_head_dim(query, key, value, scaling):
    """Multi-head latent attention (DeepSeek V2 / V3: values of another head_dim than queries
    and keys) for kernels that take one head_dim: the narrower side zero-padded, which adds
    nothing to q k^T and gives output columns past the values' (dropped by the caller); the
    scale defaults to the queries' own head_dim."""
    width = max(query.shape[-1], value.shape[-1])
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    query, key, value = (torch.nn.functional.pad(t, (0, width - t.shape[-1]))
                         if t.shape[-1] < width else t for t in (query, key, value))
    return query, key, value, scaling


def _packed_attention(module, query, key, value, dropout, scaling, is_causal, softcap,
                      sliding_window, position_bias, cu_seq_lens_q, cu_seq_lens_k=None,
                      max_length_q=None, max_length_k=None, **_):
    """transformers' padding-free call (DataCollatorWithFlattening, or transfuse's unpadding):
    [1, H, T, D] tensors holding the sequences that cu_seq_lens_q/k delimit, -> [1, T, Hq, D].
    Any mask transformers built for the packed batch (block diagonal) is what the sequence
    boundaries say already, so it is not read. A T5 position bias [1, H, >= Lq, >= Lk] (a
    function of the key's position minus the query's) is added at each sequence's own
    positions, its first Lq x Lk block being every sequence's."""
    if query.shape[0] != 1:
        raise ValueError(f"cu_seq_lens_q is given, so the sequences must be packed into one row, "
                         f"but query has batch size {query.shape[0]}")
    cu_seq_lens_k = cu_seq_lens_q if cu_seq_lens_k is None else cu_seq_lens_k
    lengths = [int(x) if x is not None else None for x in (max_length_q, max_length_k)]
    if None in lengths:  # not passed: the longest sequence (one read of the offsets)
        longest = [int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
                   for cu in (cu_seq_lens_q, cu_seq_lens_k)]
        lengths = [given if given is not None else found
                   for given, found in zip(lengths, longest)]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if position_bias is not None:
        position_bias = position_bias[..., :lengths[0], :lengths[1]]
    out = varlen_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
        cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32), *lengths,
        mask=position_bias, causal=bool(is_causal), scale=scaling, dropout_p=float(dropout or 0.0),
        window=int(sliding_window or 0), softcap=float(softcap or 0.0), check_offsets=False)
    return out.unsqueeze(0)


@functools.lru_cache(maxsize=None)
def masks_skippable(config_class):
    """Whether the models of this config class take SDPA's masks (bool, or None where no padding
    needs one: the module's is_causal then decides): only where transformers' model class for
    it supports SDPA. Elsewhere they get eager attention's (additive, always built), which
    their own code may read too: PegasusX's and NLLB-MoE's decoder self-attention say
    is_causal=False and rely on the mask, BigBirdPegasus's encoder computes its own attention
    and adds the mask. A config class transformers does not map (remote code, a sub-model's)
    gets eager's too."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
        name = MODEL_MAPPING_NAMES.get(getattr(config_class, "model_type", None))
        model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    except ImportError:
        return False
    return bool(getattr(model_class, "_supports_sdpa", False))


def register():
    """Add "transfuse" to transformers' attention and attention-mask interfaces (idempotent)."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
    except ImportError as error:  # transformers is optional
        return str(error)

    def mask(*args, **kwargs):
        """transformers' sdpa_mask, or None inside a call whose attention reads no mask; for
        models without SDPA support (masks_skippable) the mask eager attention gets."""
        config = kwargs.get("config")
        if reads_no_mask(config):
            return None
        return (sdpa_mask if masks_skippable(type(config)) else eager_mask)(*args, **kwargs)

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask)
    return ""


# What the code of a module that dispatches to the registered attention functions reads:
# transformers' AttentionInterface mapping (`ALL_ATTENTION_FUNCTIONS.get_interface(...)`).
INTERFACE_MARK = "ALL_ATTENTION_FUNCTIONS"


@functools.lru_cache(maxsize=None)
def calls_interface(module_class) -> bool:
    """True when the code of `module_class` (its own or inherited, torch's aside) looks up
    transformers' attention functions, the only way the "transfuse" attention runs (BLOOM's and
    Falcon's attention compute their own)."""
    for klass in module_class.__mro__:
        if klass.__module__.startswith("torch."):
            break
        try:
            if INTERFACE_MARK in inspect.getsource(klass):
                return True
        except (OSError, TypeError):  # no source (built in, or defined in a REPL)
            continue
    return False


def attention_modules(model):
    """The innermost attention modules of a transformers model: modules whose class name holds
    "Attention" with no such module inside them (BertSelfAttention, not the BertAttention holding
    it). Empty for a model without a transformers config."""
    if getattr(getattr(model, "config", None), "_attn_implementation", None) is None:
        return []
    found = [m for m in model.modules() if "Attention" in type(m).__name__]
    return [m for m in found
            if not any("Attention" in type(c).__name__ for c in list(m.modules())[1:])]


def not_running(module, model):
    """Why the "transfuse" attention does not run in `module` (an attention_modules entry), or
    "" when it does."""
    if not calls_interface(type(module)):
        return "its forward does not go through transformers' attention interface"
    config = getattr(module, "config", None) or model.config
    implementation = getattr(config, "_attn_implementation", None)
    if implementation != NAME:
        return f"its config keeps the {implementation!r} attention"
    return ""


def set_implementation(model, implementation):
    """Switch every sub-model's attention implementation; returns the previous one.

    transformers 5.17's set_attn_implementation skips the sub-models whose config has the model's
    config class (T5's encoder and decoder stacks, which hold copies of the config): those are
    switched one by one."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous is None or not hasattr(model, "set_attn_implementation"):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.set_attn_implementation(implementation)
        for sub in model.modules():
            current = getattr(getattr(sub, "config", None), "_attn_implementation", implementation)
            if current != implementation and hasattr(sub, "set_attn_implementation"):
                sub.set_attn_implementation(implementation)
    return previous
