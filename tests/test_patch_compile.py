"""torch.compile over patched models: fullgraph=True (norms + attention, no graph break) with the
same outputs as eager, generate() through a compiled forward, and padding removal under compile
with unpad="always"."""
import warnings

import pytest
import torch

import transfuse

transformers = pytest.importorskip("transformers")
from hf_models import build, make_batch, run  # noqa: E402


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_compiled_patched_model_matches_eager(model_type):
    model, batch = build(model_type), make_batch(model_type)
    expected = run(model, batch)
    transfuse.patch(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(run(compiled, batch), expected, rtol=1e-5, atol=1e-6)


def test_generate_through_a_compiled_patched_forward():
    model = build("llama")
    prompts = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(prompts, **kwargs)
    transfuse.patch(model)
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager",
                                  dynamic=True)
    assert torch.equal(model.generate(prompts, **kwargs), expected)


@pytest.mark.parametrize("model_type", ["bert", "llama"])  # the "stack" and "model" unpad rules
@pytest.mark.parametrize("unpad", [True, "always"])
def test_unpad_always_keeps_padding_removal_under_compile(model_type, unpad):
    """Under torch.compile (graph breaks allowed) a padded batch runs packed with
    unpad="always" (zeros at the pad positions, as in eager) and padded with unpad=True (values
    there); the real tokens equal the unpatched model's either way."""
    model = build(model_type)
    model.config.use_cache = False
    batch = make_batch(model_type)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = model.base_model(**batch).last_hidden_state
        torch._dynamo.reset()
        patched = transfuse.patch(model, unpad=unpad).base_model
        actual = torch.compile(patched, backend="aot_eager")(**batch).last_hidden_state
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)
    pads_zero = bool((actual[~real] == 0).all())
    assert pads_zero == (unpad == "always")


def test_unpad_takes_true_false_or_always():
    with pytest.raises(ValueError, match="unpad must be True, False or 'always'"):
        transfuse.patch(build("bert"), unpad="sometimes")


@pytest.mark.parametrize("int8", [None, "w8a8"])
def test_generate_with_a_static_cache_compiles_the_patched_forward(int8):
    """generate(cache_implementation="static") compiles the forward when a compile_config allows
    it on the CPU (transformers does so by itself on CUDA): a patched model, its int8 layers too
    (the quantizer says it is compileable), decodes through the compiled forward token for token
    as it does in eager mode."""
    from transformers.generation.configuration_utils import CompileConfig
    model = build("llama")
    prompts = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    transfuse.patch(model, int8=int8)
    expected = model.generate(prompts, **kwargs)
    config = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    config._compile_all_devices = True
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(model.generate(prompts, compile_config=config, **kwargs), expected)
    assert not [w for w in caught if "lru_cache" in str(w.message)]  # Dynamo's, on our caches
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    if int8 is None:
        transfuse.unpatch(model)
        assert torch.equal(model.generate(prompts, **kwargs), expected)
