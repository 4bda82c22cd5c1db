"""transfuse.Int8Config through transformers: quantize on load, save_pretrained / from_pretrained
of the int8 model, memory, the config's validation, and corrupted int8 checkpoints (each raises,
naming the tensor or the config field). Tiny random models saved as float checkpoints (nothing is
downloaded): a Llama decoder, GPT-2 (Conv1D layers, tied lm_head) and a BERT sequence
classifier."""
import importlib
import json
import os
import warnings

import pytest
import torch

import transfuse
from transfuse.nn import Int8Linear
from transfuse.ops.int8 import MODES

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
from hf_models import ENCODER, VOCAB, build, make_batch, run  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM,  # noqa: E402
                          AutoModelForSequenceClassification)
from transformers.quantizers import AutoQuantizationConfig  # noqa: E402
from transformers.quantizers import auto as quantizers_auto  # noqa: E402

quantizer_module = importlib.import_module("transfuse.hf.quantizer")
# family -> (auto class, the float head that must stay float)
FAMILIES = {"llama": (AutoModelForCausalLM, "lm_head"),
            "gpt2": (AutoModelForCausalLM, "lm_head"),
            "bert": (AutoModelForSequenceClassification, "classifier")}


def build_float(family):
    if family != "bert":
        return build(family)
    config = AutoConfig.for_model("bert", vocab_size=VOCAB, num_labels=3, **ENCODER)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> directory of its float checkpoint."""
    paths = {}
    for family in FAMILIES:
        paths[family] = tmp_path_factory.mktemp(f"{family}-float")
        build_float(family).save_pretrained(paths[family])
    return paths


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """(family, mode) -> (float model, transfuse.quantize of it, model quantized on load, info)."""
    cache = {}

    def get(family, mode):
        if (family, mode) not in cache:
            auto = FAMILIES[family][0]
            reference = auto.from_pretrained(checkpoints[family]).eval()
            expected = transfuse.quantize(auto.from_pretrained(checkpoints[family]).eval(), mode)
            model, info = auto.from_pretrained(checkpoints[family], output_loading_info=True,
                                               quantization_config=transfuse.Int8Config(mode))
            cache[family, mode] = reference, expected, model.eval(), info
        return cache[family, mode]
    return get


def assert_state_dicts_equal(actual, expected):
    actual, expected = actual.state_dict(), expected.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def assert_clean(info):
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert not info["mismatched_keys"] and not info["error_msgs"]
    assert not info.get("conversion_errors")


def int8_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_on_load_equals_quantize(loaded, family, mode):
    _, expected, model, info = loaded(family, mode)
    assert_clean(info)
    layers = int8_layers(model)
    assert layers and layers.keys() == int8_layers(expected).keys()
    assert all(layer.mode == mode for layer in layers.values())
    assert_state_dicts_equal(model, expected)   # int8 weights, fp32 scales, everything else
    assert model.is_quantized and model.hf_quantizer.is_trainable
    assert model.config.quantization_config.to_dict() == transfuse.Int8Config(mode).to_dict()
    batch = make_batch(family)
    with torch.no_grad():
        assert torch.equal(run(model, batch), run(expected, batch))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip(loaded, tmp_path, family, mode):
    _, _, model, _ = loaded(family, mode)
    model.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert any(name.endswith(".safetensors") for name in files)
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    saved = {}
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(tmp_path / name, framework="pt") as f:
                saved.update({key: f.get_tensor(key) for key in f.keys()})
    for name in int8_layers(model):
        assert saved[f"{name}.weight"].dtype == torch.int8
        assert saved[f"{name}.weight_scale"].dtype == torch.float32
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "transfuse_int8", "mode": mode,
                                             "skip": ["lm_head", "classifier", "score"]}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reloaded, info = FAMILIES[family][0].from_pretrained(tmp_path, output_loading_info=True)
    assert not [w for w in caught if any(word in str(w.message).lower()
                                         for word in ("quantiz", "missing", "unexpected"))]
    assert_clean(info)
    config = reloaded.config.quantization_config
    assert isinstance(config, transfuse.Int8Config)
    assert config.to_dict() == model.config.quantization_config.to_dict()
    assert {n: m.mode for n, m in int8_layers(reloaded).items()} == \
        {n: m.mode for n, m in int8_layers(model).items()}
    assert_state_dicts_equal(reloaded, model)
    batch = make_batch(family)
    with torch.no_grad():
        assert torch.equal(run(reloaded, batch), run(model, batch))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_memory_and_float_heads(loaded, family, mode):
    reference, _, model, _ = loaded(family, mode)
    float_layers = dict(reference.named_modules())
    int8_bytes = float_bytes = 0
    for name, layer in int8_layers(model).items():
        assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
        int8_bytes += layer.weight.nbytes + layer.weight_scale.nbytes
        float_bytes += float_layers[name].weight.numel() * 4
    assert 0 < int8_bytes <= 0.3 * float_bytes
    head = getattr(model, FAMILIES[family][1])
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    assert torch.equal(head.weight, getattr(reference, FAMILIES[family][1]).weight)


@pytest.mark.parametrize("mode", MODES)
def test_int8_base_trains_its_biases(loaded, mode):
    _, _, model, _ = loaded("gpt2", mode)
    layer = model.transformer.h[0].attn.c_attn
    assert "weight" in dict(layer.named_buffers()) and "bias" in dict(layer.named_parameters())
    model.zero_grad(set_to_none=True)
    run(model, make_batch("gpt2")).sum().backward()
    assert layer.bias.grad is not None and torch.isfinite(layer.bias.grad).all()
    assert layer.bias.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_bfloat16_load_and_round_trip(checkpoints, tmp_path):
    path = checkpoints["llama"]
    expected = transfuse.quantize(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), "w8a16")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 quantization_config=transfuse.Int8Config("w8a16"))
    assert_state_dicts_equal(model, expected)
    assert model.model.layers[0].mlp.up_proj.weight_scale.dtype == torch.float32
    model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert_clean(info)
    assert reloaded.dtype == torch.bfloat16
    assert_state_dicts_equal(reloaded, model)
    batch = make_batch("llama")
    with torch.no_grad():
        assert torch.equal(run(reloaded, batch), run(expected, batch))


def test_tied_head_stays_float(checkpoints):
    with pytest.warns(UserWarning, match="tied"):
        model = AutoModelForCausalLM.from_pretrained(
            checkpoints["gpt2"], quantization_config=transfuse.Int8Config("w8a8", skip=()))
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight
    assert int8_layers(model)


def test_config_round_trip():
    config = transfuse.Int8Config("w8a16", skip=["lm_head", "proj"])
    assert config.skip == ("lm_head", "proj")
    data = json.loads(json.dumps(config.to_dict()))
    assert data == {"quant_method": "transfuse_int8", "mode": "w8a16", "skip": ["lm_head", "proj"]}
    for again in (transfuse.Int8Config.from_dict(data), AutoQuantizationConfig.from_dict(data)):
        assert isinstance(again, transfuse.Int8Config) and again.to_dict() == data


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(mode="int4"), ValueError, "mode"),
    (dict(mode=None), ValueError, "mode"),
    (dict(skip="lm_head"), TypeError, "skip"),
    (dict(skip=3), TypeError, "skip"),
    (dict(skip=["lm_head", 1]), TypeError, "skip"),
    (dict(quant_method="bitnet"), ValueError, "quant_method"),
])
def test_bad_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        transfuse.Int8Config(**kwargs)


def test_register_is_idempotent_and_survives_reload():
    mappings = (quantizers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING,
                quantizers_auto.AUTO_QUANTIZER_MAPPING)
    saved_entries = [mapping["transfuse_int8"] for mapping in mappings]
    assert saved_entries == [transfuse.Int8Config, quantizer_module.Int8HfQuantizer]
    assert quantizer_module.register() == "" and quantizer_module.register() == ""
    assert [mapping["transfuse_int8"] for mapping in mappings] == saved_entries
    saved_module = dict(quantizer_module.__dict__)
    try:
        importlib.reload(quantizer_module)
        assert quantizer_module.register() == ""
        assert mappings[0]["transfuse_int8"] is quantizer_module.Int8Config
        assert mappings[1]["transfuse_int8"] is quantizer_module.Int8HfQuantizer
    finally:
        quantizer_module.__dict__.update(saved_module)
        for mapping, entry in zip(mappings, saved_entries):
            mapping["transfuse_int8"] = entry


# --- checkpoints that must not load: each raises, naming the tensor or the config field ---

LAYER = "model.layers.0.self_attn.k_proj"  # [16, 32]: a reshape to [32, 16] changes its shape


@pytest.fixture(scope="module")
def int8_checkpoint(loaded, tmp_path_factory):
    """(directory, its tensors, its config.json as a dict) of the saved llama w8a8 model."""
    path = tmp_path_factory.mktemp("llama-int8")
    loaded("llama", "w8a8")[2].save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    return path, load_file(path / "model.safetensors"), config


def write_checkpoint(path, tensors, config):
    path.mkdir(exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def edit_tensor(key, change):
    return lambda tensors, config: tensors.update({key: change(tensors[key])})


def drop_tensor(key):
    return lambda tensors, config: tensors.pop(key)


def drop_and_add_unknown(key):
    """Drop `key`, add a key the model does not know (as if transformers renamed keys): the
    missing tensor is then found after loading rather than in the checkpoint's header."""
    def corrupt(tensors, config):
        del tensors[key]
        tensors["unknown.tensor"] = torch.zeros(2)
    return corrupt


def edit_config(field, value):
    return lambda tensors, config: config["quantization_config"].update({field: value})


def remove_config(tensors, config):
    del config["quantization_config"]


@pytest.mark.parametrize("corrupt, load_kwargs, match", [
    (drop_tensor(f"{LAYER}.weight"), {}, rf"{LAYER}\.weight is not in the checkpoint"),
    (drop_tensor(f"{LAYER}.weight_scale"), {}, rf"{LAYER}\.weight_scale is not in the checkpoint"),
    (drop_and_add_unknown(f"{LAYER}.weight_scale"), {},
     rf"{LAYER}\.weight_scale is not in the checkpoint \(left uninitialized"),
    (edit_tensor(f"{LAYER}.weight", lambda t: t.float()), {}, rf"{LAYER}\.weight' is F32"),
    (edit_tensor(f"{LAYER}.weight", lambda t: t.to(torch.int16)), {}, rf"{LAYER}\.weight' is I16"),
    (edit_tensor(f"{LAYER}.weight_scale", lambda t: t.to(torch.int8)), {},
     rf"{LAYER}\.weight_scale' is I8"),
    (edit_tensor(f"{LAYER}.weight_scale", lambda t: t.half()), {},
     rf"{LAYER}\.weight_scale' is F16"),
    (edit_tensor(f"{LAYER}.weight", lambda t: t.reshape(32, 16)), {},
     rf"{LAYER}\.weight' is I8 \[32, 16\]"),
    (edit_tensor(f"{LAYER}.weight_scale", lambda t: t[:-1].clone()), {},
     rf"{LAYER}\.weight_scale' is F32 \[15\]"),
    (edit_config("mode", "w4a16"), {}, "mode"),
    (edit_config("skip", ["lm_head", "q_proj"]), {}, r"layers\.0\.self_attn\.q_proj\.weight_scale"),
    (edit_config("skip", []), {}, r"'lm_head\.weight' is F32"),
    (remove_config, {"quantization_config": transfuse.Int8Config("w8a8")}, r"\.weight_scale'"),
    (edit_config("quant_method", "transfuse_int4"),
     {"quantization_config": transfuse.Int8Config("w8a8")}, r"\.weight_scale'"),
], ids=["weight missing", "scale missing", "scale missing, found after loading", "weight float",
        "weight int16", "scale int8", "scale fp16", "weight reshaped", "scale shortened",
        "unknown mode", "skip widened", "skip emptied", "config removed", "quant_method changed"])
def test_corrupt_int8_checkpoint_raises(int8_checkpoint, tmp_path, corrupt, load_kwargs, match):
    path, tensors, config = int8_checkpoint
    tensors, config = dict(tensors), json.loads(json.dumps(config))
    corrupt(tensors, config)
    write_checkpoint(tmp_path, tensors, config)
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path, **load_kwargs)


def test_int8_checkpoint_without_its_config_in_a_plain_load(int8_checkpoint, tmp_path):
    """The limit of the checks: a plain from_pretrained of an int8 checkpoint whose
    quantization_config is gone runs no quantizer (nothing of transfuse's runs), so transformers
    loads the int8 weights as floats. What it does report: every weight_scale as unexpected."""
    path, tensors, config = int8_checkpoint
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    write_checkpoint(tmp_path, dict(tensors), config)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["unexpected_keys"] >= {key for key in tensors if key.endswith(".weight_scale")}


def test_quantize_on_load_of_a_layer_missing_its_float_weight_raises(checkpoints, tmp_path):
    path = checkpoints["llama"]
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_checkpoint(tmp_path, tensors, json.loads((path / "config.json").read_text()))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is not in"):
        AutoModelForCausalLM.from_pretrained(tmp_path,
                                             quantization_config=transfuse.Int8Config("w8a16"))


def test_loaded_int8_model_follows_to_dtype(checkpoints):
    """.to(torch.bfloat16) casts the float tensors; the int8 weights and fp32 scales stay.
    (`.half()` is refused by transformers itself for a model loaded with a quantizer.)"""
    model = AutoModelForCausalLM.from_pretrained(checkpoints["llama"],
                                                 quantization_config=transfuse.Int8Config("w8a16"))
    layer = model.model.layers[0].mlp.up_proj
    weight, scale = layer.weight.clone(), layer.weight_scale.clone()
    batch = make_batch("llama")
    with torch.no_grad():
        expected = run(model, batch)
        actual = run(model.to(torch.bfloat16), batch)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.weight_scale, scale)
    assert actual.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected, rtol=0,
                               atol=2e-2 * expected.abs().max().item())
