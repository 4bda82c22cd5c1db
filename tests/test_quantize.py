"""transfuse.nn.Int8Linear, transfuse.quantize and transfuse.patch(int8=...)."""
import copy
import json

import pytest
import torch
from torch import nn

import transfuse
from transfuse import reference
from transfuse.quantize import DEFAULT_SKIP

transformers = pytest.importorskip("transformers")
from hf_models import HEADS, build, make_batch, run  # noqa: E402

FAMILIES = ["llama", "bert", "gpt2"]  # nn.Linear decoder, encoder, Conv1D
FAMILIES_HEAD = {"llama": "causal", "bert": "base", "gpt2": "causal"}


def linear_weight_bytes(model):
    """Bytes of the weights (and scales) of the linear layers, float or int8."""
    total = 0
    for module in model.modules():
        if isinstance(module, transfuse.nn.Int8Linear):
            total += module.weight.numel() + module.weight_scale.numel() * 4
        elif transfuse.nn.float_weight(module) is not None:
            total += module.weight.numel() * module.weight.element_size()
    return total


def test_int8_linear_from_float_quantizes_per_output_channel():
    linear = nn.Linear(40, 24)
    module = transfuse.nn.Int8Linear.from_float(linear, "w8a16")
    expected_w, expected_scale = reference.quantize_per_token(linear.weight.detach())
    assert torch.equal(module.weight, expected_w) and torch.equal(module.weight_scale,
                                                                   expected_scale)
    assert module.bias is linear.bias
    assert set(module.state_dict()) == {"weight", "weight_scale", "bias"}
    x = torch.randn(3, 5, 40)
    torch.testing.assert_close(module(x), reference.int8_linear(x, module.weight,
                                                                module.weight_scale,
                                                                linear.bias.detach(), "w8a16"))
    expected = linear(x)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=2e-2 * expected.abs().max().item())


def test_int8_linear_state_dict_round_trip_and_conv1d():
    conv = transformers.pytorch_utils.Conv1D(24, 40)  # weight [in, out]
    module = transfuse.nn.Int8Linear.from_float(conv)
    fresh = transfuse.nn.Int8Linear(40, 24)
    fresh.load_state_dict(module.state_dict())
    x = torch.randn(4, 40)
    torch.testing.assert_close(fresh(x), module(x), rtol=0, atol=0)
    torch.testing.assert_close(module(x), conv(x), rtol=0, atol=3e-2 * conv(x).abs().max().item())
    with pytest.raises(TypeError, match="module must be"):
        transfuse.nn.Int8Linear.from_float(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="mode"):
        transfuse.nn.Int8Linear(4, 4, mode="int4")


@pytest.mark.parametrize("mode", ["w8a8", "w8a16"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_quantize_model_keeps_heads_and_outputs_close(model_type, mode):
    model = build(model_type)
    batch = make_batch(model_type)
    expected = run(model, batch)
    float_bytes = linear_weight_bytes(model)
    heads = {name for name, _ in model.named_modules() if name.split(".")[-1] in DEFAULT_SKIP}
    assert transfuse.quantize(model, mode) is model
    quantized = {name for name, m in model.named_modules()
                 if isinstance(m, transfuse.nn.Int8Linear)}
    assert quantized and not quantized & heads
    assert all(transfuse.nn.float_weight(m) is None or name in heads
               for name, m in model.named_modules() if name not in quantized)
    assert linear_weight_bytes(model) <= 0.3 * float_bytes + sum(
        model.get_submodule(h).weight.numel() * 4 for h in heads)
    actual = run(model, batch)
    error = (actual - expected).abs().max() / expected.abs().max()
    assert error < (0.05 if mode == "w8a8" else 0.02), f"relative error {error:.3g}"


def test_quantized_base_trains_an_adapter():
    """The int8 weights are frozen buffers; gradients reach the inputs (so a LoRA adapter beside
    the layer trains) and the bias."""
    model = build("llama")
    transfuse.quantize(model, "w8a8")
    layer = model.model.layers[0].self_attn.q_proj
    adapter = nn.Linear(layer.in_features, layer.out_features, bias=False)
    layer.register_forward_hook(lambda module, inputs, out: out + adapter(inputs[0]))
    batch = make_batch("llama")
    model(**batch).logits.sum().backward()
    assert adapter.weight.grad is not None and adapter.weight.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in layer.buffers())


def test_patch_int8_then_unpatch_restores_the_float_layers():
    model = build("llama")
    batch = make_batch("llama")
    originals = dict(model.named_modules())
    expected = run(model, batch)
    transfuse.patch(model, attention=False, norm=False, int8="w8a16")
    names = transfuse.patched_modules(model)
    swapped = {name: v for name, v in names.items() if not name.endswith("<block>")}
    assert swapped and all("Int8Linear replacing Linear" in v for v in swapped.values())
    assert "lm_head" not in swapped  # kept float (DEFAULT_SKIP): the linear block rule runs it
    assert names["lm_head<block>"] == "block rule 'linear'"
    scale = expected.abs().max().item()
    torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=2e-2 * scale)
    transfuse.unpatch(model)
    assert all(m is originals[name] for name, m in model.named_modules())
    torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_dtype", "type"])
def test_int8_linear_casts_leave_the_int8_weight_and_fp32_scales_alone(cast):
    module = transfuse.nn.Int8Linear.from_float(nn.Linear(40, 24), "w8a8")
    weight, scale = module.weight.clone(), module.weight_scale.clone()
    {"half": lambda: module.half(), "bfloat16": lambda: module.to(torch.bfloat16),
     "to_dtype": lambda: module.to("cpu", dtype=torch.float16),
     "type": lambda: module.type(torch.float16)}[cast]()
    dtype = torch.bfloat16 if cast == "bfloat16" else torch.float16
    assert module.bias.dtype == dtype and isinstance(module.bias, nn.Parameter)
    assert module.weight.dtype == torch.int8 and torch.equal(module.weight, weight)
    assert module.weight_scale.dtype == torch.float32 and torch.equal(module.weight_scale, scale)
    x = torch.randn(3, 40).to(dtype)
    out = module(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out, reference.int8_linear(x, weight, scale, module.bias.detach(),
                                                          "w8a8"))


def test_quantized_model_runs_after_a_dtype_cast():
    model = transfuse.quantize(build("llama"), "w8a16")
    batch = make_batch("llama")
    with torch.no_grad():
        expected = run(model, batch)
        layer = model.model.layers[0].mlp.up_proj
        weight, scale = layer.weight.clone(), layer.weight_scale.clone()
        actual = run(model.to(torch.bfloat16), batch)
    assert torch.equal(layer.weight, weight) and torch.equal(layer.weight_scale, scale)
    assert actual.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected, rtol=0, atol=2e-2 * scale)


def int8_modes(model):
    return {n: m.mode for n, m in model.named_modules() if isinstance(m, transfuse.nn.Int8Linear)}


# model_type -> (mode, skip) of the round trip
ROUND_TRIPS = {"llama": ("w8a8", ("lm_head", "down_proj")), "gpt2": ("w8a16", ()),
               "bert": ("w8a8", DEFAULT_SKIP)}


@pytest.mark.filterwarnings("ignore:transfuse.*tied weights")  # GPT-2, skip=()
@pytest.mark.parametrize("model_type", ROUND_TRIPS)
def test_quantize_save_pretrained_from_pretrained_round_trip(model_type, tmp_path):
    """A plain from_pretrained of what a quantized model saved rebuilds the same int8 layers."""
    mode, skip = ROUND_TRIPS[model_type]
    model = transfuse.quantize(build(model_type), mode, skip=skip)
    assert model.config.quantization_config.to_dict() == {"quant_method": "transfuse_int8",
                                                          "mode": mode, "skip": list(skip)}
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == {"quant_method": "transfuse_int8", "mode": mode, "skip": list(skip)}
    reloaded = HEADS[FAMILIES_HEAD[model_type]].from_pretrained(tmp_path)
    assert int8_modes(reloaded) == int8_modes(model) and int8_modes(model)
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert reloaded.state_dict()[name].dtype == tensor.dtype, name
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    batch = make_batch(model_type)
    with torch.no_grad():
        assert torch.equal(run(reloaded, batch), run(model, batch))


def test_multihead_attention_keeps_its_float_out_proj(tmp_path):
    """torch's nn.MultiheadAttention reads out_proj.weight itself (SigLIP's pooling head): its
    out_proj stays float, the other layers go int8, the outputs stay close, and the saved
    checkpoint loads back the same (the save check knows the layer is left)."""
    from transformers import AutoConfig, AutoModel
    config = AutoConfig.for_model("siglip_vision_model", hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, image_size=16,
                                  patch_size=4)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=pixels).pooler_output
    quantized = transfuse.quantize(model, "w8a8")
    head = quantized.head.attention
    assert isinstance(head, nn.MultiheadAttention) and type(head.out_proj) is not \
        transfuse.nn.Int8Linear
    assert isinstance(quantized.head.mlp.fc1, transfuse.nn.Int8Linear)
    with torch.no_grad():
        out = quantized(pixel_values=pixels).pooler_output
    assert torch.nn.functional.cosine_similarity(out, expected).min() > 0.99
    quantized.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).pooler_output, out)


def test_a_linear_subclass_with_its_own_forward_stays_float(tmp_path):
    """Llama 4's MoE router is an nn.Linear whose forward returns scores and logits: quantize,
    patch(int8=) and Int8Config loading leave it float (an Int8Linear in its place returned one
    tensor: 'too many values to unpack'), the other layers int8; loading gives quantize's model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("llama4_text", vocab_size=100, hidden_size=32,
                                  intermediate_size=64, intermediate_size_mlp=64,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=8, num_local_experts=4,
                                  max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    outputs = []
    for quantized in (transfuse.quantize(copy.deepcopy(model), "w8a8"),
                      transfuse.patch(copy.deepcopy(model), int8="w8a8"),
                      AutoModelForCausalLM.from_pretrained(
                          tmp_path, quantization_config=transfuse.Int8Config("w8a8")).eval()):
        layer = quantized.model.layers[0]
        assert type(layer.feed_forward.router).__name__ == "Llama4Router"
        assert isinstance(layer.self_attn.q_proj, transfuse.nn.Int8Linear)
        with torch.no_grad():
            outputs.append(quantized(ids).logits)
    assert torch.equal(outputs[2], outputs[0])  # (patch's other rules round otherwise)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


def test_a_checkpoint_transformers_converts_quantizes_on_load(tmp_path):
    """NomicBERT's checkpoint holds one fused Wqkv, which transformers splits into q, k and v on
    loading: Int8Config quantizes each of them (before, only the first: 'k_proj.weight is not in
    the checkpoint'), the same int8 model as transfuse.quantize."""
    from transformers import AutoConfig, AutoModel
    config = AutoConfig.for_model("nomic_bert", vocab_size=100, hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModel.from_config(config).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path,
                                       quantization_config=transfuse.Int8Config("w8a8")).eval()
    expected = transfuse.quantize(copy.deepcopy(model), "w8a8")
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(3, 99, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], expected(ids)[0])


def test_save_refuses_layers_the_config_would_not_rebuild(tmp_path):
    """Two quantize calls in different modes: no quantization_config describes the model, so
    save_pretrained raises (naming a layer) before it writes anything."""
    model = transfuse.quantize(build("llama"), "w8a8", skip=("lm_head", "mlp"))
    transfuse.quantize(model, "w8a16")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*mode='w8a8'"):
        model.save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())


def test_patch_int8_saves_its_quantization_config_and_unpatch_removes_it(tmp_path):
    model = build("llama")
    batch = make_batch("llama")
    transfuse.patch(model, attention=False, norm=False, blocks=False, int8="w8a8")  # int8 alone
    assert model.config.quantization_config.to_dict()["mode"] == "w8a8"
    model.save_pretrained(tmp_path / "int8")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "int8")
    assert int8_modes(reloaded) == int8_modes(model)
    with torch.no_grad():
        assert torch.equal(run(reloaded, batch), run(model, batch))
    transfuse.unpatch(model)
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "float")
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mode="w4a16"), ValueError, "mode"),
    (dict(skip="lm_head"), TypeError, "skip"),
])
def test_quantize_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        transfuse.quantize(nn.Sequential(nn.Linear(4, 4)), **kwargs)
    with pytest.raises(TypeError, match="model"):
        transfuse.quantize("model")
