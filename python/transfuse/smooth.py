"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before w8a8.

For a norm whose output goes only into linear layers (the pre-norm blocks of Llama, Mistral,
Qwen2, Qwen3, Gemma: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up), with
amax_x[j] the largest |activation| of channel j over the calibration inputs and amax_w[j] the
largest |weight| of input column j over those linears:
    s[j] = amax_x[j]^alpha / amax_w[j]^(1 - alpha)
    norm:    (offset + weight) / s  (and bias / s)      linears: W[:, j] * s[j]
so the model computes the same function (up to rounding) while the activations the linears see
are flatter. Which norm feeds which linears is found by running the calibration inputs with
hooks: a linear whose input is a norm's output tensor belongs to that norm, and a norm whose
output is used by anything else (a residual add, a view: post-norm BERT, GPT-2's Conv1D), is
returned by the model, or feeds a linear whose weight is tied to another module's, is left alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .hf.norm import NORM_RULES
from .nn import float_weight, tied_parameter_ids

MIN_SCALE = 1e-5
# Functions that only read a tensor's metadata (shape, size, dtype, ...): not a use of its values.
_METADATA_FUNCTIONS = {"size", "dim", "__get__", "numel", "is_floating_point"}


def _norm_offset(module):
    """The offset of (offset + weight) for a norm transfuse knows, or None."""
    rule = NORM_RULES.get(type(module).__name__)
    fused = rule(module) if rule else None
    if fused is None or getattr(fused, "weight", None) is None:
        return None
    return float(getattr(fused, "offset", 0.0))


class _Uses(TorchFunctionMode):
    """Marks norm outputs that reach any function other than F.linear with a linear's weight."""

    def __init__(self, outputs, weights):
        super().__init__()
        self.outputs, self.weights, self.escaped = outputs, weights, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        linear_call = func is F.linear and len(args) > 1 and id(args[1]) in self.weights
        if not linear_call and getattr(func, "__name__", "") not in _METADATA_FUNCTIONS:
            for value in list(args) + list(kwargs.values()):
                if isinstance(value, torch.Tensor) and id(value) in self.outputs:
                    self.escaped.add(self.outputs[id(value)][0])
        return func(*args, **kwargs)


def _tensors(value):
    """Every tensor in a (nested) model output: ModelOutput, dict, tuple or list."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)


def _run(model, calibration):
    """Runs the calibration inputs; yields the tensors the model returns."""
    batches = calibration if isinstance(calibration, (list, tuple)) else [calibration]
    for batch in batches:
        yield from _tensors(model(**batch) if isinstance(batch, dict) else model(batch))


def find_groups(model, calibration):
    """{norm: (linears fed only by it, amax of its output per channel)} over the calibration."""
    norms = {m for m in model.modules() if _norm_offset(m) is not None}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    outputs = {}  # id(output tensor) -> (norm, tensor): the tensor is kept so that ids stay unique
    amax, consumers = {}, {}

    def after_norm(module, inputs, output):
        channel_max = output.detach().abs().reshape(-1, output.shape[-1]).amax(0).float()
        amax[module] = torch.maximum(amax[module], channel_max) if module in amax else channel_max
        outputs[id(output)] = (module, output)  # after the reads above, which are not uses

    def before_linear(module, inputs):
        source = outputs.get(id(inputs[0]))
        if source is not None:
            consumers.setdefault(source[0], set()).add(module)

    handles = [m.register_forward_hook(after_norm) for m in norms]
    handles += [m.register_forward_pre_hook(before_linear) for m in linears]
    tracker = _Uses(outputs, {id(m.weight) for m in linears})
    try:
        with torch.no_grad(), tracker:
            for returned in _run(model, calibration):  # returned as they are: used too
                if id(returned) in outputs:
                    tracker.escaped.add(outputs[id(returned)][0])
    finally:
        for handle in handles:
            handle.remove()
    tied = tied_parameter_ids(model)
    return {norm: (list(group), amax[norm]) for norm, group in consumers.items()
            if norm not in tracker.escaped and all(id(m.weight) not in tied for m in group)}


def smooth(model, alpha, calibration):
    """Fold SmoothQuant scales into the model's norm -> linear groups, in place; returns the
    number of groups smoothed."""
    groups = find_groups(model, calibration)
    with torch.no_grad():
        for norm, (linears, amax_x) in groups.items():
            weights = [float_weight(linear) for linear in linears]
            amax_w = torch.stack([w.abs().amax(0).float() for w in weights]).amax(0)
            s = (amax_x.clamp(min=MIN_SCALE) ** alpha
                 / amax_w.clamp(min=MIN_SCALE) ** (1 - alpha)).clamp(min=MIN_SCALE)
            offset = _norm_offset(norm)
            norm.weight.copy_(((offset + norm.weight.float()) / s - offset).to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.copy_((norm.bias.float() / s).to(norm.bias.dtype))
            for w in weights:
                w.copy_((w.float() * s).to(w.dtype))
    return len(groups)
