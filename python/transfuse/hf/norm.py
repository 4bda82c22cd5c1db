"""Norm rules: HF norm class name -> function(module, backend) returning the fused replacement.

A rule returns None when the module's structure is not the one it was written for; transfuse.patch
then leaves the module alone and names it in a warning. RMSNorm classes are grouped by the casts of
their forward (see transfuse.reference.rms_norm_dtypes); every class listed was checked to have a
forward (and attribute names) identical to the family's model class in transformers 5.23:

  llama  LlamaRMSNorm:  weight * (x.float() * rsqrt(mean(x^2) + variance_epsilon)).to(x.dtype)
  gemma  GemmaRMSNorm:  (x.float() * rsqrt(mean(x^2) + eps) * (1 + weight.float())).type_as(x)
  t5     T5LayerNorm:   x * rsqrt(mean(x.float()^2) + variance_epsilon), cast to weight's dtype
                        if that is fp16/bf16, times weight
"""
from __future__ import annotations

from torch import nn

from ..nn import FusedLayerNorm, FusedRMSNorm


def layer_norm_rule(module, backend=None):
    """torch.nn.LayerNorm itself (not a subclass) over one trailing dimension."""
    if type(module) is not nn.LayerNorm or len(module.normalized_shape) != 1:
        return None
    return FusedLayerNorm.from_module(module, backend=backend)


def rms_rule(casting_mode, eps_attr, offset=0.0):
    """Rule for a transformers RMSNorm class holding only a 1-D `weight` and a float `eps_attr`."""
    def rule(module, backend=None):
        weight, eps = module._parameters.get("weight"), getattr(module, eps_attr, None)
        if (not type(module).__module__.startswith("transformers.")
                or set(module._parameters) != {"weight"} or module._buffers or module._modules
                or weight is None or weight.dim() != 1
                or isinstance(eps, bool) or not isinstance(eps, (int, float))):
            return None
        return FusedRMSNorm.from_module(module, eps, offset=offset, casting_mode=casting_mode,
                                        backend=backend)
    return rule


_llama = rms_rule("llama", eps_attr="variance_epsilon")
_gemma = rms_rule("gemma", eps_attr="eps", offset=1.0)
_t5 = rms_rule("t5", eps_attr="variance_epsilon")

NORM_RULES = {
    "LayerNorm": layer_norm_rule,  # BERT, DistilBERT, RoBERTa, GPT-2, BART, Marian, ModernBERT
    **dict.fromkeys(("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm",
                     "Qwen2MoeRMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm",
                     "GraniteRMSNorm", "SmolLM3RMSNorm", "DeepseekV3RMSNorm"), _llama),
    **dict.fromkeys(("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"), _gemma),
    **dict.fromkeys(("T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm", "LongT5LayerNorm"), _t5),
}

