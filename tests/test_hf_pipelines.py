"""transfuse.patch on the model inside a transformers pipeline, for the seed tasks: the patched
pipeline gives the unpatched one's answers. Tiny random models and a word-level tokenizer built
here (nothing is downloaded)."""
import pytest
import torch

import transfuse

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from hf_models import FAMILIES, VOCAB  # noqa: E402
from transformers import (AutoConfig, AutoModelForCausalLM,  # noqa: E402
                          AutoModelForQuestionAnswering, AutoModelForSeq2SeqLM,
                          AutoModelForSequenceClassification, PreTrainedTokenizerFast, pipeline)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[BOS]", "[EOS]"]
WORDS = [f"w{i}" for i in range(VOCAB - len(SPECIAL))]
TEXT = "w1 w2 w3 w4 w5 w6 w7 w8"


def word_tokenizer():
    """A fast word-level tokenizer over VOCAB words: [CLS] text [SEP] (pairs: [CLS] a [SEP] b
    [SEP]), with offsets, as the question-answering pipeline needs."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=48)


def model_for(task, model_type):
    overrides = FAMILIES[model_type][1]
    heads = {"text-classification": AutoModelForSequenceClassification,
             "question-answering": AutoModelForQuestionAnswering,
             "text-generation": AutoModelForCausalLM}
    head = heads.get(task, AutoModelForSeq2SeqLM)
    tokens = dict(pad_token_id=0, eos_token_id=5, bos_token_id=4, decoder_start_token_id=4)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **{**tokens, **overrides})
    torch.manual_seed(0)
    return head.from_config(config).eval()


PIPELINE_CASES = [
    ("text-classification", "bert", dict(inputs=TEXT)),
    ("text-classification", "distilbert", dict(inputs=TEXT)),
    ("text-generation", "gpt2", dict(text_inputs="w1 w2 w3", max_new_tokens=5, do_sample=False)),
    ("text-generation", "llama", dict(text_inputs="w1 w2 w3", max_new_tokens=5, do_sample=False)),
]


@pytest.mark.parametrize("task,model_type,call", PIPELINE_CASES,
                         ids=[f"{t}-{m}" for t, m, _ in PIPELINE_CASES])
def test_patched_pipeline_gives_the_same_answer(task, model_type, call):
    pipe = pipeline(task, model=model_for(task, model_type), tokenizer=word_tokenizer(),
                    device="cpu")
    expected = pipe(**call)
    transfuse.patch(pipe.model)
    assert transfuse.patched_modules(pipe.model)
    actual = pipe(**call)
    if task == "text-classification":
        assert actual[0]["label"] == expected[0]["label"]
        assert actual[0]["score"] == pytest.approx(expected[0]["score"], abs=1e-5)
    else:
        assert actual == expected


# transformers 5 removed the question-answering, summarization and translation pipelines (see
# its MIGRATION_GUIDE_V5); these do what those pipelines did: tokenize, run, pick / decode.

@pytest.mark.parametrize("model_type", ["bert", "distilbert"])
def test_patched_extractive_question_answering_gives_the_same_span(model_type):
    model, tokenizer = model_for("question-answering", model_type), word_tokenizer()
    inputs = tokenizer("w3 w4", TEXT, return_tensors="pt")

    def answer():
        with torch.no_grad():
            out = model(**inputs)
        start, end = out.start_logits[0].argmax().item(), out.end_logits[0].argmax().item()
        return start, end, out.start_logits.clone()
    start, end, logits = answer()
    transfuse.patch(model)
    assert answer()[:2] == (start, end)
    torch.testing.assert_close(answer()[2], logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["bart", "marian", "t5"])
def test_patched_summarization_and_translation_give_the_same_text(model_type):
    model, tokenizer = model_for("summarization", model_type), word_tokenizer()
    inputs = tokenizer([TEXT, "w9 w10 w11"], padding=True, return_tensors="pt")

    def generate():
        ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        return tokenizer.batch_decode(ids, skip_special_tokens=True)
    expected = generate()
    transfuse.patch(model)
    assert generate() == expected
