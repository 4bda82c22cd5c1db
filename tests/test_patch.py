"""transfuse.patch(model) in one call (norms, attention, and int8 when asked) over every supported
family: patching twice is harmless, and unpatch gives back the original outputs and state dict;
patched_modules lists only what runs; a second int8 mode switches the mode."""
import warnings

import pytest
import torch

import transfuse
from transfuse.hf import attention as hf_attention

transformers = pytest.importorskip("transformers")
from hf_models import (FAMILIES, OWN_ATTENTION, TINY_CAUSAL, assert_close_scaled,  # noqa: E402
                       build, build_tiny_causal, make_batch, run)


@pytest.mark.parametrize("int8", [None, "w8a16"])
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_one_call_twice_then_unpatch(model_type, int8):
    model, batch = build(model_type), make_batch(model_type)
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = run(model, batch)
        for _ in range(2):
            assert transfuse.patch(model, int8=int8) is model
        patched = transfuse.patched_modules(model)
        assert "<attention>" in patched
        assert any("Norm" in v for v in patched.values())
        assert any("Int8Linear" in v for v in patched.values()) == (int8 is not None)
        actual = run(model, batch)
        if FAMILIES[model_type][0] != "seq2seq":  # padding removal leaves zeros at pad positions
            real = batch["attention_mask"].bool()
            actual, expected_real = actual[real], expected[real]
        else:
            expected_real = expected
        if int8 is None:
            assert_close_scaled(actual, expected_real, name=model_type)
        else:  # int8 weights: close, not equal
            assert (actual - expected_real).abs().max() <= 0.05 * expected_real.abs().max()
        transfuse.unpatch(model)
        assert dict(model.named_modules()) == modules
        assert transfuse.patched_modules(model) == {}
        torch.testing.assert_close(run(model, batch), expected, rtol=0, atol=0)
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    assert all(torch.equal(restored[k], state[k]) for k in state)


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts the kernel calls the transfuse attention makes (padded and packed, and those of a
    decoder layer run by transfuse._C.decoder_layer_out: the residual_rms_norm block rule)."""
    seen = []
    module = transfuse.backends.extension()[0]
    spied = [(hf_attention, "attention"), (hf_attention, "varlen_attention")]
    for owner, name in spied + ([(module, "decoder_layer_out")] if module else []):
        def spy(*args, _original=getattr(owner, name), _name=name, **kwargs):
            seen.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(owner, name, spy)
    return seen


@pytest.mark.parametrize("model_type", ["llama", "t5"] + list(TINY_CAUSAL))
def test_patched_modules_lists_the_attention_only_where_it_runs(model_type, attention_calls):
    """BLOOM's attention modules (and Falcon's before transformers 5.25) never call transformers'
    attention interface: their attention stays as it was, named in patch's one warning, and
    outputs are unchanged (Falcon's, through the interface, patched alike). T5's
    attention runs in its encoder and decoder stacks, which hold copies of the config (that
    transformers 5.17's set_attn_implementation does not reach)."""
    own = model_type in OWN_ATTENTION
    tiny = model_type in TINY_CAUSAL
    model = build_tiny_causal(model_type) if tiny else build(model_type)
    batch = make_batch("llama" if tiny else model_type)
    implementation = model.config._attn_implementation
    with torch.no_grad():
        expected = run(model, batch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        transfuse.patch(model)
    messages = [str(w.message) for w in record if "transfuse" in str(w.message)]
    with torch.no_grad():
        actual = run(model, batch)
    listed = "<attention>" in transfuse.patched_modules(model)
    assert listed == (len(attention_calls) > 0) == (not own), (listed, len(attention_calls))
    if own:
        assert len(messages) == 1 and f"{model_type.capitalize()}Attention x2 (" in messages[0], \
            messages
        assert model.config._attn_implementation == implementation
    else:
        assert messages == []
    if tiny:
        assert_close_scaled(actual, expected, name=model_type)


def test_second_int8_mode_switches_the_mode_exactly():
    """patch(int8="w8a8") then patch(int8="w8a16") gives what patch(int8="w8a16") gives (both
    modes hold the same int8 weights); the same call twice changes nothing."""
    batch = make_batch("llama")
    fresh = transfuse.patch(build("llama"), int8="w8a16")
    model = transfuse.patch(build("llama"), int8="w8a8")
    with torch.no_grad():
        expected, first = run(fresh, batch), run(model, batch)
        transfuse.patch(model, int8="w8a16")
        switched = run(model, batch)
        modules = dict(model.named_modules())
        transfuse.patch(model, int8="w8a16")
        again = run(model, batch)
    assert not torch.equal(first, expected)  # the modes differ here, so the switch is visible
    assert torch.equal(switched, expected) and torch.equal(again, expected)
    assert dict(model.named_modules()) == modules
    int8 = [v for v in transfuse.patched_modules(model).values() if "Int8Linear" in v]
    assert int8 and all(v.endswith("(mode='w8a16')") for v in int8)


def _tied(model_type):
    """The tiny model with its head tied to the input embedding (GPT-2 ties by default)."""
    model = build(model_type)
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        model.config.tie_word_embeddings = True
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # nn.Linear and Conv1D models
def test_int8_heads_quantizes_a_tied_head_and_unpatch_ties_it_again(model_type):
    """int8_heads=True: the tied head becomes Int8Linear over its own int8 copy of the shared
    weight; the embedding keeps the float Parameter, unchanged; the logits stay within int8's
    error of the float head's; unpatch puts the tied nn.Linear back."""
    model = _tied(model_type)
    embedding = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embedding
    float_values = embedding.detach().clone()
    batch = make_batch(model_type)
    with torch.no_grad():
        expected = run(transfuse.patch(_tied(model_type), int8="w8a16"), batch)
        transfuse.patch(model, int8="w8a16", int8_heads=True)
        actual = run(model, batch)
    head = model.get_output_embeddings()
    assert isinstance(head, transfuse.nn.Int8Linear) and head.weight.dtype == torch.int8
    assert model.get_input_embeddings().weight is embedding
    assert torch.equal(embedding, float_values)
    torch.testing.assert_close(head.dequantized_weight(), float_values, rtol=0,
                               atol=float(float_values.abs().max()) / 127)
    real = batch["attention_mask"].bool()
    assert not torch.equal(actual[real], expected[real])  # the head is int8 now
    assert_close_scaled(actual[real], expected[real], tol=0.05, name=model_type)  # int8 error
    transfuse.unpatch(model)
    assert type(model.get_output_embeddings()).__name__ in ("Linear", "Conv1D")
    assert model.get_output_embeddings().weight is embedding


@pytest.mark.filterwarnings("ignore:transfuse.*tied weights")  # the head loads back in float
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_int8_heads_saves_the_tie(model_type, tmp_path):
    """A checkpoint of a model patched with int8_heads keeps the tied float weight (no int8 head
    tensors), and loads back as the int8 model with its tied head in float."""
    from transformers import AutoModelForCausalLM
    transfuse.patch(_tied(model_type), int8="w8a16", int8_heads=True).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    batch = make_batch(model_type)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        expected = run(transfuse.patch(_tied(model_type), int8="w8a16"), batch)
        assert_close_scaled(run(loaded, batch)[real], expected[real], name=model_type)


def test_int8_heads_needs_int8_and_a_bool():
    with pytest.raises(ValueError, match="int8_heads=True needs int8"):
        transfuse.patch(build("llama"), int8_heads=True)
    with pytest.raises(TypeError, match="int8_heads must be a bool"):
        transfuse.patch(build("llama"), int8="w8a16", int8_heads=1)


def test_a_bf16_model_on_a_cpu_without_bf16_arithmetic_warns_once(monkeypatch):
    """patch() of a bf16 model on a CPU with neither AVX512_BF16 nor AMX says that its fp32 model
    runs faster there, once a process; an fp32 model, or a CPU with bf16 arithmetic, gets no such
    warning."""
    module = transfuse.backends.extension()[0]
    if module is None:
        pytest.skip("needs the C++ extension")
    monkeypatch.setattr(transfuse.backends, "_warned", set())
    monkeypatch.setattr(module, "cpu_amx", 0)

    def warned(model, bf16_arithmetic, fresh=True):
        monkeypatch.setattr(module, "cpu_gemm_bf16", int(bf16_arithmetic))
        if fresh:
            transfuse.backends._warned.clear()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            transfuse.patch(model)
        return [str(w.message) for w in record if "no bf16 arithmetic" in str(w.message)]
    assert len(warned(build("llama").bfloat16(), False)) == 1
    assert warned(build("llama").bfloat16(), False, fresh=False) == []
    assert warned(build("llama"), False) == []
    assert warned(build("llama").bfloat16(), True) == []
