"""The encoder_model rule: a BERT-style model's forward as transfuse calls, without transformers'.

For one sentence (all-MiniLM-L6-v2, a dozen tokens) the six layers' fused calls took about half
of a patched forward; the rest was Python around them: transformers' decorators (kwarg
renaming, output capturing, config defaults), the attention mask's construction, three module
calls and their output objects, padding removal's wrapper. Where the call is plain CPU inference,
or CUDA inference where the layers take their fused call there (fp16 / bf16: the CUDA attention's
dtypes) (token ids given, no autograd, nothing recorded or hooked, every module under its
transfuse rule), the rule's forward runs

  ids, token types, positions   (packed: the real tokens alone, when the mask has pad positions)
  -> transfuse._C.embeddings_forward          (the embeddings' computation in one call)
  -> transfuse._C.encoder_layer, layer by layer (the encoder_stack rule's calls)
  -> scattered back to [B, S, hidden], zeros at pad positions (as padding removal does)
  -> the pooler module, and the class's output object

which is what the modules' rules compute, bit for bit (each kernel works token by token but
attention, which sees the same packed sequences). Anywhere else the forward it replaced runs:
padding removal's (hf/unpad.py), else the class's.

MODEL_RULES: class name -> where the rule finds the positions: "buffer" (BERT: the embeddings'
position_ids buffer, their forward the embeddings rule's, hf/blocks/embeddings.py) or "from_ids"
(RoBERTa, XLM-R, CamemBERT: numbered from the ids by the embeddings' own
create_position_ids_from_input_ids, their class's forward read at patch time as
EMBEDDINGS_FROM_IDS_SOURCE). ELECTRA's model projects its embeddings and DistilBERT's take no token
types: not this rule.
"""
from __future__ import annotations

import functools
import sys
import types

import torch
from torch import nn

from .. import backends
from ..ops.attention import cuda_unsupported_for
from . import unpad
from .attention import NAME as ATTENTION_NAME
from .blocks.common import _global_hooks, _own_hooks, _rule_forward
from .blocks.embeddings import _embeddings_forward, _fused_embeddings_arguments
from .blocks.encoder_layer import _encoder_stack_forward, _layers_fused
from .blocks.sources import EMBEDDINGS_SOURCE, _reads_as

FORWARD_ATTR = "_transfuse_model_forward"
INNER_ATTR = "_transfuse_model_inner"  # the forward the rule replaced (padding removal's)
FACTS_ATTR = "_transfuse_model_facts"  # (positions kind, output class, embeddings class)

MODEL_RULES = {"BertModel": "buffer",
               **{f"{family}Model": "from_ids"
                  for family in ("Roberta", "XLMRoberta", "Camembert")}}
OUTPUT_CLASS = "BaseModelOutputWithPoolingAndCrossAttentions"
# What the class's forward must read (normalized, in order: blocks.sources._reads_as) for the rule
# to replace it; transformers 5.17's and 5.24's read so.
MODEL_SOURCE = (
    "if self.config.is_decoder:",
    "embedding_output = self.embeddings( input_ids=input_ids, position_ids=position_ids, "
    "token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,",
    "encoder_outputs = self.encoder( embedding_output, attention_mask=attention_mask,",
    "sequence_output = encoder_outputs.last_hidden_state",
    "pooled_output = self.pooler(sequence_output) if self.pooler is not None else None",
    f"return {OUTPUT_CLASS}( last_hidden_state=sequence_output, pooler_output=pooled_output,")
# What a "from_ids" family's embeddings forward must read (transformers 5.17's and 5.24's do): the
# computation of transfuse._C.embeddings_forward, in its order (as BERT's, whose rule reads
# blocks.sources.EMBEDDINGS_SOURCE), on positions from the ids.
EMBEDDINGS_FROM_IDS_SOURCE = (
    "if position_ids is None: if input_ids is not None:",
    "position_ids = self.create_position_ids_from_input_ids(", "input_ids, self.padding_idx,",
    "if token_type_ids is None:", "buffered_token_type_ids = torch.gather(",
    *EMBEDDINGS_SOURCE[2:])
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
    if (len(args) <= len(ARGUMENT_NAMES) and not kwargs.keys() & ARGUMENT_NAMES[:len(args)]
            and not torch.compiler.is_compiling()):
        out = _lean_forward(self, {**dict(zip(ARGUMENT_NAMES, args)), **kwargs})
        if out is not None:
            return out
    return _replaced(self)(*args, **kwargs)


def _runs_stack_rule(encoder):
    """The encoder runs the encoder_stack rule: its forward, inside padding removal's or not."""
    forward = encoder.__dict__.get("forward")
    if getattr(forward, "__func__", None) is unpad._stack_forward:
        forward = encoder.__dict__.get(unpad.INNER_ATTR)
    return getattr(forward, "__func__", None) is _encoder_stack_forward


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
            or _global_hooks() or _own_hooks(self)
            or config.is_decoder or config.output_attentions or config.output_hidden_states
            or unpad._outputs_recorded()):
        return None
    children = self._modules
    embeddings, encoder = children["embeddings"], children["encoder"]
    kind, output_class, embeddings_class = self.__dict__[FACTS_ATTR]
    forward = _rule_forward(embeddings)
    if (_own_hooks(embeddings) or _own_hooks(encoder)
            or not (forward is _embeddings_forward if kind == "buffer" else
                    type(embeddings) is embeddings_class and "forward" not in embeddings.__dict__)
            or not _runs_stack_rule(encoder) or config._attn_implementation != ATTENTION_NAME):
        return None
    table_arguments = _fused_embeddings_arguments(embeddings, ids)  # (CPU or CUDA inference)
    if table_arguments is None or (ids.is_cuda and cuda_unsupported_for(
            table_arguments[0].dtype, config.hidden_size // config.num_attention_heads, 0.0)):
        return None  # (on CUDA: before the embeddings, which the layers would not take)
    shape = ids.shape
    if kind == "buffer":
        positions = embeddings._buffers.get("position_ids")
        if positions is None or positions.shape[-1] < shape[1]:
            return None
        positions = positions[:, :shape[1]]
    else:  # (no cache: it starts at 0)
        positions = embeddings.create_position_ids_from_input_ids(ids, embeddings.padding_idx, 0)
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
    x = backends.extension()[0].embeddings_forward(ids, token_types, positions, *table_arguments)
    x = _layers_fused(encoder._modules.get("layer"), x, None,
                             packing.kwargs if packing else {})
    if x is None:
        return None
    if packing is not None:
        x = packing.unpack(x)
    pooler = children.get("pooler")
    output = output_class(last_hidden_state=x, pooler_output=None if pooler is None else pooler(x))
    return output if return_dict else output.to_tuple()


@functools.lru_cache(maxsize=None)
def _reads_as_expected(cls, embeddings_class):
    """The model's forward (and for a "from_ids" family its embeddings') reads as the rule
    expects."""
    return _reads_as(cls.forward, MODEL_SOURCE) and (
        MODEL_RULES[cls.__name__] == "buffer"
        or _reads_as(embeddings_class.forward, EMBEDDINGS_FROM_IDS_SOURCE))


def patch_encoder_models(model):
    """Install the rule on every model of MODEL_RULES in `model` whose forward reads as the rule
    expects and whose modules are there (after padding removal, whose forward it keeps to fall
    back on; a forward of the instance's own leaves the model alone); returns their names."""
    done = []
    for name, module in model.named_modules():
        kind = MODEL_RULES.get(type(module).__name__)
        output_class = getattr(sys.modules[type(module).__module__], OUTPUT_CLASS, None)
        children = module._modules
        if (kind is None or FORWARD_ATTR in module.__dict__ or output_class is None
                or ("forward" in module.__dict__
                    and _rule_forward(module) is not unpad._base_forward)
                or not isinstance(children.get("embeddings"), nn.Module)
                or not isinstance(children.get("encoder"), nn.Module)
                or not _reads_as_expected(type(module), type(children["embeddings"]))):
            continue
        if "forward" in module.__dict__:
            module.__dict__[INNER_ATTR] = module.__dict__["forward"]
        module.__dict__[FACTS_ATTR] = (kind, output_class, type(children["embeddings"]))
        module.forward = types.MethodType(_encoder_model_forward, module)
        module.__dict__[FORWARD_ATTR] = True
        done.append(name or type(module).__name__)
    return done


def unpatch_encoder_models(model):
    """Put back the forward each rule replaced (before padding removal takes its own off)."""
    for module in model.modules():
        if module.__dict__.pop(FORWARD_ATTR, None):
            module.__dict__.pop("forward", None)
            module.__dict__.pop(FACTS_ATTR, None)
            if INNER_ATTR in module.__dict__:
                module.forward = module.__dict__.pop(INNER_ATTR)
