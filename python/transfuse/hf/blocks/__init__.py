"""Block rules: rewrites that span several modules of a transformer block, per family, as tables.

A rule becomes the forward of one module instance (types.MethodType, marked with FORWARD_ATTR so
that unpatch_blocks removes it; a deep copy of the model rebinds it to the copy). Each forward
checks at call time that the modules it uses are still those it was written for, and runs the
class's own forward otherwise, so a later swap (int8 layers, a user's module) never computes
something else.

The rules, each described in its module:

  projections             linear.py
  residual_norm           linear.py
  linear                  linear.py
  residual_rms_norm       decoder_layer.py
  sandwich_rms_norm       decoder_layer.py
  seq2seq_decoder_layer   seq2seq_decoder_layer.py
  rotary_attention        rotary_attention.py
  joint_rotary_attention  rotary_attention.py
  gated_mlp               mlp.py
  joint_gated_mlp         mlp.py
  bias_gelu               mlp.py
  encoder_layer           encoder_layer.py
  encoder_stack           encoder_layer.py
  relative_bias           relative_bias.py
  embeddings              embeddings.py

Which classes take which rule: table.py (BLOCK_RULES); what their forwards must read:
sources.py.
"""
from __future__ import annotations

import torch

from ..unpad import PACKED_STACK_ATTR
from .common import BACKEND_ATTR, FACTS_ATTR, FORWARD_ATTR, PROJECTION_ATTR
from .decoder_layer import _patch_residual_rms_norm, _patch_sandwich_rms_norm
from .embeddings import _patch_embeddings
from .encoder_layer import _patch_encoder_layer, _patch_encoder_stack
from .linear import _patch_linear, _patch_projections, _patch_residual_norm
from .mlp import _patch_bias_gelu, _patch_gated_mlp, _patch_joint_gated_mlp
from .relative_bias import _patch_relative_bias
from .rotary_attention import _patch_joint_rotary_attention, _patch_rotary_attention
from .seq2seq_decoder_layer import _patch_seq2seq_decoder_layer
from .sources import DISTILBERT_CLASSES, RELATIVE_BIAS_KINDS, _distilbert, _forward_reads_as
from .table import BLOCK_RULES

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
