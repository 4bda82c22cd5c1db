"""transfuse.patch / unpatch: swap a model's modules for fused ones, in place, and back.

Generic machinery only; which module becomes what is decided by the rule tables in transfuse.hf.
A replacement shares the original's Parameter objects (the state dict and training are unchanged)
and keeps the original module object in `_transfuse_original` (not a submodule), which is what
`unpatch` puts back.
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch
from torch import nn

from . import backends
from .hf import attention as hf_attention
from .hf import blocks as hf_blocks
from .hf import encoder_model as hf_encoder_model
from .hf import unpad as hf_unpad
from .hf.norm import NORM_RULES
from .hf.quantizer import attach_config, detach_config
from .nn import FusedLayerNorm, FusedRMSNorm, Int8Linear, float_weight, tied_parameter_ids
from .ops.int8 import MODES
from .quantize import DEFAULT_SKIP, replacements

ORIGINAL_ATTR = "_transfuse_original"
ATTENTION_ATTR = "_transfuse_previous_attention"
_FUSED_TYPES = (FusedLayerNorm, FusedRMSNorm)


def _models_in(model):
    """(name prefix, module) for each model transfuse patches in `model`: a transformers model
    itself; in another nn.Module (a SentenceTransformer or CrossEncoder, a peft model, a user's
    wrapper) the outermost transformers models inside it, or the module itself where none is;
    in a transformers Pipeline the model it runs."""
    from transformers import Pipeline, PreTrainedModel
    if isinstance(model, Pipeline):
        return [("model.", model.model)]
    if not isinstance(model, nn.Module):
        raise TypeError("model must be a torch.nn.Module or a transformers Pipeline, got "
                        f"{type(model).__name__}")
    if isinstance(model, PreTrainedModel):
        return [("", model)]
    found, inside = [], ()
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and not name.startswith(inside):
            found.append((name + ".", module))
            inside = tuple(prefix for prefix, _ in found)
    return found or [("", model)]


_SLOW_BF16 = ("transfuse: this CPU has no bf16 arithmetic (AVX512_BF16 or AMX): a bf16 model's "
              "products run widened to fp32, slower than the fp32 model's (all-MiniLM-L6-v2 in "
              "bf16 on an AMD EPYC with AVX2 alone, patched: 0.16-0.58x fp32 eager); keep fp32 "
              "weights there (int8 saves memory)")


def _warn_if_bf16_is_slow(models):
    """Once: a bf16 model on a CPU without bf16 arithmetic (`transfuse info`: neither
    cpu_gemm_bf16 nor cpu_amx)."""
    module = backends.extension()[0]
    if module is None or module.cpu_gemm_bf16 or module.cpu_amx:
        return
    if any(p.dtype == torch.bfloat16 and p.is_cpu for m in models for p in m.parameters()):
        backends.warn_once(("patch", "no bf16 arithmetic"), _SLOW_BF16)


def _children(model):
    """(parent, attribute name, child) for every child slot in the model, shared ones included."""
    for parent in model.modules():
        for name, child in parent._modules.items():
            if child is not None:
                yield parent, name, child


def _has_hooks(module):
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _replacement(module, backend):
    """(fused module or None, why None)."""
    if _has_hooks(module):
        return None, "has hooks or an overridden forward"
    if type(module).__name__ not in NORM_RULES:
        return None, "no rule"
    new = NORM_RULES[type(module).__name__](module, backend)
    return new, "" if new is not None else "structure not supported"


def _patch_attention(model):
    """Switch a transformers model to the "transfuse" attention, remembering the previous one,
    where its attention modules go through transformers' attention interface (those that do not,
    BLOOM's, or Falcon's before transformers 5.25, would never run it). Returns the attention
    modules left unchanged, as a Counter of (class name, reason)."""
    modules = hf_attention.attention_modules(model)
    if not modules or hasattr(model, ATTENTION_ATTR):
        return Counter()
    previous = None
    if any(hf_attention.calls_interface(type(m)) for m in modules):
        previous = hf_attention.set_implementation(model, hf_attention.NAME)
    reasons = [hf_attention.not_running(m, model) for m in modules]
    if previous is not None and previous != hf_attention.NAME:
        if all(reasons):  # switched, yet none of its attention modules reads the switch
            hf_attention.set_implementation(model, previous)
        else:
            object.__setattr__(model, ATTENTION_ATTR, previous)
    return Counter((type(m).__name__, why) for m, why in zip(modules, reasons) if why)


def _patch_int8(model, mode, backend, heads):
    """Linear layers become Int8Linear in `mode` (with `heads`, the output heads too, tied or
    not); the Int8Linear layers already there (an earlier patch, or transfuse.quantize) switch to
    `mode`: both modes hold the same per-channel int8 weights, so the switch is exact."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.mode = mode
    skip = () if heads else DEFAULT_SKIP
    tied = tied_parameter_ids(model)
    for parent, attribute, original, new in replacements(model, mode, skip, backend, tied=heads):
        object.__setattr__(new, ORIGINAL_ATTR, original)
        if id(float_weight(original)) in tied:
            new._register_state_dict_hook(_saved_as_tied)
        setattr(parent, attribute, new)
    attach_config(model, mode, skip)  # config.quantization_config names the new mode


def _saved_as_tied(module, state_dict, prefix, local_metadata):
    """A tied head made int8 by int8_heads saves as the float head it replaced (the shared
    weight), so that the checkpoint keeps the tie and loads back (with that head in float)."""
    del state_dict[prefix + "weight_scale"]
    state_dict[prefix + "weight"] = getattr(module, ORIGINAL_ATTR).weight.detach()


def _patch_norms(model, backend):
    """Norms with a rule become fused modules; returns the norm-like modules left unchanged, as a
    Counter of (class name, reason)."""
    replaced = {}  # id(original) -> replacement, so a module shared by two parents stays shared
    swaps, left = [], Counter()
    for parent, name, child in list(_children(model)):
        if isinstance(child, _FUSED_TYPES):  # patched before (or fused by the user)
            continue
        if id(child) not in replaced:
            new, reason = _replacement(child, backend)
            if new is None:
                if "Norm" in type(child).__name__:
                    left[(type(child).__name__, reason)] += 1
                continue
            object.__setattr__(new, ORIGINAL_ATTR, child)  # plain attribute, not a submodule
            replaced[id(child)] = new
        swaps.append((parent, name, replaced[id(child)]))
    for parent, name, new in swaps:
        setattr(parent, name, new)
    if "Norm" in type(model).__name__ and not isinstance(model, _FUSED_TYPES):
        left[(type(model).__name__, "the model itself cannot be swapped; patch its parent")] += 1
    return left


def _patch_model(model, attention, norm, int8, int8_heads, backend, unpad, blocks):
    """patch() on one model; returns the modules left unchanged, as a Counter of (class name,
    reason)."""
    left = Counter()
    if attention:
        left += _patch_attention(model)
    if int8 is not None:
        _patch_int8(model, int8, backend, int8_heads)
    if norm:
        left += _patch_norms(model, backend)
    if blocks:
        _, unfit = hf_blocks.patch_blocks(model, backend, attention)
        left += Counter({(cls, "its forward is not the one the block rule was written for"): 1
                         for cls in unfit})
        # attention outside transformers' interface that a block rule runs through transfuse's
        ruled = {type(m).__name__ for m in model.modules()
                 if m.__dict__.get(hf_blocks.FORWARD_ATTR) == "relative_bias_attention"}
        left = Counter({key: n for key, n in left.items() if key[0] not in ruled})
    if attention and unpad:  # after the block rules: a stack's rule runs inside padding removal
        hf_unpad.patch_unpad(model, unpad)
    if attention and blocks:  # last: it falls back on padding removal's forward
        hf_encoder_model.patch_encoder_models(model)
    if backend is not None:
        for module in model.modules():
            if hasattr(module, ORIGINAL_ATTR) and hasattr(module, "backend"):
                module.backend = backend
    return left


def patch(model, *, attention=True, norm=True, int8=None, int8_heads=False, backend=None,
          unpad=True, blocks=True):
    """Replace the model's modules by transfuse's fused ones, in place; returns the same model.

    norm: LayerNorm / RMSNorm modules of the families in transfuse.hf.norm.NORM_RULES become
    FusedLayerNorm / FusedRMSNorm sharing their parameters. attention: a transformers model
    switches to the "transfuse" attention implementation (transfuse.hf.attention) where its
    attention modules go through transformers' attention interface; other models are left as they
    are. Norm-like and attention modules left unchanged are named in one warning.
    unpad: with attention, padded batches of the families in transfuse.hf.unpad.UNPAD_RULES run
    as packed tokens (pad positions skipped by every layer; zeros there in last_hidden_state);
    under torch.compile they keep the padded path (the packed size is data-dependent), but with
    unpad="always", where the graph breaks around the packing (so not with fullgraph=True).
    int8: "w8a8" or "w8a16" swaps the linear layers (but the output heads of
    transfuse.quantize.DEFAULT_SKIP) for transfuse.nn.Int8Linear; the float layers are kept for
    `unpatch` (transfuse.quantize releases them, which is what saves memory); int8 layers already
    there switch to the mode asked for (exactly: both modes hold the same int8 weights). None
    leaves the linear layers as they are (float, or int8 from an earlier call).
    int8_heads: with int8, the output heads too: decoding reads the whole head every token
    (SmolLM-135M's tied 49152 x 576 head is half its fp32 bytes). A head tied to the input
    embedding gets its own int8 copy of the shared weight; the embedding keeps the float one.
    blocks: the rules of transfuse.hf.blocks.BLOCK_RULES that span a block's modules: sibling
    float projections (Q, K, V; gate, up) as one GEMM over weights sharing one storage (same
    Parameters and state dict), the residual add of BERT-style output layers inside the fused
    LayerNorm, their intermediate layers' bias add + GELU as one pass, every other nn.Linear
    through transfuse.ops.linear (on the CPU a decoding step's rows run transfuse's GEMV); a
    class whose forward reads otherwise than a rule expects is named in the warning.
    backend: passed to the new modules (None: the TRANSFUSE_BACKEND environment variable, else
    auto); checked here: an unknown or unavailable backend raises ValueError.
    Patching twice is harmless: modules replaced before are kept (a second call with backend=
    changes their backend).
    """
    if int8 is not None and int8 not in MODES:
        raise ValueError(f"int8 must be None or one of {MODES}, got {int8!r}")
    if unpad not in (True, False, "always"):
        raise ValueError(f"unpad must be True, False or 'always', got {unpad!r}")
    if not isinstance(int8_heads, bool):
        raise TypeError(f"int8_heads must be a bool, got {int8_heads!r}")
    if int8_heads and int8 is None:
        raise ValueError("int8_heads=True needs int8='w8a8' or 'w8a16'")
    backends.check_requested(backend)
    models = [inner for _, inner in _models_in(model)]
    _warn_if_bf16_is_slow(models)
    left = Counter()
    for inner in models:
        left += _patch_model(inner, attention, norm, int8, int8_heads, backend, unpad, blocks)
    if left:
        names = ", ".join(f"{cls} x{count} ({reason})"
                          for (cls, reason), count in sorted(left.items()))
        warnings.warn(f"transfuse.patch left these modules unchanged: {names}",
                      UserWarning, stacklevel=2)
    return model


def unpatch(model):
    """Put the original module objects (and attention implementation) back; returns model (any
    object patch() takes).

    The originals get the replacements' current parameters (the same objects unless a conversion
    such as .to() made new ones) and training mode.
    """
    for _, inner in _models_in(model):
        _unpatch_model(inner)
    return model


def _unpatch_model(model):
    if hasattr(model, ATTENTION_ATTR):
        hf_attention.set_implementation(model, model.__dict__.pop(ATTENTION_ATTR))
    hf_encoder_model.unpatch_encoder_models(model)  # (gives padding removal its forward back)
    hf_unpad.unpatch_unpad(model)
    for parent, name, child in list(_children(model)):
        original = getattr(child, ORIGINAL_ATTR, None)
        if original is None:
            continue
        for pname, param in child._parameters.items():
            if pname in original._parameters and original._parameters[pname] is not param:
                original._parameters[pname] = param
        original.train(child.training)
        setattr(parent, name, original)
    hf_blocks.unpatch_blocks(model)  # after the swaps: originals put back may carry block forwards
    detach_config(model)


def patched_modules(model) -> dict:
    """Qualified module name -> what replaced it, for every module transfuse.patch swapped in;
    "<attention>": the attention modules that run the "transfuse" attention (names are relative
    to `model`, any object patch() takes: "<prefix><attention>" for a model inside it)."""
    found = {}
    for prefix, inner in _models_in(model):
        found.update(_patched_in(inner, prefix))
    return found


def _patched_in(model, prefix) -> dict:
    found = {}
    if hasattr(model, ATTENTION_ATTR):
        running = Counter(type(m).__name__ for m in hf_attention.attention_modules(model)
                          if not hf_attention.not_running(m, model))
        if running:
            found[f"{prefix}<attention>"] = (f"{hf_attention.NAME} attention replacing "
                                    f"{getattr(model, ATTENTION_ATTR)} in "
                                    + ", ".join(f"{c} x{n}" for c, n in sorted(running.items())))
    for name, module in model.named_modules(remove_duplicate=False, prefix=prefix.rstrip(".")):
        if (hf_unpad.FORWARD_ATTR in module.__dict__
                and type(module).__name__ in hf_unpad.UNPAD_RULES):
            found[f"{name or '<model>'}<unpad>"] = "padding removal (transfuse.hf.unpad)"
        if hf_encoder_model.FORWARD_ATTR in module.__dict__:
            found[f"{name or '<model>'}<encoder_model>"] = "model rule (transfuse.hf.encoder_model)"
        if (hf_blocks.FORWARD_ATTR in module.__dict__
                and type(module).__name__ in hf_blocks.BLOCK_RULES
                and hf_blocks.PROJECTION_ATTR not in module.__dict__):  # (listed as its parent)
            found[f"{name}<block>"] = f"block rule {module.__dict__[hf_blocks.FORWARD_ATTR]!r}"
        original = getattr(module, ORIGINAL_ATTR, None)
        if original is not None:
            detail, mode = "", ""
            if isinstance(module, FusedRMSNorm):
                detail = f"(casting_mode={module.casting_mode!r}, offset={module.offset})"
            if isinstance(module, Int8Linear):
                mode = f" (mode={module.mode!r})"
            found[name] = (f"{type(module).__name__}{detail} replacing "
                           f"{type(original).__name__}{mode}")
    return found
