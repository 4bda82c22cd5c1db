"""A broad check of families outside the detailed tables (tests/test_hf_families.py,
tests/test_hf_attention.py): each tiny random model, patched with the defaults, computes what it
computes unpatched on a padded batch and on one unpadded sequence (fp32, relative 1e-4: the
kernels round otherwise than eager), and causal and seq2seq models generate the same greedy
tokens, left-padded for causal ones. Sweeps like this one found GPT-OSS's attention sinks
dropped, DeepSeek V3's narrower values refused, PegasusX's, NLLB-MoE's and BigBirdPegasus's masks
misread and Splinter's unpadded sequences attended causally. A family this
transformers does not know is skipped."""
import copy
import warnings

import pytest
import torch

import transfuse

pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,  # noqa: E402
                          AutoModelForImageTextToText, AutoModelForSeq2SeqLM)

from hf_models import MORE_DECODER, SPECIAL_IDS as IDS, VOCAB, WIDE  # noqa: E402

DECODER = dict(MORE_DECODER, **IDS)
HEAD_8 = dict(DECODER, head_dim=8)
MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, pad_token_id=0, **WIDE)
SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
               max_position_embeddings=64, init_std=0.2, decoder_start_token_id=1, **IDS)
T5_LIKE = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
               initializer_factor=5.0, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4, **WIDE)
MROPE = dict(HEAD_8, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})

# model_type -> (kind, config)
CAUSAL = {
    "phi3": DECODER, "mixtral": dict(DECODER, **MOE), "qwen2_moe": dict(DECODER, **MOE),
    "qwen3_moe": dict(DECODER, **MOE), "olmo2": DECODER, "cohere": DECODER, "cohere2": DECODER,
    "starcoder2": DECODER, "stablelm": DECODER, "glm4": DECODER, "helium": HEAD_8,
    "exaone4": DECODER, "ernie4_5": DECODER, "seed_oss": DECODER, "arcee": DECODER,
    "nemotron": DECODER, "persimmon": DECODER, "gpt_bigcode": DECODER,
    "gptj": dict(DECODER, rotary_dim=4), "llama4_text": DECODER, "bitnet": DECODER,
    "lfm2": DECODER, "ministral": HEAD_8, "granitemoe": dict(DECODER, **MOE),
    "qwen3_next": dict(HEAD_8, **MOE, layer_types=["linear_attention", "full_attention"],
                       linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=8, linear_value_head_dim=8,
                       shared_expert_intermediate_size=16),
}
SEQ2SEQ_FAMILIES = {
    "umt5": T5_LIKE, "longt5": T5_LIKE, "switch_transformers": dict(T5_LIKE, num_experts=2),
    "mbart": SEQ2SEQ, "blenderbot": SEQ2SEQ, "plbart": SEQ2SEQ, "mvp": SEQ2SEQ, "led": SEQ2SEQ,
    "fsmt": dict(SEQ2SEQ, src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, langs=["en", "de"]),
}
ENCODERS = {name: ENCODER for name in (
    "xlm-roberta", "deberta-v2", "ernie", "roformer", "esm", "megatron-bert", "big_bird",
    "rembert", "nomic_bert", "eurobert", "modernbert-decoder", "data2vec-text", "markuplm",
    "splinter")}
VISION_ENCODERS = {name: VISION for name in (
    "deit", "beit", "dinov2", "siglip_vision_model", "clip_vision_model", "dpt", "ijepa")}
# multimodal models, text only
IMAGE_TEXT = {
    "qwen2_5_vl": dict(text_config=MROPE, vision_config=dict(
        depth=1, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4),
        image_token_id=VOCAB - 3, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 1),
    "smolvlm": dict(text_config=dict(DECODER, model_type="llama"), vision_config=VISION,
                    image_token_id=VOCAB - 1),
}
CASES = {**{t: ("causal", c) for t, c in CAUSAL.items()},
         **{t: ("seq2seq", c) for t, c in SEQ2SEQ_FAMILIES.items()},
         **{t: ("encoder", c) for t, c in ENCODERS.items()},
         **{t: ("vision", c) for t, c in VISION_ENCODERS.items()},
         **{t: ("image_text", c) for t, c in IMAGE_TEXT.items()}}
HEADS = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModel,
         "vision": AutoModel, "image_text": AutoModelForImageTextToText}


def tiny(model_type):
    kind, overrides = CASES[model_type]
    try:
        config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **overrides)
    except ValueError as error:  # a family this transformers does not have
        pytest.skip(str(error)[:80])
    torch.manual_seed(0)
    return HEADS[kind].from_config(config).eval()


def inputs(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "vision":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}
    ids = torch.randint(3, VOCAB - 4, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    if kind in ("causal", "image_text"):
        mask[1, :4] = 0  # left padding
    else:
        mask[1, 5:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if kind == "seq2seq":
        batch["decoder_input_ids"] = torch.randint(3, VOCAB - 4, (2, 5), generator=g)
    return batch


@pytest.mark.parametrize("model_type", CASES)
def test_patched_model_computes_what_the_unpatched_one_does(model_type):
    kind = CASES[model_type][0]
    model = tiny(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (modules patch leaves alone are named in a warning)
        patched = transfuse.patch(copy.deepcopy(model))
    assert transfuse.patched_modules(patched)
    batch = inputs(kind)
    single = {k: v[:1] for k, v in batch.items() if k != "attention_mask"}  # (no mask at all)
    for given in (batch, single):
        with torch.no_grad():
            outputs = [m(**given)[0] for m in (model, patched)]
        if "attention_mask" in given and kind != "seq2seq":
            real = given["attention_mask"].bool()
            outputs = [out[real] for out in outputs]
        expected, actual = outputs
        torch.testing.assert_close(actual, expected, rtol=0,
                                   atol=1e-4 * expected.abs().max().item())
    if kind in ("causal", "seq2seq", "image_text"):
        prompt = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
        with torch.no_grad():
            tokens = [m.generate(**prompt, max_new_tokens=4, do_sample=False)
                      for m in (model, patched)]
        assert torch.equal(tokens[1], tokens[0])
