"""The rule of BERT's embeddings.

  embeddings   BERT's (and ELECTRA's) embeddings on given token ids and token types, CPU or
               CUDA inference: LayerNorm(word[ids] + token_type[types] + position[positions])
               in one transfuse._C.embeddings_forward call (csrc/bindings/embeddings.cpp), the
               module's operations in its order (bit for bit), without its six module calls;
               else the class's forward.
"""
from __future__ import annotations

import torch
from torch import nn

from ... import backends
from ...nn import FusedLayerNorm
from ...ops.norm import KERNEL_DTYPES as NORM_DTYPES
from .common import _global_hooks, _install, _own_hooks
from .sources import CACHE_LENGTH_NAMES


def _plain_embedding(module, dtype):
    """An nn.Embedding of that class, unhooked, running the class's forward (a lookup: no max_norm
    renormalizing the table in place) on a table of `dtype`."""
    return (type(module) is nn.Embedding and not _own_hooks(module)
            and "forward" not in module.__dict__ and module.max_norm is None
            and module._parameters["weight"].dtype == dtype)


def _fused_embeddings_arguments(embeddings, input_ids):
    """transfuse._C.embeddings_forward's tables and norm for `embeddings` on CPU or CUDA ids in
    inference (no autograd, autocast or compile), where its modules compute what the call does
    (tables of a dtype the norm kernels take, the norm on the device's kernel), else None."""
    children = embeddings._modules
    word, norm, dropout = (children.get("word_embeddings"), children.get("LayerNorm"),
                           children.get("dropout"))
    device = input_ids.device.type
    if (device not in ("cpu", "cuda") or torch.is_grad_enabled() or _global_hooks()
            or torch.compiler.is_compiling() or torch.is_autocast_enabled(device)
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
            or backends.resolve("norm", norm.backend, input_ids.device) != device
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
