"""The encoder_model rule: a BERT model's forward as transfuse calls alone, without transformers'.

For one sentence (all-MiniLM-L6-v2, a dozen tokens) the six layers' fused calls took about 60%
of a patched forward; the rest was Python around them: transformers' decorators (kwarg
renaming, output capturing, config defaults), the attention mask's construction, three module
calls and their output objects, padding removal's wrapper. Where the call is plain CPU inference
(token ids given, no autograd, nothing recorded or hooked, every module under its transfuse
rule), the rule's forward runs

  ids, token types, positions   (packed: the real tokens alone, when the mask has pad positions)
  -> transfuse._C.embeddings_forward          (the embeddings rule's call)
  -> transfuse._C.encoder_layer, layer by layer (the encoder_stack rule's calls)
  -> scattered back to [B, S, hidden], zeros at pad positions (as padding removal does)
  -> the pooler module, and the class's output object

which is what the modules' rules compute, bit for bit (each kernel works token by token but
attention, which sees the same packed sequences). Anywhere else the forward it replaced runs:
padding removal's (hf/unpad.py), else the class's.

MODEL_RULES: class name -> the child modules the forward uses. Only BERT: RoBERTa's and
ELECTRA's embeddings number or project otherwise, and DistilBERT's take no token types.
"""
from __future__ import annotations

import functools
import sys
import types

import torch
from torch import nn

from .. import backends
from . import blocks, unpad
from .attention import NAME as ATTENTION_NAME

FORWARD_ATTR = "_transfuse_model_forward"
INNER_ATTR = "_transfuse_model_inner"  # the forward the rule replaced (padding removal's)
OUTPUT_ATTR = "_transfuse_model_output"  # the output class, from the model's own module

MODEL_RULES = {"BertModel": ("embeddings", "encoder", "pooler")}
OUTPUT_CLASS = "BaseModelOutputWithPoolingAndCrossAttentions"
# What the class's forward must read (normalized, in order: blocks._reads_as) for the rule to
# replace it; transformers 5.17's and 5.24's read so.
MODEL_SOURCE = (
    "if self.config.is_decoder:",
    "embedding_output = self.embeddings( input_ids=input_ids, position_ids=position_ids, "
    "token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,",
    "encoder_outputs = self.encoder( embedding_output, attention_mask=attention_mask,",
    "sequence_output = encoder_outputs.last_hidden_state",
    "pooled_output = self.pooler(sequence_output) if self.pooler is not None else None",
    f"return {OUTPUT_CLASS}( last_hidden_state=sequence_output, pooler_output=pooled_output,")
ARGUMENT_NAMES = ("input_ids", "attention_mask", "token_type_ids")  # the leading positionals
# arguments the class's forward runs as the rule does while they are None or False (a cache
# and use_cache: the class drops them unless the config is a decoder's, which the rule is not)
IDLE_KWARGS = frozenset(("position_ids", "inputs_embeds", "encoder_hidden_states",
                         "encoder_attention_mask", "cache", "past_key_values", "use_cache",
                         "output_attentions", "output_hidden_states"))


def _replaced(self):
    return self.__dict__.get(INNER_ATTR) or functools.partial(type(self).forward, self)


def _encoder_model_forward(self, *args, **kwargs):
    """The rule's calls where _lean_forward takes the call, else the forward it replaced."""
    if len(args) <= len(ARGUMENT_NAMES) and not kwargs.keys() & ARGUMENT_NAMES[:len(args)]:
        out = _lean_forward(self, {**dict(zip(ARGUMENT_NAMES, args)), **kwargs})
        if out is not None:
            return out
    return _replaced(self)(*args, **kwargs)


def _runs_stack_rule(encoder):
    """The encoder runs the encoder_stack rule: its forward, inside padding removal's or not."""
    forward = encoder.__dict__.get("forward")
    if getattr(forward, "__func__", None) is unpad._stack_forward:
        forward = encoder.__dict__.get(unpad.INNER_ATTR)
    return getattr(forward, "__func__", None) is blocks._encoder_stack_forward


def _lean_forward(self, arguments):
    """The model's output from the rule's calls (module docstring), or None where they would not
    compute what the forward it replaced computes."""
    return_dict = arguments.pop("return_dict", None)
    ids, mask, token_types = (arguments.pop(name, None) for name in ARGUMENT_NAMES)
    config = self.config
    if return_dict is None:  # (as transformers' capture_outputs decorator)
        return_dict = getattr(config, "return_dict", True)
    if (type(ids) is not torch.Tensor or ids.dim() != 2 or not arguments.keys() <= IDLE_KWARGS
            or any(v is not None and v is not False for v in arguments.values())
            or blocks._global_hooks() or blocks._own_hooks(self)
            or config.is_decoder or config.output_attentions or config.output_hidden_states
            or unpad._outputs_recorded()):
        return None
    children = self._modules
    embeddings, encoder = children["embeddings"], children["encoder"]
    if (blocks._own_hooks(embeddings) or blocks._own_hooks(encoder)
            or getattr(embeddings.__dict__.get("forward"), "__func__", None)
            is not blocks._embeddings_forward or not _runs_stack_rule(encoder)
            or config._attn_implementation != ATTENTION_NAME):
        return None
    table_arguments = blocks._fused_embeddings_arguments(embeddings, ids)  # (CPU inference)
    positions = embeddings._buffers.get("position_ids")
    layers = encoder._modules.get("layer")
    shape = ids.shape
    if (table_arguments is None or positions is None or positions.shape[-1] < shape[1]
            or type(layers) is not nn.ModuleList):
        return None
    positions = positions[:, :shape[1]]
    if token_types is None:  # (as BertEmbeddings: its buffer, zeros, at the positions)
        buffer = embeddings._buffers.get("token_type_ids")
        if buffer is None:
            return None
        token_types = torch.gather(buffer.expand(positions.shape[0], -1), 1,
                                   positions).expand(shape)
    if type(token_types) is not torch.Tensor or token_types.shape != shape:
        return None
    packing = None
    if mask is not None:
        if type(mask) is not torch.Tensor or mask.shape != shape:
            return None
        valid = mask.bool()
        if not bool(valid.all()):
            if not self.__dict__.get(unpad.FORWARD_ATTR):  # padding removal off: the masks
                return None
            packing = unpad.Packing(valid)
            ids, token_types = packing.pack(ids), packing.pack(token_types)
            positions = packing.pack(positions.expand(shape))
    module = backends.extension()[0]
    x = module.embeddings_forward(ids, token_types, positions, *table_arguments)
    call = blocks._fused_call(x, None, packing.kwargs if packing else {})
    fused = None if call is None else blocks._fused_layers(layers, x)
    if fused is None:
        return None
    for layer_arguments in fused:
        x = module.encoder_layer(x, *call, *layer_arguments)
    if packing is not None:
        x = packing.unpack(x)
    pooler = children.get("pooler")
    output = self.__dict__[OUTPUT_ATTR](last_hidden_state=x,
                                        pooler_output=None if pooler is None else pooler(x))
    return output if return_dict else output.to_tuple()


@functools.lru_cache(maxsize=None)
def _reads_as_expected(cls):
    return blocks._reads_as(cls.forward, MODEL_SOURCE)


def patch_encoder_models(model):
    """Install the rule on every model of MODEL_RULES in `model` whose forward reads as the rule
    expects and whose modules are there (after padding removal, whose forward it keeps to fall
    back on); returns their names."""
    done = []
    for name, module in model.named_modules():
        names = MODEL_RULES.get(type(module).__name__)
        output_class = getattr(sys.modules[type(module).__module__], OUTPUT_CLASS, None)
        if (names is None or FORWARD_ATTR in module.__dict__ or output_class is None
                or not all(isinstance(module._modules.get(n), nn.Module) for n in names[:2])
                or not _reads_as_expected(type(module))):
            continue
        if "forward" in module.__dict__:
            module.__dict__[INNER_ATTR] = module.__dict__["forward"]
        module.__dict__[OUTPUT_ATTR] = output_class
        module.forward = types.MethodType(_encoder_model_forward, module)
        module.__dict__[FORWARD_ATTR] = True
        done.append(name or type(module).__name__)
    return done


def unpatch_encoder_models(model):
    """Put back the forward each rule replaced (before padding removal takes its own off)."""
    for module in model.modules():
        if module.__dict__.pop(FORWARD_ATTR, None):
            module.__dict__.pop("forward", None)
            module.__dict__.pop(OUTPUT_ATTR, None)
            if INNER_ATTR in module.__dict__:
                module.forward = module.__dict__.pop(INNER_ATTR)
