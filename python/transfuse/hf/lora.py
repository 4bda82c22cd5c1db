"""peft LoRA over transfuse's int8 layers (LoRA / QLoRA-style fine-tuning of a frozen int8 base).

    from peft import PeftModel, get_peft_model
    from transfuse.hf.lora import lora_config

    model = transfuse.quantize(model, "w8a16")          # or transfuse.patch(model, int8=...)
    model = get_peft_model(model, lora_config(r=8, target_modules=["q_proj", "v_proj"]))
    Trainer(model, args, ...).train()                   # only the adapters train
    model.save_pretrained(out)                          # the adapter, as peft writes any
    model = PeftModel.from_pretrained(base, out, config=lora_config(out))
    merged = model.merge_and_unload()                   # int8 again, adapter folded in

Why a config helper: peft picks the LoRA layer for a module from a fixed list of dispatchers
(nn.Linear, Conv1D, bitsandbytes, GPTQ, ...); a third-party layer such as transfuse.nn.Int8Linear
(an nn.Module holding int8 buffers, not an nn.Linear) gets one only through
`LoraConfig._register_custom_module({Int8Linear: Int8LoraLinear})`, peft's documented (marked
experimental) way for custom layers. The mapping lives on the config object and is not written
to adapter_config.json, so a saved adapter is loaded with a registered config again
(`config=lora_config(path)`). Nothing of peft is patched. Float layers (nn.Linear, also those of
a transfuse.patch-ed model) keep peft's own LoRA layers: the mapping covers Int8Linear only.

Int8LoraLinear is peft's lora.Linear (same forward: base(x) + B(A(dropout(x))) * scaling, same
adapter parameters lora_A / lora_B and state-dict keys) with merging done as bitsandbytes' 8-bit
LoRA layer does it: merge() dequantizes the base weight (weight * weight_scale), adds
B @ A * scaling, and quantizes the sum per output channel again (Int8Linear.set_float_weight, the
rounding of transfuse.quantize), so merge_and_unload() gives an int8 model whose layers hold
exactly transfuse.quantize(<dequantized weights + deltas>); unmerge() subtracts the same way (the
rounding of both steps stays: unmerging does not give back the original int8 weights bit for bit,
as with bitsandbytes). Int8Linear's weight is [out, in] whatever layer it came from (GPT-2's Conv1D
included), so `fan_in_fan_out` does not apply. Plain LoRA only: variants (DoRA, aLoRA, ...) and
initializations computed from the float base weight (PiSSA, OLoRA, LoftQ, CorDA, orthogonal, ...)
raise ValueError. peft's `target_modules="all-linear"` selects nn.Linear / Conv1D by class and
therefore no Int8Linear: name the layers, or take them all with `target_modules=int8_layers(model)`.
Quantize first, then add adapters: transfuse.quantize / patch(int8=) on a peft model would turn
its adapters' own nn.Linear layers (lora_A, lora_B) into frozen int8 ones too.
"""
from __future__ import annotations

import warnings

import torch

try:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as _LoraLinear
    from peft.tuners.tuners_utils import check_adapters_to_merge
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("transfuse.hf.lora needs peft: pip install peft") from error

from ..nn import Int8Linear


class Int8LoraLinear(_LoraLinear):
    """peft's LoRA layer over a transfuse.nn.Int8Linear (frozen int8 base, float adapter)."""

    def __init__(self, base_layer, adapter_name, config, **kwargs):
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False  # Int8Linear.weight is [out, in] always

    def _get_in_out_features(self, module):
        # (peft's lookup knows its own layer types only and warns "Unsupported layer type")
        return module.in_features, module.out_features

    def update_layer(self, adapter_name, *args, config, **kwargs):
        """(peft's, for each adapter added) after checking the config's initialization."""
        init = config.init_lora_weights
        if not (init is True or init is False or init == "gaussian"):
            raise ValueError(f"init_lora_weights={init!r} derives the adapter from the float base "
                             "weight, which an int8 layer does not have; over "
                             "transfuse.nn.Int8Linear use True, False or 'gaussian'")
        super().update_layer(adapter_name, *args, config=config, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(f"LoRA over transfuse.nn.Int8Linear is plain LoRA: the config asks "
                             f"for {type(variant).__name__}, which is not supported there")
        return None

    def _fold(self, names, sign):
        """(dequantize(W) + sign * sum of B @ A * scaling, the bias + sign * sum of B.bias *
        scaling or None where no adapter has a bias) for the adapters `names`, in fp32."""
        base = self.get_base_layer()
        weight, bias = base.dequantized_weight(), None
        with torch.no_grad():
            for name in names:
                weight = weight + sign * self.get_delta_weight(name).float().to(weight.device)
                if self.lora_bias[name]:
                    if base.bias is None:
                        raise RuntimeError("cannot merge a LoRA with lora_bias=True into a layer "
                                           "without a bias")
                    bias = base.bias.float() if bias is None else bias
                    bias = bias + sign * self.lora_B[name].bias.float() * self.scaling[name]
        return weight, bias

    def _store(self, weight, bias):
        base = self.get_base_layer()
        base.set_float_weight(weight)
        if bias is not None:
            with torch.no_grad():
                base.bias.copy_(bias)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Fold the adapters into the int8 weights: W = quantize(dequantize(W) + B @ A * scaling)
        per output channel. safe_merge: raise ValueError, leaving the layer as it was, when the
        sum is not finite."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if not names:
            return
        weight, bias = self._fold(names, 1)
        if safe_merge and not (torch.isfinite(weight).all()
                               and (bias is None or torch.isfinite(bias).all())):
            raise ValueError(f"NaNs detected in the merged weights. The adapter(s) {names} seem "
                             "to be broken")
        self._store(weight, bias)
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Take the merged adapters out again: W = quantize(dequantize(W) - B @ A * scaling)
        (the int8 rounding of merge and of this step stays)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        names = [n for n in reversed(self.merged_adapters) if n in self.lora_A]
        self._store(*self._fold(names, -1))
        self.merged_adapters.clear()


def _register(config):
    config._register_custom_module({Int8Linear: Int8LoraLinear})
    return config


def lora_config(config=None, **kwargs) -> LoraConfig:
    """A peft LoraConfig whose LoRA layers over transfuse.nn.Int8Linear are Int8LoraLinear.

    lora_config(**kwargs): LoraConfig(**kwargs). lora_config(path, **kwargs): the saved adapter's
    config, LoraConfig.from_pretrained(path, **kwargs) (a directory or a Hub id), for
    PeftModel.from_pretrained(model, path, config=...). lora_config(a LoraConfig): that object
    (kwargs not allowed), registered in place.
    """
    if config is None:
        return _register(LoraConfig(**kwargs))
    if isinstance(config, LoraConfig):
        if kwargs:
            raise TypeError("lora_config(config) takes no other arguments")
        return _register(config)
    if isinstance(config, str) or hasattr(config, "__fspath__"):
        return _register(LoraConfig.from_pretrained(str(config), **kwargs))
    raise TypeError(f"config must be None, a peft LoraConfig or a path, got "
                    f"{type(config).__name__}")


def int8_layers(model) -> list:
    """The qualified names of `model`'s transfuse.nn.Int8Linear layers: target_modules for LoRA on
    all of them (peft's "all-linear" shorthand picks layers by class and finds none of them)."""
    return [name for name, module in model.named_modules() if isinstance(module, Int8Linear)]
