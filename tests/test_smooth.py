"""transfuse.smooth (SmoothQuant) and quantize(smooth_alpha=...): the model's function is
unchanged by the smoothing itself, w8a8 with smoothing beats w8a8 without on outliers, and it is
on by default where calibration inputs are given."""
import importlib

import pytest
import torch
from torch import nn

import transfuse
from transfuse.smooth import find_groups, smooth

quantize_module = importlib.import_module("transfuse.quantize")

transformers = pytest.importorskip("transformers")
from hf_models import build, make_batch  # noqa: E402

PRE_NORM = ["llama", "mistral", "qwen2", "qwen3", "gemma", "t5", "modernbert"]
LEFT_ALONE = ["bert", "gpt2", "bart"]  # post-norm residuals, Conv1D, a tied lm_head


def all_outputs(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return [v for v in out.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("model_type", PRE_NORM + LEFT_ALONE)
def test_smoothing_leaves_every_output_unchanged(model_type):
    model, batch = build(model_type), make_batch(model_type)
    expected = all_outputs(model, batch)
    groups = smooth(model, 0.5, batch)
    assert (groups > 0) == (model_type in PRE_NORM)
    for actual, exact in zip(all_outputs(model, batch), expected):
        torch.testing.assert_close(actual, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


def test_groups_of_a_llama_block():
    model, batch = build("llama"), make_batch("llama")
    groups = find_groups(model, batch)
    layer = model.model.layers[0]
    assert set(groups[layer.input_layernorm][0]) == {layer.self_attn.q_proj,
                                                     layer.self_attn.k_proj,
                                                     layer.self_attn.v_proj}
    assert set(groups[layer.post_attention_layernorm][0]) == {layer.mlp.gate_proj,
                                                              layer.mlp.up_proj}
    assert model.model.norm not in groups  # its output is returned / feeds the tied-free lm_head


def test_smoothing_lowers_w8a8_error_on_outlier_channels():
    """A few activation channels 50x larger (as in real LLMs): per-token w8a8 loses the small
    channels; SmoothQuant moves the outliers into the weights."""
    def outlier_model():
        model = build("llama")
        with torch.no_grad():
            for layer in model.model.layers:
                layer.input_layernorm.weight[:3] *= 50
        return model
    batch = make_batch("llama")
    reference_logits = all_outputs(outlier_model(), batch)[0]
    errors = {}
    for alpha in (None, 0.5, "auto"):
        model = transfuse.quantize(outlier_model(), "w8a8", smooth_alpha=alpha, calibration=batch)
        errors[alpha] = (all_outputs(model, batch)[0] - reference_logits).abs().max().item()
    assert errors[0.5] < errors[None], errors
    assert errors["auto"] == errors[0.5]  # the default with calibration inputs


def test_smoothing_by_default_only_for_w8a8_with_calibration(monkeypatch):
    """smooth_alpha "auto": SmoothQuant at alpha 0.5 for w8a8 given calibration inputs; not
    without them, nor for weight-only w8a16 (whose activations stay float)."""
    calls = []
    monkeypatch.setattr(quantize_module, "smooth", lambda model, alpha, batches: calls.append(alpha))
    batch = make_batch("llama")
    for mode, calibration, expected in (("w8a8", batch, [0.5]), ("w8a8", None, []),
                                        ("w8a16", batch, []), ("w8a16", None, [])):
        calls.clear()
        transfuse.quantize(build("llama"), mode, calibration=calibration)
        assert calls == expected, (mode, calibration is None)
    calls.clear()
    transfuse.quantize(build("llama"), "w8a16", smooth_alpha=0.3, calibration=batch)
    assert calls == [0.3]


@pytest.mark.parametrize("kwargs,match", [
    (dict(smooth_alpha=1.5, calibration=torch.zeros(1, 2, dtype=torch.long)), "smooth_alpha"),
    (dict(smooth_alpha=0.5), "calibration"),
    (dict(smooth_alpha="on", calibration=torch.zeros(1, 2, dtype=torch.long)), "smooth_alpha"),
])
def test_bad_smoothing_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        transfuse.quantize(nn.Sequential(nn.Linear(4, 4)), **kwargs)
