"""The "transfuse" attention implementation in transformers models: padded batches equal their
unpadded runs, outputs and gradients equal eager attention's, greedy generation gives the same
tokens, and the padding mask reaches the kernel (transformers drops it without a registered mask
function). Models are tiny and random, built from configs."""
import copy
import warnings

import pytest
import torch

import transfuse
from transfuse.hf import attention as hf_attention

transformers = pytest.importorskip("transformers")
from hf_models import (FAMILIES, VOCAB, assert_close_scaled, build, gradients,  # noqa: E402
                       make_batch, run)
from transformers import AttentionInterface, AutoModel  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

CAUSAL = [m for m, (head, _, _) in FAMILIES.items() if head == "causal"]
SEQ2SEQ = [m for m, (head, _, _) in FAMILIES.items() if head == "seq2seq"]


def transfuse_model(model_type, **kwargs):
    return build(model_type, attn_implementation=hf_attention.NAME, **kwargs)


def only(batch, index, length):
    """Sequence `index` of a right-padded batch, without its padding."""
    single = {k: v[index:index + 1] for k, v in batch.items()}
    for key in ("input_ids", "attention_mask"):
        single[key] = single[key][:, :length]
    return single


@pytest.fixture
def calls(monkeypatch):
    """Records the attention_mask / causal decision each transfuse attention call gets."""
    seen = []
    original = hf_attention.attention

    def spy(q, k, v, *, mask=None, causal=False, **kwargs):
        seen.append((mask, causal))
        return original(q, k, v, mask=mask, causal=causal, **kwargs)
    monkeypatch.setattr(hf_attention, "attention", spy)
    return seen


def test_import_registers_attention_and_mask_functions():
    assert hf_attention.NAME in AttentionInterface._global_mapping
    assert hf_attention.NAME in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_padded_batch_equals_unpadded_runs_and_eager(model_type, calls):
    model, batch = transfuse_model(model_type), make_batch(model_type)
    with torch.no_grad():
        padded = run(model, batch)
        # every sequence of the padded batch equals its run alone
        for index, length in ((0, 9), (1, 6)):
            alone = run(model, only(batch, index, length))
            assert_close_scaled(padded[index:index + 1, :alone.shape[1]], alone,
                                name=f"{model_type} sequence {index}")
        eager = run(build(model_type, attn_implementation="eager"), batch)
    assert calls, "the transfuse attention was never called"
    assert any(mask is not None for mask, _ in calls), "the padding mask never reached the kernel"
    valid = batch["attention_mask"].bool() if FAMILIES[model_type][0] != "seq2seq" else None
    if valid is not None:
        assert_close_scaled(padded[valid], eager[valid], name=f"{model_type} vs eager")
    else:
        assert_close_scaled(padded, eager, name=f"{model_type} vs eager")


@pytest.mark.parametrize("model_type", CAUSAL)
def test_greedy_generate_with_left_padding_same_tokens_as_eager(model_type):
    prompts = torch.randint(3, VOCAB - 1, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = build(model_type, attn_implementation="eager").generate(prompts, **kwargs)
    assert torch.equal(transfuse_model(model_type).generate(prompts, **kwargs), expected)


@pytest.mark.parametrize("model_type", SEQ2SEQ)
def test_encoder_decoder_generate_same_tokens_as_eager(model_type):
    batch = make_batch(model_type)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    kwargs = dict(max_new_tokens=6, do_sample=False, decoder_start_token_id=0)
    expected = build(model_type, attn_implementation="eager").generate(**inputs, **kwargs)
    assert torch.equal(transfuse_model(model_type).generate(**inputs, **kwargs), expected)


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "t5", "llama", "mistral", "modernbert"])
def test_gradients_equal_eager(model_type):
    batch = make_batch(model_type)
    expected = gradients(build(model_type, attn_implementation="eager"), batch)
    actual = gradients(transfuse_model(model_type), batch)
    assert actual.keys() == expected.keys()
    scale = max(g.abs().max().item() for g in expected.values() if g is not None)
    for name, grad in expected.items():
        if grad is None:
            assert actual[name] is None, name
        else:
            torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m: f"{model_type} grad {name}: {m}")


def attention_weights(out):
    """The non-empty attention-weight fields of a model output ("attentions",
    "cross_attentions", ...)."""
    return {k: v for k, v in out.items() if k.endswith("attentions") and v}


def assert_same_weights(actual, expected, name):
    assert expected and actual.keys() == expected.keys(), name
    for key, weights in expected.items():
        assert len(actual[key]) == len(weights) > 0, f"{name} {key}"
        for a, e in zip(actual[key], weights):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_output_attentions_fall_back_to_eager_with_one_warning(model_type):
    """The weights equal eager's in every family, GPT-2 included (its model pops
    output_attentions before the attention function runs: the request is read where transformers
    records it)."""
    model, batch = transfuse_model(model_type), make_batch(model_type)
    transfuse.backends._warned.discard(("attention", "output_attentions"))
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        out = model(**batch, output_attentions=True)
        model(**batch, output_attentions=True)
    messages = [str(w.message) for w in record if "output_attentions" in str(w.message)
                and "transfuse" in str(w.message)]
    assert len(messages) == 1, messages
    with torch.no_grad():
        expected = build(model_type, attn_implementation="eager")(**batch, output_attentions=True)
    assert_same_weights(attention_weights(out), attention_weights(expected), model_type)


def test_assisted_generate_with_output_attentions_equals_eager():
    """Assisted decoding splits the attentions of each verified step (an IndexError in
    transformers when the model returns none)."""
    prompt = torch.randint(3, VOCAB - 1, (1, 7), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_attentions=True,
                  return_dict_in_generate=True)
    outs = []
    for implementation in ("eager", hf_attention.NAME):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs.append(build("gpt2", attn_implementation=implementation).generate(
                prompt, assistant_model=build("gpt2", seed=1, attn_implementation=implementation),
                **kwargs))
    expected, actual = outs
    assert torch.equal(actual.sequences, expected.sequences)
    assert len(actual.attentions) == len(expected.attentions) == 4
    for step, (a, e) in enumerate(zip(actual.attentions, expected.attentions)):
        assert_same_weights({"attentions": a}, {"attentions": e}, f"step {step}")


@pytest.mark.parametrize("model_type", ["bert", "llama"])
def test_from_pretrained_with_attn_implementation(model_type, tmp_path):
    build(model_type).save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, attn_implementation="transfuse")
    assert model.config._attn_implementation == "transfuse"
    batch = make_batch(model_type)
    eager = AutoModel.from_pretrained(tmp_path, attn_implementation="eager")
    with torch.no_grad():
        valid = batch["attention_mask"].bool()
        assert_close_scaled(run(model, batch)[valid], run(eager, batch)[valid], name=model_type)


@pytest.mark.parametrize("model_type", ["bert", "bart", "llama"])
def test_patch_attention_then_unpatch_restores_the_previous_implementation(model_type):
    model = build(model_type)
    before = model.config._attn_implementation
    assert before != hf_attention.NAME
    batch = make_batch(model_type)
    with torch.no_grad():
        expected = run(model, batch)
    transfuse.patch(model, attention=True, norm=False)
    transfuse.patch(model, attention=True, norm=False)  # twice: harmless
    assert model.config._attn_implementation == hf_attention.NAME
    assert "<attention>" in transfuse.patched_modules(model)
    with torch.no_grad():
        valid = batch["attention_mask"].bool() if model_type != "bart" else slice(None)
        assert_close_scaled(run(model, batch)[valid], expected[valid], name=model_type)
    transfuse.unpatch(model)
    assert model.config._attn_implementation == before
    assert transfuse.patched_modules(model) == {}


def test_sliding_window_changes_the_result_and_matches_eager():
    """Mistral with a window of 4 over 9 tokens: the window matters, and it is respected."""
    batch = make_batch("mistral")
    with torch.no_grad():
        windowed = run(transfuse_model("mistral"), batch)
        eager = run(build("mistral", attn_implementation="eager"), batch)
    valid = batch["attention_mask"].bool()
    assert_close_scaled(windowed[valid], eager[valid], name="mistral")
    model = transfuse_model("mistral")
    model.config.sliding_window = None
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    with torch.no_grad():
        full = run(model, batch)
    assert (full[0] - windowed[0]).abs().max() > 1e-3


def gpt_oss(seed=0):
    """A tiny random GPT-OSS (attention sinks: one learned logit per head in each softmax;
    sliding-window and full layers), its sinks far from zero so that dropping them shows."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("gpt_oss", vocab_size=VOCAB, hidden_size=32,
                                  intermediate_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                  initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2.0)
    return model


def test_attention_sinks_run_the_eager_attention_with_one_warning(calls):
    """GPT-OSS passes its sinks (s_aux), which the kernels do not compute: those calls run its
    eager attention (one warning), so a padded batch and greedy generation equal the unpatched
    model's; on packed sequences the call raises."""
    model = gpt_oss()
    patched = transfuse.patch(gpt_oss(), norm=False, blocks=False, unpad=False)
    assert patched.config._attn_implementation == hf_attention.NAME
    ids = torch.randint(3, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    transfuse.backends._warned.discard(("attention", "sinks"))
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        for m in (model, patched):
            m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        logits = [m(input_ids=ids, attention_mask=mask).logits[mask.bool()]
                  for m in (model, patched)]
        tokens = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                             do_sample=False) for m in (model, patched)]
    messages = [str(w.message) for w in record if "sinks" in str(w.message)]
    assert len(messages) == 1 and "s_aux" in messages[0], messages
    assert calls == []  # (no call reached the kernels)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0)
    assert torch.equal(tokens[1], tokens[0])
    layer = patched.model.layers[0].self_attn
    q = k = v = torch.randn(1, 4, 6, 8)
    packed = dict(cu_seq_lens_q=torch.tensor([0, 2, 6], dtype=torch.int32),
                  cu_seq_lens_k=torch.tensor([0, 2, 6], dtype=torch.int32),
                  max_length_q=4, max_length_k=4)
    with pytest.raises(ValueError, match="sinks on packed sequences"):
        hf_attention.attention_forward(layer, q, k, v, None, scaling=0.35, s_aux=layer.sinks,
                                       **packed)


@pytest.mark.parametrize("name", ["indices", "block_indices"])
def test_sparse_attention_indices_raise_a_value_error(name):
    """The keys a sparse attention selected are not computed by the kernels: a clear error
    naming them, not a dense result."""
    module = build("llama").model.layers[0].self_attn
    q = k = v = torch.randn(1, 4, 5, 8)
    with pytest.raises(ValueError, match=f"passes {name} .*attn_implementation='sdpa'"):
        hf_attention.attention_forward(module, q, k, v, None, scaling=0.35,
                                       **{name: torch.zeros(1, 5, 2, dtype=torch.long)})


def test_the_eager_fallback_without_a_mask_applies_the_causal_pattern_and_window():
    """Where no mask is given (the module's causality and window say what it would), the eager
    fallback gets them as a mask: its output is the kernels' (reference.attention's)."""
    module = build("llama").model.layers[0].self_attn
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, heads, 9, 8, generator=g) for heads in (4, 2, 2))  # (GQA)
    expected = transfuse.reference.attention(q, k, v, causal=True, scale=0.35, window=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, weights = hf_attention.attention_forward(module, q, k, v, None, scaling=0.35,
                                                      sliding_window=3, output_attentions=True)
    assert weights is not None
    assert_close_scaled(out.transpose(1, 2), expected)


@pytest.mark.parametrize("value_dim", [5, 12])
@pytest.mark.parametrize("packed", [False, True])
def test_values_of_another_head_dim_than_queries_and_keys(value_dim, packed):
    """Multi-head latent attention (DeepSeek V2 / V3) gives the values another head_dim: the
    output is reference.attention's with the values as given, padded and on packed sequences,
    and the scale defaults to the queries' head_dim."""
    module = build("llama").model.layers[0].self_attn
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 4, 7, 8, generator=g), torch.randn(1, 2, 7, 8, generator=g)
    v = torch.randn(1, 2, 7, value_dim, generator=g)
    if packed:  # sequences of 3 and 4 tokens
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        out, _ = hf_attention.attention_forward(module, q, k, v, None, cu_seq_lens_q=cu,
                                                cu_seq_lens_k=cu, max_length_q=4,
                                                max_length_k=4)
        expected = torch.cat([transfuse.reference.attention(q[:, :, a:b], k[:, :, a:b],
                                                            v[:, :, a:b], causal=True)
                              for a, b in ((0, 3), (3, 7))], dim=2)
    else:
        out, _ = hf_attention.attention_forward(module, q, k, v, None)
        expected = transfuse.reference.attention(q, k, v, causal=True)
    assert out.shape == (1, 7, 4, value_dim)
    assert_close_scaled(out.transpose(1, 2), expected)


def test_a_deepseek_v3_model_computes_what_the_unpatched_one_does():
    """DeepSeek V3's attention (values of 8 columns, queries and keys of 12: 8 + 4 rotary):
    a padded batch and left-padded greedy generation as unpatched."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(
        "deepseek_v3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, kv_lora_rank=16, q_lora_rank=16, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, first_k_dense_replace=1, n_group=1,
        topk_group=1, initializer_range=0.2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    patched = transfuse.patch(copy.deepcopy(model))
    assert patched.config._attn_implementation == hf_attention.NAME
    ids = torch.randint(3, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        logits = [m(input_ids=ids, attention_mask=mask).logits[mask.bool()]
                  for m in (model, patched)]
        tokens = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                             do_sample=False) for m in (model, patched)]
    assert_close_scaled(logits[1], logits[0])
    assert torch.equal(tokens[1], tokens[0])


# Families whose transformers class does not support SDPA and whose modules rely on eager's
# masks: PegasusX's and NLLB-MoE's decoder self-attention say is_causal=False (a skipped causal
# mask would make them see later tokens), BigBirdPegasus's encoder adds the mask itself.
NO_SDPA = {"pegasus_x": {}, "nllb-moe": dict(num_experts=2), "bigbird_pegasus": {}}


@pytest.mark.parametrize("model_type", NO_SDPA)
def test_models_without_sdpa_support_get_eager_masks(model_type):
    """Their config classes get eager attention's masks (masks_skippable), so a padded batch and
    greedy generation equal the unpatched models'."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, init_std=0.2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, **NO_SDPA[model_type])
    assert not hf_attention.masks_skippable(type(config))
    assert hf_attention.masks_skippable(type(build("bart").config))
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    patched = transfuse.patch(copy.deepcopy(model))
    ids = torch.randint(3, VOCAB - 1, (2, 9), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    decoder_ids = torch.randint(3, VOCAB - 1, (2, 5), generator=torch.Generator().manual_seed(7))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # (the attention modules patch leaves)
        logits = [m(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
                  for m in (model, patched)]
        tokens = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                             do_sample=False) for m in (model, patched)]
    assert_close_scaled(logits[1], logits[0])
    assert torch.equal(tokens[1], tokens[0])
