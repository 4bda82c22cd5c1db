"""Rules of BERT-style encoder layers and stacks (and DistilBERT's).

  encoder_layer  a BERT-style encoder layer without cross-attention, chunking or a cache. CPU
               inference (no autograd) with the transfuse attention over packed tokens or an
               unmasked batch, every module as built or as its rule left it: the whole layer in
               one transfuse._C.encoder_layer call (csrc/bindings/encoder_layer.cpp), the same
               kernels as the modules' rules (torch's GEMM where transfuse.ops.linear leaves a
               call to it), bit for bit, without some ten Python calls between
               them (on all-MiniLM-L6-v2's real sentences that Python was about a tenth of a
               batch's time). The same on CUDA tensors for BERT's layer with float weights in
               fp16 / bf16, where its modules run the CUDA kernels (Q, K and V as the
               projections rule's one GEMM, the attention below backends.TRITON_MIN_FLOPS):
               there a small model is host-bound (the H200 machine: a MiniLM-shaped BERT's
               padded batch, 0.44 ms of kernels under 5.8 ms of host). Otherwise the class's
               computation with its containers' Python skipped (the layer's, its attention's
               and self-attention's forwards,
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
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ... import backends
from ...nn import FusedLayerNorm, Int8Linear
from ...ops.linear import _own_kernel_takes
from ..attention import NAME as ATTENTION_NAME, _weights_requested
from . import common
from ...ops.attention import cuda_unsupported_for
from .common import (BACKEND_ATTR, FACTS_ATTR, FORWARD_ATTR, PACKED_KWARGS, PROJECTION_ATTR,
                     _global_hooks, _install, _own_hooks, _rule_forward)
from .linear import _linear_forward, _projection_forward, _rows_of_one_storage
from .mlp import _gelu_approximation
from .sources import (ATTENTION_CONTAINER_SOURCE, DISTILBERT_ATTENTION_SOURCE,
                      DISTILBERT_FFN_CHUNK_SOURCE, DISTILBERT_FFN_SOURCE, SELF_ATTENTION_SOURCE,
                      STACK_OUTPUT_CLASS, _distilbert, _reads_as)

# The packed kwargs and what else the transfuse attention function takes and ignores there
# (BertModel passes position_ids down)
FUSED_LAYER_KWARGS = PACKED_KWARGS | {"position_ids"}


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
                                                          _projection_forward),) * 3,
        on_cuda=True)


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
                          forwards, on_cuda=False):
    """transfuse._C.encoder_layer's arguments after x, cu_seqlens and max_seqlen for a layer of
    self-attention `inner` of `heads` heads scaling its scores by `scale` (not causal, without
    attention dropout), the six
    `linears` (query, key, value, attention output, intermediate, output), the two `norms`
    (FusedLayerNorm), `dropouts` (nn.Dropout, inactive) and `activation` (transformers' exact or
    tanh GELU): heads, scale, weights, weight_scales, biases, torch_linears, int8_mode,
    norm_weights, norm_biases, eps, activation; else None. forwards[i]: the instance forwards
    (the rules', None for the class's) under which float linear i computes what the call does.
    holders: the modules whose rules chose a backend besides the linears and norms. torch_linears:
    the float layers that transfuse.ops.linear leaves to torch's F.linear (and F.gelu) on x.
    on_cuda: whether the layer's modules run there as the call does (_cuda_projections); else
    the call is for CPU tensors only."""
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
    cuda = device.type == "cuda"
    if cuda:
        if not on_cuda or int8 or cuda_unsupported_for(dtype, x.shape[-1] // heads, 0.0) or (
                not _cuda_projections(linears[:3])):
            return None
    elif device.type in (common.JOINED_INT8_DEVICES if int8 else common.JOINED_GEMM_DEVICES):
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
            torch_linears.append(cuda or not _own_kernel_takes(x, weight))
            chosen.add(m.__dict__.get(BACKEND_ATTR))
        else:
            return None
        bias = m._parameters.get("bias")
        if bias is None or bias.dtype != dtype:
            return None
        weights.append(weight)
        biases.append(bias)
    if cuda:  # (the attention's case at most as large as the modules': packed, S_kv <= T)
        cases, expected = ("norm", "bias_gelu", backends.sized("attention", 4 * x.numel() *
                                                               x.shape[1])), "cuda"
    else:
        cases = (("int8", "activation") if int8 else ("linear",)) + ("norm", "attention")
        expected = "cpu"
    for backend in chosen:
        for case in cases:
            if backends.resolve(case, backend, device) != expected:
                return None
    return (heads, float(scale), weights, weight_scales, biases, torch_linears, mode,
            [n._parameters["weight"] for n in norms],
            [n._parameters["bias"] for n in norms], [float(n.eps) for n in norms],
            "gelu" if approximate == "none" else "gelu_tanh")


def _cuda_projections(qkv):
    """Whether the query, key and value layers run as the call does on CUDA tensors: one GEMM
    over their weights and biases joined (the projections rule, hf/blocks/linear.py, intact, its
    rows in this order in one storage)."""
    holder = qkv[0].__dict__.get(PROJECTION_ATTR)
    if holder is None or any(_rule_forward(m) is not _projection_forward for m in qkv):
        return False
    projection = holder[0]
    if not (len(projection.linears) == 3 and all(a is b for a, b in zip(projection.linears, qkv))
            and projection.intact()):
        return False
    for name in ("weight", "bias"):
        tensors = [m._parameters.get(name) for m in qkv]
        if any(t is None for t in tensors) or _rows_of_one_storage(tensors) is None:
            return False
    return True


def _fused_call(x, attention_mask, kwargs):
    """(cu_seqlens, max_seqlen) for transfuse._C.encoder_layer when this call of a layer (or of
    the stack) can run fused: CPU or CUDA inference (no autograd, autocast or compile), packed
    tokens or an unmasked batch, no other kwargs than FUSED_LAYER_KWARGS, no attention weights
    asked for; else None."""
    device = x.device.type
    if (device not in ("cpu", "cuda") or x.dim() != 3 or torch.is_grad_enabled()
            or attention_mask is not None or not kwargs.keys() <= FUSED_LAYER_KWARGS
            or torch.compiler.is_compiling() or torch.is_autocast_enabled(device)
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


# The layers of other rules that take transfuse._C.encoder_layer's call: their rule's forward ->
# (layer, x) -> the call's arguments after x, cu_seqlens and max_seqlen, or None (relative_bias.py
# adds MPNet's layer)
OTHER_FUSED_LAYERS = {}


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
        else:  # another rule's layer taking the call (its attention is the rule's own)
            layer_arguments = OTHER_FUSED_LAYERS.get(forward)
            arguments = (None if layer_arguments is None or _own_hooks(layer)
                         else layer_arguments(layer, x))
            if arguments is None:
                return None
            fused.append(arguments)
            continue
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
