"""The encoder_model rule (transfuse.hf.encoder_model): a patched BERT-style model's forward as
transfuse's calls alone computes what the forward it replaced computes, bit for bit, and steps
aside wherever that forward would do something else."""
import copy

import pytest
import torch

import transfuse
from transfuse.hf import encoder_model, unpad

from hf_models import build


@pytest.fixture
def lean_runs(monkeypatch):
    """runs(): per model call since the last runs(), whether the rule's calls ran (True) or the
    forward it replaced (False)."""
    ran = []
    original = encoder_model._lean_forward

    def recording(*args):
        out = original(*args)
        ran.append(out is not None)
        return out
    monkeypatch.setattr(encoder_model, "_lean_forward", recording)

    def runs():
        so_far = list(ran)
        ran.clear()
        return so_far
    return runs


def batch(padding, token_types=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(3, 99, (3, 11), generator=g),
              "attention_mask": torch.ones(3, 11, dtype=torch.long)}
    if padding:
        inputs["attention_mask"][1, 7:] = 0
        inputs["attention_mask"][2, 2:] = 0
    if token_types:
        inputs["token_type_ids"] = torch.randint(0, 2, (3, 11), generator=g)
    return inputs


def replaced_forward(monkeypatch, model, inputs):
    """The patched model's output with the rule's calls off (padding removal's forward)."""
    with monkeypatch.context() as m:
        m.setattr(encoder_model, "_lean_forward", lambda *args: None)
        with torch.inference_mode():
            return model(**inputs)


@pytest.mark.parametrize("token_types", [True, False], ids=["token types", "none given"])
@pytest.mark.parametrize("padding", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("mode", ["fp32", "bf16", "w8a8"])
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_the_rule_computes_what_the_replaced_forward_computes_bit_for_bit(
        model_type, mode, padding, token_types, lean_runs, monkeypatch):
    """(RoBERTa numbers positions from the ids: pad ids inside the real tokens shift them.)"""
    model = build(model_type)
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    patched = transfuse.patch(copy.deepcopy(model).to(dtype),
                              int8=mode if mode.startswith("w8") else None)
    inputs = batch(padding, token_types)
    inputs["input_ids"][0, 3] = model.config.pad_token_id
    with torch.inference_mode():
        out = patched(**inputs)
        expected = model(**inputs)
    assert lean_runs() == [True]
    replaced = replaced_forward(monkeypatch, patched, inputs)
    assert torch.equal(out.last_hidden_state, replaced.last_hidden_state)
    assert torch.equal(out.pooler_output, replaced.pooler_output)
    assert type(out) is type(expected)
    real = inputs["attention_mask"].bool()
    assert not out.last_hidden_state[~real].any()  # zeros at pad positions (padding removal's)
    if mode == "fp32":
        torch.testing.assert_close(out.last_hidden_state[real], expected.last_hidden_state[real],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("padding", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_the_rule_on_cuda_computes_what_the_replaced_forward_computes_bit_for_bit(
        model_type, dtype, padding, lean_runs, monkeypatch):
    """On CUDA tensors in fp16 / bf16 the rule's calls run, with what the replaced forward gives;
    in float32, which the CUDA attention kernel does not take, the replaced forward runs."""
    model = build(model_type).cuda()
    patched = transfuse.patch(copy.deepcopy(model).to(dtype))
    inputs = {name: t.cuda() for name, t in batch(padding).items()}
    inputs["input_ids"][0, 3] = model.config.pad_token_id
    with torch.inference_mode():
        out = patched(**inputs)
    assert lean_runs() == [True]
    replaced = replaced_forward(monkeypatch, patched, inputs)
    assert torch.equal(out.last_hidden_state, replaced.last_hidden_state)
    assert torch.equal(out.pooler_output, replaced.pooler_output)
    assert not out.last_hidden_state[~inputs["attention_mask"].bool()].any()
    with torch.inference_mode():
        transfuse.patch(copy.deepcopy(model))(**inputs)
    assert lean_runs() == [False]


def test_positional_arguments_tuples_and_a_model_without_pooler(lean_runs):
    model = build("bert")
    patched = transfuse.patch(copy.deepcopy(model))
    inputs = batch(padding=True)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]
    with torch.inference_mode():
        expected = model(**inputs, return_dict=False)
        as_tuple = patched(ids, mask, types, return_dict=False)
        positional = patched(ids, mask, token_type_ids=types)
    assert lean_runs() == [True, True]
    assert type(as_tuple) is tuple and len(as_tuple) == len(expected) == 2
    real = mask.bool()
    torch.testing.assert_close(as_tuple[0][real], expected[0][real], rtol=1e-5, atol=1e-5)
    assert torch.equal(positional.last_hidden_state, as_tuple[0])
    assert torch.equal(positional.pooler_output, as_tuple[1])

    patched.pooler = None  # (as BertModel(add_pooling_layer=False))
    with torch.inference_mode():
        assert patched(**inputs).pooler_output is None
    assert lean_runs() == [True]


def test_hooks_recorded_outputs_and_other_arguments_run_the_replaced_forward(lean_runs):
    """Hooks of the model, its embeddings or encoder; autograd; hidden states or attentions asked
    for; input embeddings or positions given: the forward the rule replaced runs (with what the
    unpatched model gives), the hooks too."""
    model = build("bert")
    patched = transfuse.patch(copy.deepcopy(model))
    inputs = batch(padding=True)
    real = inputs["attention_mask"].bool()

    def check(out, reference):
        torch.testing.assert_close(out.last_hidden_state[real],
                                   reference.last_hidden_state[real], rtol=1e-5, atol=1e-5)

    with torch.inference_mode():
        expected = model(**inputs)
    for module in (patched, patched.embeddings, patched.encoder):
        seen = []
        handle = module.register_forward_hook(lambda *args: seen.append(1))
        with torch.inference_mode():
            check(patched(**inputs), expected)
        handle.remove()
        assert seen == [1] and lean_runs() == [False]

    out = patched(**inputs)  # autograd records
    out.last_hidden_state[real].sum().backward()
    assert lean_runs() == [False]
    assert patched.encoder.layer[0].output.dense.weight.grad is not None
    check(out, expected)

    with torch.inference_mode():
        states = patched(**inputs, output_hidden_states=True).hidden_states
        attentions = patched(**inputs, output_attentions=True).attentions
        embedded = patched(inputs_embeds=patched.embeddings.word_embeddings(inputs["input_ids"]),
                           attention_mask=inputs["attention_mask"],
                           token_type_ids=inputs["token_type_ids"])
        positioned = patched(**inputs, position_ids=torch.arange(11).expand(3, 11))
    assert lean_runs() == [False] * 4
    assert len(states) == len(attentions) + 1 == model.config.num_hidden_layers + 1
    patched.config.output_hidden_states = True  # asked for by the config (transformers refuses
    with torch.inference_mode():                # output_attentions there with this attention)
        assert len(patched(**inputs).hidden_states) == model.config.num_hidden_layers + 1
    patched.config.output_hidden_states = False
    assert lean_runs() == [False]
    with torch.inference_mode():  # (transformers' capturing hooks, left on the layers: inert)
        check(patched(**inputs), expected)
    assert lean_runs() == [True]
    check(embedded, expected)
    check(positioned, expected)


def test_a_padded_batch_without_padding_removal_runs_the_masked_forward(lean_runs):
    patched = transfuse.patch(build("bert"), unpad=False)
    with torch.inference_mode():
        patched(**batch(padding=True))
        patched(**batch(padding=False))
    assert lean_runs() == [False, True]


def test_the_rule_wraps_padding_removal_in_copies_and_until_unpatched():
    patched = transfuse.patch(build("bert"))
    copied = copy.deepcopy(patched)
    for model in (patched, copied):
        assert model.forward.__func__ is encoder_model._encoder_model_forward
        assert model.forward.__self__ is model
        inner = model.__dict__[encoder_model.INNER_ATTR]
        assert inner.__func__ is unpad._base_forward and inner.__self__ is model
    assert transfuse.patched_modules(patched)["<model><encoder_model>"]
    transfuse.patch(patched)  # twice: unchanged
    assert patched.__dict__[encoder_model.INNER_ATTR].__func__ is unpad._base_forward
    transfuse.unpatch(copied)
    assert not {"forward", encoder_model.INNER_ATTR, encoder_model.FORWARD_ATTR} & \
        copied.__dict__.keys()
    assert not any(key.endswith("<encoder_model>") for key in transfuse.patched_modules(copied))


def test_a_model_with_a_forward_of_its_own_is_left_alone():
    model = build("bert")
    calls = []
    model.forward = lambda *args, **kwargs: calls.append(1) or type(model).forward(
        model, *args, **kwargs)
    transfuse.patch(model)
    assert encoder_model.FORWARD_ATTR not in model.__dict__
    with torch.inference_mode():
        model(**batch(padding=True))
    assert calls == [1]


def test_a_bert_model_whose_forward_reads_otherwise_is_left_alone():
    from transformers import BertModel

    class Tweaked(BertModel):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            return super().forward(input_ids, attention_mask, **kwargs)

    Tweaked.__name__ = "BertModel"
    model = Tweaked(build("bert").config).eval()
    transfuse.patch(model)
    assert encoder_model.FORWARD_ATTR not in model.__dict__


def test_embeddings_of_another_class_run_the_replaced_forward(lean_runs):
    """RoBERTa's embeddings (no rule of their own: the rule read their class at patch time)
    swapped for a class that computes otherwise: its forward runs."""
    patched = transfuse.patch(build("roberta"))
    inputs = batch(padding=True)
    original = type(patched.embeddings)

    class Doubled(original):
        def forward(self, *args, **kwargs):
            return original.forward(self, *args, **kwargs) * 2

    with torch.inference_mode():
        before = patched(**inputs).last_hidden_state
        patched.embeddings.__class__ = Doubled
        after = patched(**inputs).last_hidden_state
    assert lean_runs() == [True, False]
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm_roberta", "camembert"])
def test_the_rule_reads_the_forwards_of_each_family_it_names(family):
    """(The CI leg on the GPU machine's transformers reads that version's.)"""
    import importlib
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    prefix = {"bert": "Bert", "roberta": "Roberta", "xlm_roberta": "XLMRoberta",
              "camembert": "Camembert"}[family]
    model_class = getattr(module, f"{prefix}Model")
    assert model_class.__name__ in encoder_model.MODEL_RULES
    assert encoder_model._reads_as_expected(model_class, getattr(module, f"{prefix}Embeddings"))
