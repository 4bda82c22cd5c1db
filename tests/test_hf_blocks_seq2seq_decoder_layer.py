"""A BART-like decoder layer's step in two transfuse._C calls around its self-attention cache's
update (blocks.seq2seq_decoder_layer._seq2seq_decoder_layer_fused,
csrc/bindings/decoder_layer.cpp): on CPU tensors in inference, each decoding step after the first
(its cross-attention then reads the encoder's keys and values from the cache) of a post-norm
(BART, Marian) or pre-norm (mBART, M2M100, Pegasus, Whisper) layer whose modules carry the rules
computes what they compute module by module, bit for bit, and leaves every other call to them."""
import copy
import importlib

import pytest
import torch

import transfuse
from transfuse.hf import blocks

from helpers import count_results, returning_none
from hf_models import assert_close_scaled, build

pytestmark = pytest.mark.skipif(transfuse.backends.extension()[0] is None,
                                reason="transfuse._C not built")

# (BART: GELU, post-norm; Marian: SiLU, post-norm; mBART: GELU, pre-norm; M2M100: ReLU,
# pre-norm; Pegasus: GELU, pre-norm; Whisper: GELU, pre-norm, its query scaled before the
# attention, no key bias, a source of audio features)
SEQ2SEQ = ["bart", "marian", "mbart", "m2m_100", "pegasus", "whisper"]
SIDES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
         "w8a8": (torch.float32, "w8a8"), "bf16 w8a16": (torch.bfloat16, "w8a16")}
NEW_TOKENS = 6


@pytest.fixture(params=["own GEMMs", "torch GEMMs"])
def fused(request, monkeypatch):
    """How many layer calls the two transfuse._C calls took; the tiny models' float GEMMs
    transfuse's own (thresholds lowered) or torch's (as they are)."""
    if request.param == "own GEMMs":
        monkeypatch.setattr(importlib.import_module("transfuse.ops.linear"), "MIN_WORK", 0)
    return count_results(monkeypatch, blocks.seq2seq_decoder_layer, "_seq2seq_decoder_layer_fused")


def module_by_module():
    """The rules' modules, not the fused calls."""
    return returning_none(blocks.seq2seq_decoder_layer, "_seq2seq_decoder_layer_fused")


def seq2seq(model_type):
    """A tiny random encoder-decoder whose attention is far from uniform (its query and key
    projections scaled up) and whose biases are not zero, so that a dropped mask, bias or
    cross-attention shows in the logits."""
    model = build(model_type)
    if getattr(model.config, "decoder_start_token_id", None) is None:
        model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = 3
    with torch.no_grad():
        for layer in model.get_decoder().layers:
            for attention in (layer.self_attn, layer.encoder_attn):
                attention.q_proj.weight.mul_(8)
                attention.k_proj.weight.mul_(8)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.5)
    return model


def padded_source():
    """Two source sentences, the second right-padded."""
    ids = torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids * mask, mask


def source(model):
    """The padded source, or for Whisper two random clips' features."""
    config = model.config
    if config.model_type != "whisper":
        return dict(zip(("input_ids", "attention_mask"), padded_source()))
    features = torch.randn(2, config.num_mel_bins, 2 * config.max_source_positions,
                           generator=torch.Generator().manual_seed(1))
    return {"input_features": features.to(model.dtype)}


def generated(model, **kwargs):
    """Greedy tokens and each step's logits, for the model's source."""
    with torch.no_grad():
        out = model.generate(**source(model), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("model_type", SEQ2SEQ)
def test_fused_steps_equal_the_modules_bit_for_bit(model_type, side, fused):
    """Greedy translation of a padded batch (the cross-attention masked): every layer of every
    step after the first ran the fused calls, and the tokens and each step's logits are those of
    the same patched model run module by module (in fp32: also the unpatched model's tokens, its
    logits within 1e-5)."""
    dtype, int8 = SIDES[side]
    model = seq2seq(model_type).to(dtype)
    patched = transfuse.patch(copy.deepcopy(model), int8=int8)
    tokens, logits = generated(patched)
    assert fused[0] == model.config.decoder_layers * (NEW_TOKENS - 1)
    with module_by_module():
        expected_tokens, expected_logits = generated(patched)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(logits, expected_logits)
    if side == "fp32":
        unpatched_tokens, unpatched_logits = generated(model)
        assert torch.equal(tokens, unpatched_tokens)
        assert_close_scaled(logits, unpatched_logits)


@pytest.mark.parametrize("model_type", ["marian", "m2m_100"])
def test_fused_steps_read_the_decoder_mask(model_type, fused):
    """A decoder prompt left-padded in its second row (decoder_attention_mask, which generate
    extends step by step): the fused steps read that mask in the self-attention. The tokens and
    logits equal the module path's and the unpatched model's (within 1e-5); the second row's
    logits with the mask dropped differ by more than ten times that."""
    model = seq2seq(model_type)
    patched = transfuse.patch(copy.deepcopy(model))
    start = model.config.decoder_start_token_id
    decoder_ids = torch.tensor([[start, 40, 41, 42], [0, 0, start, 43]])
    decoder_mask = (torch.arange(4) >= torch.tensor([[0], [2]])).long()
    kwargs = dict(decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
    tokens, logits = generated(patched, **kwargs)
    assert fused[0] == model.config.decoder_layers * (NEW_TOKENS - 1)
    with module_by_module():
        expected_tokens, expected_logits = generated(patched, **kwargs)
    assert torch.equal(tokens, expected_tokens) and torch.equal(logits, expected_logits)
    unpatched_tokens, unpatched_logits = generated(model, **kwargs)
    assert torch.equal(tokens, unpatched_tokens)
    assert_close_scaled(logits, unpatched_logits)
    _, unmasked_logits = generated(model, decoder_input_ids=decoder_ids)
    dropped = (unmasked_logits[:, 1] - logits[:, 1]).abs().max()
    assert dropped > 1e-4 * logits.abs().max(), "ten times the tolerance above"


def test_other_calls_run_the_modules(fused):
    """The first step (the cross-attention's keys and values not cached yet), a call without a
    cache, one asking for attention weights and one recording gradients run the modules: no fused
    call, and what the unpatched model computes."""
    model = seq2seq("marian")
    patched = transfuse.patch(copy.deepcopy(model))
    ids, mask = padded_source()
    batch = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4])
    with torch.no_grad():
        for kwargs in ({}, {"use_cache": False}, {"output_attentions": True}):
            assert_close_scaled(patched(**batch, **kwargs).logits,
                                model(**batch, **kwargs).logits, name=str(kwargs))
    patched(**batch).logits.sum().backward()
    assert fused[0] == 0
    tokens, _ = generated(patched, output_attentions=True)
    assert fused[0] == 0
    assert torch.equal(tokens, generated(model)[0])


def test_a_swapped_module_runs_the_modules(fused):
    """A layer whose fc1 is no longer the nn.Linear the rule read (a user's module) runs its
    modules at every step; the other layers still run fused."""
    model = seq2seq("bart")
    patched = transfuse.patch(copy.deepcopy(model))
    first = patched.get_decoder().layers[0]
    first.fc1 = torch.nn.Sequential(first.fc1)
    tokens, _ = generated(patched)
    assert fused[0] == (model.config.decoder_layers - 1) * (NEW_TOKENS - 1)
    model.get_decoder().layers[0].fc1 = torch.nn.Sequential(model.get_decoder().layers[0].fc1)
    assert torch.equal(tokens, generated(model)[0])
