"""transfuse.nn.Int8Linear, transfuse.quantize and transfuse.patch(int8=...)."""
import pytest
import torch
from torch import nn

import transfuse
from transfuse import reference
from transfuse.quantize import DEFAULT_SKIP

transformers = pytest.importorskip("transformers")
from hf_models import build, make_batch, run  # noqa: E402

FAMILIES = ["llama", "bert", "gpt2"]  # nn.Linear decoder, encoder, Conv1D


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
    assert names and all("Int8Linear replacing Linear" in v for v in names.values())
    assert "lm_head" not in names
    scale = expected.abs().max().item()
    torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=2e-2 * scale)
    transfuse.unpatch(model)
    assert all(m is originals[name] for name, m in model.named_modules())
    torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(mode="w4a16"), ValueError, "mode"),
    (dict(skip="lm_head"), TypeError, "skip"),
])
def test_quantize_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        transfuse.quantize(nn.Sequential(nn.Linear(4, 4)), **kwargs)
    with pytest.raises(TypeError, match="model"):
        transfuse.quantize("model")
