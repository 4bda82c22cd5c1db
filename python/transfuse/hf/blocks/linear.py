"""Rules around dense layers: sibling projections as one GEMM, a residual add inside the following
LayerNorm, any other nn.Linear through transfuse.ops.linear; and the arguments of the fused layer
calls' linears.

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
  linear       any other torch.nn.Linear (that class only, unhooked, not used by its parent's
               rule): its forward through transfuse.ops.linear, so that on CPU tensors a
               decoding step's output projections and head run transfuse's GEMV
               (csrc/cpu/gemv.cpp) rather than torch's, which read fp32 weights at 12 GB/s on
               the AMD EPYC.

On CPU tensors the rules' float GEMMs (the projections run one by one, the dense layers before a
residual norm or a GELU) go through transfuse.ops.linear, whose fp32 and bf16 GEMMs are
transfuse's own.
"""
from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...nn import FusedLayerNorm, Int8Linear
from ...ops.linear import _own_kernel_takes
from . import common
from .common import (BACKEND_ATTR, PLAIN_TENSORS, PROJECTION_ATTR, _install, _own_hooks,
                     _rule_forward)


def _plain_linear(module):
    """An nn.Linear computing F.linear: that class, unhooked, running the class's forward or one
    of the linear forwards of the rules."""
    return type(module) is nn.Linear and not (
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
        or module._backward_pre_hooks or _own_forward(module))


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
    if x.device.type not in (common.JOINED_INT8_DEVICES if int8 else common.JOINED_GEMM_DEVICES):
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


def _linear_forward(self, x):
    return _linear(x, self.weight, self.bias, self.__dict__.get(BACKEND_ATTR))


def _patch_linear(module, names):
    return _plain_linear(module) and _install(module, _linear_forward)


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


def _linear_call_arguments(linears, x, chosen):
    """(weights, weight_scales, biases, torch_linears, int8_mode) of a fused call for `linears`
    on x where each computes what the call's Linears do: all nn.Linear of x's dtype under the
    linear or projections rule's forward or none (torch_linears: the calls transfuse.ops.linear
    leaves to torch, and those of the class's own F.linear), or all unhooked Int8Linear of one
    mode (alone or as projections); plain tensors, their biases (or None) of x's dtype. Adds the
    backends the rules chose to `chosen`. Else None."""
    int8 = type(linears[0]) is Int8Linear
    if x.device.type in (common.JOINED_INT8_DEVICES if int8 else common.JOINED_GEMM_DEVICES):
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
