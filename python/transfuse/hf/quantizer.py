"""transformers integration of the int8 quantization: `Int8Config` and its HfQuantizer.

    config = transfuse.Int8Config("w8a8")            # or "w8a16"; skip=("lm_head", ...)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    model.save_pretrained(out)              # safetensors: int8 weight + fp32 weight_scale
    model = AutoModelForCausalLM.from_pretrained(out)   # int8 again, from config.json

Quantizing on load gives exactly `transfuse.quantize(<the float model>, mode, skip=skip)`: the same
layers (chosen by transfuse.quantize.replacements) become transfuse.nn.Int8Linear, and each float
weight goes through the same per-output-channel quantization (Int8Linear.from_float's). A saved
model is loaded back as int8: the layers are rebuilt before the weights load and their `weight`
(int8) and `weight_scale` (fp32) buffers are read as they are. Training adapters over the frozen
int8 base is allowed (`is_trainable`); biases stay trainable Parameters. A layer whose weight
transformers ties to another module's (GPT-2's lm_head with skip=()) stays float, as in
transfuse.quantize; here it is found from the model's tied-weight keys (the loader ties the
weights only after this step) and named in a warning.

transformers hooks relied on (checked against transformers 5.17 and 5.24; the HfQuantizer API
moves between versions):
- `transformers.quantizers.register_quantization_config(name)` / `register_quantizer(name)`: add
  `quant_method=NAME` to AUTO_QUANTIZATION_CONFIG_MAPPING / AUTO_QUANTIZER_MAPPING, which both
  `quantization_config=` and a checkpoint's config.json are dispatched through.
- `HfQuantizer._process_model_before_weight_loading(model)`: run on the meta-device model (for
  quantize-on-load and for a pre-quantized checkpoint alike) to swap in Int8Linear layers.
- `HfQuantizer.param_needs_quantization(model, name)` + `get_quantize_ops()`: for quantize-on-load,
  the loader hands each float `<layer>.weight` to a `core_model_loading.ConversionOps` whose
  `convert()` returns `{<layer>.weight: int8, <layer>.weight_scale: fp32}`; pre-quantized tensors
  load unconverted (`HfQuantizer.get_new_dtype` leaves int8 alone and the fp32 scales keep the
  buffers' dtype). transformers 5.17 casts every loaded tensor to the dtype of the model's tensor
  before the conversion runs, so for quantize-on-load the Int8Linear weights are placeholders of
  the float layer's dtype until the int8 result replaces them (an int8 placeholder gave all-zero
  weights there).
- `is_serializable()` (save_pretrained refuses otherwise) and the default
  `get_state_dict_and_metadata` (the module state dict, which holds the int8 buffers);
  `is_trainable` (Trainer's check before fine-tuning a quantized model).
transformers is optional: without it Int8Config is a plain class and `register()` does nothing.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..nn import Int8Linear
from ..ops import quantize_per_token
from ..quantize import DEFAULT_SKIP, check_arguments, replacements

NAME = "transfuse_int8"

try:
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers import auto as _auto
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError:  # transformers (>= 5.0) is optional
    ConversionOps = HfQuantizer = QuantizationConfigMixin = _auto = None


class Int8Config(QuantizationConfigMixin or object):
    """`quantization_config=` for from_pretrained: the model's linear layers (nn.Linear and
    transformers' Conv1D) become transfuse.nn.Int8Linear in `mode` ("w8a8": int8 weights and
    per-token int8 activations; "w8a16": weight-only), except those with a part of their
    qualified name in `skip` (the output heads by default), as transfuse.quantize does."""

    def __init__(self, mode="w8a8", skip=DEFAULT_SKIP, quant_method=NAME):
        if quant_method != NAME:
            raise ValueError(f"quant_method must be {NAME!r}, got {quant_method!r}")
        if isinstance(skip, (str, bytes)) or not hasattr(skip, "__iter__"):
            raise TypeError(f"skip must be a sequence of module names, got {skip!r}")
        skip = tuple(skip)
        check_arguments(mode, skip)
        self.quant_method = NAME
        self.mode = mode
        self.skip = skip

    def to_dict(self):
        return {"quant_method": NAME, "mode": self.mode, "skip": list(self.skip)}

    def __repr__(self):
        return f"Int8Config(mode={self.mode!r}, skip={self.skip!r})"


if HfQuantizer is not None:

    class Int8Quantize(ConversionOps):
        """Quantize-on-load of one float `<layer>.weight` ([out, in]; [in, out] for a layer that
        was a Conv1D) into the layer's int8 `weight` and fp32 `weight_scale`, exactly as
        Int8Linear.from_float does."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
            key, value = next(iter(input_dict.items()))
            value = value[0] if isinstance(value, (list, tuple)) else value
            prefix = key.rpartition(".")[0]
            layer = model.get_submodule(prefix) if prefix else model
            if id(layer) in self.hf_quantizer.transposed:
                value = value.T
            weight, scale = quantize_per_token(value.detach().float(), backend="reference")
            self.hf_quantizer.converted.add(id(layer))
            return {key: weight, f"{prefix}.weight_scale" if prefix else "weight_scale": scale}

    class Int8HfQuantizer(HfQuantizer):
        """The HfQuantizer of Int8Config (see the module docstring for the hooks it fills)."""

        requires_calibration = False
        serialized_names = {"weight": ["weight", "weight_scale"]}

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.transposed = set()  # ids of the Int8Linear layers that replaced a Conv1D
            self.converted = set()   # ids of the Int8Linear layers Int8Quantize has converted

        @property
        def quantized_element_size(self):
            return 1

        def validate_environment(self, *args, **kwargs):
            # the config's attributes may have been changed since (QuantizationConfigMixin.update)
            check_arguments(self.quantization_config.mode, self.quantization_config.skip)

        def _process_model_before_weight_loading(self, model, **kwargs):
            config = self.quantization_config
            tied = _tied_modules(model)
            names = {}
            for name, module in model.named_modules(remove_duplicate=False):
                names.setdefault(id(module), set()).add(name)
            kept = set()
            for parent, attribute, original, new in replacements(model, config.mode,
                                                                 config.skip, None):
                if names[id(original)] & tied:
                    kept |= names[id(original)] & tied
                    continue
                if not isinstance(original, nn.Linear):  # a Conv1D: its weight is [in, out]
                    self.transposed.add(id(new))
                if not self.pre_quantized:
                    # the float checkpoint weight must reach Int8Quantize unconverted: some
                    # transformers versions (5.17) cast each loaded tensor to the dtype of the
                    # model's (meta) tensor first, which for an int8 buffer truncates it to zeros.
                    # A placeholder of the float layer's dtype (the dtype the model is loaded in,
                    # as transfuse.quantize of that model sees it) makes that cast the one
                    # transformers applies to float weights; the quantized weight replaces it.
                    new._buffers["weight"] = torch.empty(new.weight.shape,
                                                         dtype=original.weight.dtype,
                                                         device=new.weight.device)
                setattr(parent, attribute, new)
            if kept:
                warnings.warn(f"transfuse: {sorted(kept)} share their weight with another module "
                              "(tied weights) and stay in float", stacklevel=2)
            return model

        def param_needs_quantization(self, model, param_name, **kwargs):
            if self.pre_quantized:
                return False
            prefix, _, name = param_name.rpartition(".")
            try:
                module = model.get_submodule(prefix)
            except AttributeError:
                return False
            return isinstance(module, Int8Linear) and name == "weight"

        def get_quantize_ops(self):
            return Int8Quantize(self)

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name, module in model.named_modules():
                if isinstance(module, Int8Linear) and module.weight.dtype != torch.int8:
                    if module.weight.is_meta:
                        raise RuntimeError(f"transfuse: {name}.weight was not loaded")
                    if id(module) in self.converted:
                        # quantized, then cast by the loader to the placeholder's dtype (5.17):
                        # integers in [-127, 127], exact in any float dtype
                        module._buffers["weight"] = module.weight.detach().to(torch.int8)
                        continue
                    # a weight the checkpoint did not hold (initialized in float): quantize it
                    weight = module.weight.T if id(module) in self.transposed else module.weight
                    q, scale = quantize_per_token(weight.detach().float(), backend="reference")
                    module._buffers["weight"] = q
                    module._buffers["weight_scale"] = scale
            self.transposed.clear()
            self.converted.clear()
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return True

else:
    Int8HfQuantizer = None


def _tied_modules(model):
    """Qualified names of the modules whose weight transformers ties to another's (both sides).
    Such a layer is never quantized on load: its weight is not in the checkpoint, and the tying
    done after loading needs a float Parameter there."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {key.rpartition(".")[0] for pair in tied.items() for key in pair}


def _register(mapping, register_fn, cls):
    """Add cls under NAME; a class of this module already there (an earlier import or a reload)
    is replaced, anything else registered under NAME is left alone with a warning."""
    current = mapping.get(NAME)
    if current is None:
        register_fn(NAME)(cls)
    elif current is not cls:
        if getattr(current, "__module__", None) == __name__ and current.__name__ == cls.__name__:
            mapping[NAME] = cls
        else:
            warnings.warn(f"transfuse: {NAME!r} is already registered with transformers as "
                          f"{current!r}; Int8Config will not load through from_pretrained",
                          stacklevel=3)


def register():
    """Register Int8Config and its quantizer with transformers (idempotent); returns "" or, when
    transformers is missing, why nothing was registered."""
    if _auto is None:
        return "transformers (>= 5.0) is not installed"
    _register(_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, _auto.register_quantization_config,
              Int8Config)
    _register(_auto.AUTO_QUANTIZER_MAPPING, _auto.register_quantizer, Int8HfQuantizer)
    return ""
