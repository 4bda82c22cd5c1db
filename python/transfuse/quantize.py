"""transfuse.quantize: a model's linear layers become transfuse.nn.Int8Linear, in place.

Every nn.Linear (and transformers Conv1D, GPT-2's) is quantized per output channel, except those
whose qualified name has a part listed in `skip` (by default the output heads: lm_head, classifier,
score, whose precision decides the predictions), those whose weight is tied to another module's (an
lm_head sharing the embedding) and those an Int8Linear cannot stand in for (not_replaceable:
torch's MultiheadAttention's out_proj, Linear subclasses with a forward of their own). The float
weights are released; the model keeps working in its dtype. A transformers model also gets
`config.quantization_config` (a transfuse.Int8Config) and `hf_quantizer`, as
from_pretrained(quantization_config=...) gives: its save_pretrained checkpoint loads back as this
int8 model with a plain from_pretrained.
"""
from __future__ import annotations

from torch import nn

from .nn import Int8Linear, float_weight, tied_parameter_ids
from .ops.int8 import MODES
from .smooth import smooth

DEFAULT_SKIP = ("lm_head", "classifier", "score")
# SmoothQuant's migration strength where calibration inputs are given: the paper's balance point
# "for most models" (Xiao et al., 2023, section 4.2).
DEFAULT_SMOOTH_ALPHA = 0.5


def check_arguments(mode, skip):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(skip, str) or not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip must be a sequence of module names, got {skip!r}")


def _adapter_modules(model):
    """ids of the modules inside peft adapter layers (BaseTunerLayer subclasses) but their base
    layer: the adapters' own linear layers (lora_A, lora_B) stay float and trainable. A float base
    layer under an adapter raises: quantize first, then add the adapters."""
    ids = set()
    for name, module in model.named_modules():
        if not any(c.__name__ == "BaseTunerLayer" for c in type(module).__mro__):
            continue
        base = getattr(module, "base_layer", None)
        if base is not None and not isinstance(base, Int8Linear) and float_weight(base) is not None:
            raise ValueError(f"{name} is a peft adapter over a float linear layer: quantize the "
                             "model first, then add the adapters (transfuse.hf.lora.lora_config)")
        for child in module.children():
            if child is not base:
                ids.update(id(m) for m in child.modules())
    return ids


def not_replaceable(model):
    """ids of the linear layers an Int8Linear cannot stand in for: torch's nn.MultiheadAttention's
    out_proj, whose weight its parent hands to F.multi_head_attention_forward instead of calling
    it (SigLIP's pooling head), and nn.Linear subclasses with a forward of their own (Llama 4's
    MoE router returns scores and logits)."""
    ids = set()
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            ids.add(id(m.out_proj))
        elif isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward:
            ids.add(id(m))
    return ids


def replacements(model, mode, skip, backend, *, tied=False):
    """(parent, attribute, original, Int8Linear) for every linear layer to quantize; a layer
    shared by two parents gets one replacement. tied: also the layers whose weight another module
    holds (a head tied to the embedding): the int8 layer quantizes a copy, the other module keeps
    the float weight."""
    names, tied_ids = {}, tied_parameter_ids(model)
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    left = _adapter_modules(model) | not_replaceable(model)
    made, swaps = {}, []
    for parent in list(model.modules()):
        for attribute, child in parent._modules.items():
            if child is None or isinstance(child, Int8Linear) or float_weight(child) is None:
                continue
            if id(child) in left:
                continue
            if set(names[id(child)].split(".")) & set(skip):
                continue
            if id(child.weight) in tied_ids and not tied:  # tied to an embedding: stays float
                continue
            if id(child) not in made:
                made[id(child)] = Int8Linear.from_float(child, mode, backend)
            swaps.append((parent, attribute, child, made[id(child)]))
    return swaps


def quantize(model, mode="w8a8", *, skip=DEFAULT_SKIP, smooth_alpha="auto", calibration=None,
             backend=None):
    """Replace the model's linear layers by Int8Linear in `mode` ("w8a8" or "w8a16"), in place;
    returns the model. `skip`: module names (any part of the qualified name) left in float.

    `calibration`, a few sample inputs (a tensor of input ids, a dict of model keyword arguments,
    or a list of either), turns on SmoothQuant (transfuse.smooth) before a w8a8 swap: with
    smooth_alpha "auto" (the default) at alpha 0.5 where `calibration` is given and the mode is
    w8a8, else not; a number in [0, 1] applies it at that alpha in either mode (it then needs
    `calibration`); None never does. It smooths only where the fold leaves the model's function
    unchanged (a norm feeding linear layers alone: pre-norm blocks).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_arguments(mode, skip)
    if smooth_alpha == "auto":
        smooth_alpha = DEFAULT_SMOOTH_ALPHA if calibration is not None and mode == "w8a8" else None
    if smooth_alpha is not None:
        if isinstance(smooth_alpha, bool) or not isinstance(smooth_alpha, (int, float)) or not (
                0.0 <= smooth_alpha <= 1.0):
            raise ValueError(f"smooth_alpha must be 'auto', None or a number in [0, 1], got "
                             f"{smooth_alpha!r}")
        if calibration is None:
            raise ValueError("smooth_alpha needs calibration= sample inputs")
        smooth(model, float(smooth_alpha), calibration)
    for parent, attribute, _, new in replacements(model, mode, skip, backend):
        setattr(parent, attribute, new)
    from .hf.quantizer import attach_config  # (transfuse.hf.quantizer imports this module)
    attach_config(model, mode, skip)
    return model
