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
- `is_serializable()` (save_pretrained refuses otherwise) and `get_state_dict_and_metadata`
  (save_pretrained's first step; here it checks that the config rebuilds exactly the model's int8
  layers, then lets the module state dict, which holds the int8 buffers, be written);
  `is_trainable` (Trainer's check before fine-tuning a quantized model).
- `_process_model_before_weight_loading` also gets `checkpoint_files`: their safetensors headers
  are checked there (dtype and shape of every tensor of an int8 layer, none missing; no int8 data
  for a layer left float), before transformers casts a tensor to the dtype of the model's (a float
  tensor stored where int8 belongs would be truncated to int8 without a word) or leaves a missing
  one uninitialized (it only logs it; it cannot initialize an Int8Linear). After loading, the int8
  layers' tensors are checked again (loaded, i.e. marked `_is_hf_initialized` by the loader, when
  the header could not tell; dtype; shape), and every tensor of the model must keep the shape of
  the model built from the config (transformers 5.17 does not report a wrong shape when a
  quantizer is active).

A model quantized outside from_pretrained (transfuse.quantize, transfuse.patch(int8=)) gets the
same `config.quantization_config` and `hf_quantizer` from `attach_config`, so that save_pretrained
writes a checkpoint that from_pretrained rebuilds; `detach_config` takes them away again once no
int8 layer is left. Not detectable from here: a plain from_pretrained of an int8 checkpoint whose
quantization_config was removed, or names a quant_method transformers does not know (transfuse not
imported, say), runs no quantizer at all: transformers casts the int8 weights to float and only logs
the `weight_scale` keys as unexpected.
transformers is optional: without it Int8Config is a plain class and `register()` does nothing.
"""
from __future__ import annotations

import json
import sys
import warnings

import torch
from torch import nn

from ..nn import Int8Linear, float_weight, tied_parameter_ids
from ..ops import quantize_per_token
from ..quantize import DEFAULT_SKIP, check_arguments, not_replaceable, replacements

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
        """Quantize-on-load of float `<layer>.weight` tensors ([out, in]; [in, out] for a layer
        that was a Conv1D) into each layer's int8 `weight` and fp32 `weight_scale`, exactly as
        Int8Linear.from_float does: every entry of the call's input (one, or several where
        transformers split a checkpoint's fused tensor, NomicBERT's Wqkv into q, k and v)."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
            out = {}
            for key, value in input_dict.items():
                value = value[0] if isinstance(value, (list, tuple)) else value
                prefix = key.rpartition(".")[0]
                layer = model.get_submodule(prefix) if prefix else model
                if id(layer) in self.hf_quantizer.transposed:
                    value = value.T
                weight, scale = quantize_per_token(value.detach().float(), backend="reference")
                self.hf_quantizer.converted.add(id(layer))
                out.update({key: weight,
                            f"{prefix}.weight_scale" if prefix else "weight_scale": scale})
            return out

    class Int8HfQuantizer(HfQuantizer):
        """The HfQuantizer of Int8Config (see the module docstring for the hooks it fills)."""

        requires_calibration = False
        serialized_names = {"weight": ["weight", "weight_scale"]}

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.transposed = set()  # ids of the Int8Linear layers that replaced a Conv1D
            self.converted = set()   # ids of the Int8Linear layers Int8Quantize has converted
            self.shapes = {}         # state-dict key -> shape of the model built from the config
            self.present = False     # every tensor of the int8 layers seen in the checkpoint

        @property
        def quantized_element_size(self):
            return 1

        @property
        def is_compileable(self):
            # Int8Linear's ops are torch custom ops with fake kernels: generate() may compile the
            # forward (a static cache) as for an unquantized model.
            return True

        def validate_environment(self, *args, **kwargs):
            # the config's attributes may have been changed since (QuantizationConfigMixin.update)
            check_arguments(self.quantization_config.mode, self.quantization_config.skip)

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
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
            self.shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
            self._check_checkpoint(model, _safetensors_header(checkpoint_files))
            return model

        def _check_checkpoint(self, model, header):
            """The checkpoint's tensors (header: key -> (safetensors dtype, shape)) against the
            layers just built. An int8 layer of a pre-quantized checkpoint needs an I8 `weight`
            [out, in], an F32 `weight_scale` [out] and a float `bias` [out] if it has one (none
            of them could be initialized); a layer quantized on load needs its float weight (and
            bias); a layer left float must hold neither int8 weights nor scales. Keys are
            matched with and without the model's base_model_prefix, as transformers does; when
            some key matches nothing (a checkpoint transformers renames), missing tensors are left
            to the checks after loading."""
            config = self.quantization_config
            modules = dict(model.named_modules())
            prefix = getattr(model, "base_model_prefix", "")
            found, all_found = set(), True
            for key, (dtype, shape) in header.items():
                owner, _, tensor = key.rpartition(".")
                owner = next((name for name in (owner, f"{prefix}.{owner}" if owner else prefix,
                                                owner.removeprefix(f"{prefix}."))
                              if name in modules), None)
                module = modules.get(owner)
                name = f"{owner}.{tensor}" if owner else tensor
                found.add(name)
                all_found &= name in self.shapes
                if tensor not in ("weight", "weight_scale", "bias") or module is None or not (
                        isinstance(module, Int8Linear) or float_weight(module) is not None):
                    continue
                is_float = dtype.startswith(("F", "BF"))
                if isinstance(module, Int8Linear) and self.pre_quantized:
                    want = {"weight": ("I8", (module.out_features, module.in_features)),
                            "weight_scale": ("F32", (module.out_features,)),
                            "bias": (dtype if is_float else "float", (module.out_features,))}
                    want = want[tensor]
                    if (dtype, shape) != want:
                        raise ValueError(
                            f"transfuse: checkpoint tensor {key!r} is {dtype} {list(shape)}; the "
                            f"int8 layer {owner!r} of {config!r} needs {want[0]} {list(want[1])}")
                elif tensor == "weight_scale" or tensor == "weight" and not is_float:
                    layer = "a layer quantized on load" if isinstance(module, Int8Linear) \
                        else "a float layer"
                    why = ("its config.json has no transfuse quantization_config (removed, or its "
                           "quant_method changed?): restore it rather than passing "
                           "quantization_config=") if not self.pre_quantized else \
                        "the config's skip must name the same layers as when it was saved"
                    raise ValueError(
                        f"transfuse: checkpoint tensor {key!r} ({dtype} {list(shape)}) belongs "
                        f"to an int8 layer, but {owner!r} is {layer} under {config!r}; {why}")
            if not (header and all_found):
                return
            self.present = True
            needed = ("weight", "bias") + (("weight_scale",) if self.pre_quantized else ())
            for owner, module in modules.items():
                for tensor in needed if isinstance(module, Int8Linear) else ():
                    name = f"{owner}.{tensor}"
                    if name not in found and (tensor != "bias" or module.bias is not None):
                        raise ValueError(f"transfuse: {name} is not in the checkpoint (int8 layer "
                                         f"{owner!r} of {config!r}){self._missing_hint()}")

        def _missing_hint(self):
            return "" if self.pre_quantized else (": a layer quantized on load needs its float "
                                                  "tensors (or name it in skip to leave it float)")

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
                if isinstance(module, Int8Linear):
                    self._finish_layer(name, module)
            for key, value in model.state_dict().items():
                shape = self.shapes.get(key)
                if shape is not None and tuple(value.shape) != shape:
                    raise ValueError(f"transfuse: checkpoint tensor {key!r} has shape "
                                     f"{list(value.shape)}; the model needs {list(shape)}")
            self.transposed.clear()
            self.converted.clear()
            self.shapes, self.present = {}, False
            return model

        def _finish_layer(self, name, module):
            """After loading: the int8 weight of a layer quantized on load back to int8 (5.17),
            then its tensors loaded, unless the checkpoint's header showed them all (transformers
            cannot initialize a missing one: it would stay uninitialized memory; it marks what it
            loaded `_is_hf_initialized`, a mark lost if accelerate moves a buffer), with their
            dtypes and shapes (a tensor on the meta device was offloaded by device_map and is not
            checked here)."""
            if id(module) in self.converted and module.weight.dtype != torch.int8:
                # quantized, then cast by the loader to the placeholder's dtype (5.17): integers
                # in [-127, 127], exact in any float dtype
                loaded = getattr(module.weight, "_is_hf_initialized", False)
                module._buffers["weight"] = module.weight.detach().to(torch.int8)
                module.weight._is_hf_initialized = loaded
            if module.weight.is_meta and module.weight.dtype != torch.int8:
                raise RuntimeError(f"transfuse: {name}.weight was not loaded")
            expected = {"weight": (torch.int8, (module.out_features, module.in_features)),
                        "weight_scale": (torch.float32, (module.out_features,)),
                        "bias": (None, (module.out_features,))}
            for tensor_name, (dtype, shape) in expected.items():
                tensor = getattr(module, tensor_name)
                if tensor is None or tensor.is_meta:
                    continue
                dtype = dtype or tensor.dtype
                if not self.present and not getattr(tensor, "_is_hf_initialized", False):
                    raise ValueError(f"transfuse: {name}.{tensor_name} is not in the checkpoint "
                                     f"(left uninitialized by the loader){self._missing_hint()}")
                if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                    raise ValueError(
                        f"transfuse: checkpoint tensor {name}.{tensor_name} loaded as "
                        f"{tensor.dtype} {list(tensor.shape)}; {name} needs {dtype} {list(shape)}")

        def get_state_dict_and_metadata(self, model):
            check_layers(model, self.quantization_config)
            return super().get_state_dict_and_metadata(model)

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return True

else:
    Int8HfQuantizer = None


def _safetensors_header(files):
    """checkpoint key -> (safetensors dtype name, shape) over `files`, read from each file's JSON
    header; {} unless every file is a .safetensors one."""
    files = [str(file) for file in files or ()]
    if not files or not all(file.endswith(".safetensors") for file in files):
        return {}
    header = {}
    for file in files:
        with open(file, "rb") as f:
            entries = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.update({key: (entry["dtype"], tuple(entry["shape"]))
                       for key, entry in entries.items() if key != "__metadata__"})
    return header


def check_layers(model, config):
    """Raise ValueError unless from_pretrained with `config` (an Int8Config) rebuilds exactly the
    int8 layers of `model`: every Int8Linear in config.mode with an int8 weight and fp32 scales,
    none named in config.skip, and every float linear layer named in skip or tied to another
    module's weight."""
    skip, tied = set(config.skip), tied_parameter_ids(model)
    left_float = not_replaceable(model)
    for name, module in model.named_modules():
        skipped = bool(set(name.split(".")) & skip)
        if isinstance(module, Int8Linear):
            if skipped:
                problem = f"is named in skip={config.skip}"
            elif module.mode != config.mode:
                problem = f"runs mode={module.mode!r}"
            elif (module.weight.dtype, module.weight_scale.dtype) != (torch.int8, torch.float32):
                problem = f"holds {module.weight.dtype} / {module.weight_scale.dtype} tensors"
            else:
                continue
            raise ValueError(f"transfuse: the int8 layer {name!r} {problem}: the model's "
                             f"quantization_config {config!r} would not rebuild it on loading")
        if (float_weight(module) is not None and not skipped and id(module.weight) not in tied
                and id(module) not in left_float):
            raise ValueError(f"transfuse: the float layer {name!r} is not named in skip: the "
                             f"model's quantization_config {config!r} would rebuild it as int8 "
                             "on loading")


def _outermost_pretrained(model):
    """The transformers PreTrainedModels in `model` (itself included) not inside another one."""
    modeling = sys.modules.get("transformers.modeling_utils")  # not imported: no such model
    if modeling is None:
        return []
    found = []
    for name, module in model.named_modules():
        if isinstance(module, modeling.PreTrainedModel) and not any(
                outer == "" or name.startswith(f"{outer}.") for outer, _ in found):
            found.append((name, module))
    return [module for _, module in found]


def attach_config(model, mode, skip):
    """Give the transformers models in `model`, quantized outside from_pretrained
    (transfuse.quantize, transfuse.patch(int8=)), what from_pretrained gives a model it quantized:
    `config.quantization_config` (an Int8Config, which save_pretrained writes to config.json and
    from_pretrained rebuilds the int8 layers from) and `hf_quantizer` (whose save hook checks that
    the config describes the layers). `is_quantized` is left unset: with it transformers'
    Trainer refuses to fine-tune the model without adapters and `.half()` raises.
    A model quantized by another quantization method is left alone, with a warning."""
    if Int8HfQuantizer is None:
        return
    for pretrained in _outermost_pretrained(model):
        current = getattr(pretrained.config, "quantization_config", None)
        if current is not None and not isinstance(current, Int8Config):
            warnings.warn(f"transfuse: {type(pretrained).__name__} is quantized by "
                          f"{getattr(current, 'quant_method', current)!r}: its config is left "
                          "as it is, and a checkpoint it saves will not load its int8 layers back",
                          stacklevel=3)
            continue
        config = Int8Config(mode, skip)
        pretrained.config.quantization_config = config
        pretrained.hf_quantizer = Int8HfQuantizer(config, pre_quantized=True)


def detach_config(model):
    """Undo attach_config for the transformers models in `model` that hold no Int8Linear any more
    (transfuse.unpatch)."""
    for pretrained in _outermost_pretrained(model):
        if any(isinstance(module, Int8Linear) for module in pretrained.modules()):
            continue
        if isinstance(getattr(pretrained.config, "quantization_config", None), Int8Config):
            del pretrained.config.quantization_config
        if Int8HfQuantizer is not None and isinstance(getattr(pretrained, "hf_quantizer", None),
                                                      Int8HfQuantizer):
            del pretrained.hf_quantizer


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
