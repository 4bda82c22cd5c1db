"""Tiny random transformers models of every supported family, built from configs (nothing is
downloaded), and what the HF tests do with them."""
import importlib
import inspect

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,  # noqa: E402
                          AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq)

VOCAB = 100
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=64)
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64)
SEQ2SEQ = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
               max_position_embeddings=64)
# model_type -> (head, config overrides, norm class the model uses)
FAMILIES = {
    "bert": ("base", ENCODER, "LayerNorm"),
    "distilbert": ("base", dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                max_position_embeddings=64), "LayerNorm"),
    "roberta": ("base", ENCODER, "LayerNorm"),
    "modernbert": ("base", dict(ENCODER, local_attention=6, global_attn_every_n_layers=2,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                sep_token_id=2), "LayerNorm"),
    "gpt2": ("causal", dict(n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=1,
                            eos_token_id=2), "LayerNorm"),
    "bart": ("seq2seq", SEQ2SEQ, "LayerNorm"),
    "marian": ("seq2seq", dict(SEQ2SEQ, pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1),
               "LayerNorm"),
    "t5": ("seq2seq", dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, d_kv=16), "T5LayerNorm"),
    "llama": ("causal", DECODER, "LlamaRMSNorm"),
    "mistral": ("causal", dict(DECODER, head_dim=8, sliding_window=4), "MistralRMSNorm"),
    "qwen2": ("causal", DECODER, "Qwen2RMSNorm"),
    "gemma": ("causal", dict(DECODER, head_dim=8), "GemmaRMSNorm"),
}
HEADS = {"base": AutoModel, "causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM}


def build(model_type, seed=0, attn_implementation=None):
    """A tiny random model of the family, fp32, eval mode, with norm weights that are not 1 / 0
    (a MORE_FAMILIES family's from build_more)."""
    if model_type not in FAMILIES and attn_implementation is None:
        return build_more(model_type, seed)
    head, overrides, _ = FAMILIES[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **overrides)
    torch.manual_seed(seed)
    model = HEADS[head].from_config(config, attn_implementation=attn_implementation).eval()
    with torch.no_grad():  # fresh norms are ones / zeros: make them random so mistakes show
        for module in model.modules():
            if "Norm" in type(module).__name__:
                for param in module.parameters(recurse=False):
                    param.add_(torch.randn_like(param) * 0.1)
    return model


def make_batch(model_type, seed=1):
    """Two sequences of 9 random tokens; the second is padded after 6 tokens."""
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(3, VOCAB - 1, (2, 9), generator=g),
             "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    batch["attention_mask"][1, 6:] = 0
    if (FAMILIES.get(model_type) or MORE_FAMILIES[model_type])[0] == "seq2seq":
        batch["decoder_input_ids"] = torch.randint(3, VOCAB - 1, (2, 5), generator=g)
    return batch


def run(model, batch):
    out = model(**batch)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def gradients(model, batch):
    """d(sum(output * fixed random probe)) / d(parameter), by parameter name (None if unused)."""
    model.zero_grad(set_to_none=True)
    out = run(model, batch)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out.float() * probe).sum().backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def assert_close_scaled(actual, expected, tol=1e-5, name=""):
    """fp32 rule: |actual - expected| <= tol * (|expected| + max |expected|), elementwise."""
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale + 1e-30,
                               msg=lambda m: f"{name}: {m}")


# Tiny causal LMs of BLOOM and Falcon, whose attention modules compute attention themselves, not
# through transformers' attention interface (OWN_ATTENTION: patch leaves their attention unchanged
# and says so); Falcon's goes through the interface from transformers 5.25 on.
TINY_CAUSAL = {"bloom": dict(hidden_size=32, n_layer=2, n_head=4),
               "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)}


def computes_own_attention(model_type):
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return "ALL_ATTENTION_FUNCTIONS" not in inspect.getsource(module)


OWN_ATTENTION = {m: config for m, config in TINY_CAUSAL.items() if computes_own_attention(m)}


def build_tiny_causal(model_type, seed=0):
    """A tiny random causal LM of a TINY_CAUSAL family, fp32, eval mode."""
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **TINY_CAUSAL[model_type])
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()

# More families, tested in tests/test_hf_families.py only (the tests parametrized over FAMILIES
# do not grow): model_type -> (kind, config overrides, norm class the model uses). kind: "encoder"
# (text, right padding), "causal" (left padding, generates), "seq2seq" (generates), "speech"
# (Whisper: input features, decoder padded, generates), "image" (ViT: a batch of images).
# Weights are drawn at 0.2, not transformers' 0.02 (mT5 keeps its own init), so that attention
# logits are not near zero: on near-uniform attention a dropped softcap or window does not show,
# and greedy tokens ignore the encoder. Output heads are untied (tied ones repeat the last token).
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
UNTIED = dict(tie_word_embeddings=False)
WIDE = dict(initializer_range=0.2)
MORE_ENCODER = dict(ENCODER, **WIDE)
MORE_SEQ2SEQ = dict(SEQ2SEQ, init_std=0.2, **UNTIED)
MORE_DECODER = dict(DECODER, **WIDE, **UNTIED)
MHA_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64, **WIDE, **UNTIED)
MORE_FAMILIES = {
    "albert": ("encoder", dict(MORE_ENCODER, embedding_size=16), "LayerNorm"),
    "electra": ("encoder", dict(MORE_ENCODER, embedding_size=16), "LayerNorm"),
    "clip_text_model": ("encoder", dict(MORE_ENCODER, **SPECIAL_IDS), "LayerNorm"),
    "vit": ("image", dict(MORE_ENCODER, image_size=16, patch_size=4), "LayerNorm"),
    "mbart": ("seq2seq", MORE_SEQ2SEQ, "LayerNorm"),
    "pegasus": ("seq2seq", MORE_SEQ2SEQ, "LayerNorm"),
    "m2m_100": ("seq2seq", MORE_SEQ2SEQ, "LayerNorm"),
    "mt5": ("seq2seq", dict(FAMILIES["t5"][1], **UNTIED), "MT5LayerNorm"),
    "whisper": ("speech", dict(MORE_SEQ2SEQ, num_mel_bins=8, max_source_positions=16,
                               max_target_positions=64, decoder_start_token_id=1,
                               begin_suppress_tokens=None, suppress_tokens=None, **SPECIAL_IDS),
                "LayerNorm"),
    "phi": ("causal", MORE_DECODER, "LayerNorm"),
    "gpt_neox": ("causal", dict(MHA_DECODER, intermediate_size=64), "LayerNorm"),
    "opt": ("causal", dict(MHA_DECODER, ffn_dim=64, word_embed_proj_dim=32), "LayerNorm"),
    "qwen3": ("causal", dict(MORE_DECODER, head_dim=8), "Qwen3RMSNorm"),
    # SmolLM3: layer 0 rotary and full attention, layer 1 without rotary (NoPE) and windowed
    "smollm3": ("causal", dict(MORE_DECODER, no_rope_layer_interval=2, use_sliding_window=True,
                               sliding_window=4, **SPECIAL_IDS), "SmolLM3RMSNorm"),
    # Granite: each residual branch scaled, the attention's scale, embeddings and logits too
    "granite": ("causal", dict(MORE_DECODER, residual_multiplier=0.5, attention_multiplier=0.5,
                               embedding_multiplier=4.0, logits_scaling=2.0), "GraniteRMSNorm"),
    # transformers 5.17 builds Gemma 2 with SDPA, which drops the attention softcap (5.24 refuses
    # SDPA for it): the unpatched reference is its eager attention
    "gemma2": ("causal", dict(MORE_DECODER, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                              attn_logit_softcapping=1.0, attn_implementation="eager"),
               "Gemma2RMSNorm"),
    "gemma3_text": ("causal", dict(MORE_DECODER, head_dim=8, sliding_window=4,
                                   query_pre_attn_scalar=8,
                                   layer_types=["sliding_attention", "full_attention"]),
                    "Gemma3RMSNorm"),
    "bloom": ("causal", dict(TINY_CAUSAL["bloom"], **WIDE, **UNTIED), "LayerNorm"),
    "falcon": ("causal", dict(TINY_CAUSAL["falcon"], **WIDE, **UNTIED), "LayerNorm"),
}
MORE_HEADS = {"encoder": AutoModel, "image": AutoModel, "causal": AutoModelForCausalLM,
              "seq2seq": AutoModelForSeq2SeqLM, "speech": AutoModelForSpeechSeq2Seq}


def build_more(model_type, seed=0):
    """A tiny random model of a MORE_FAMILIES family, fp32, eval mode, norms not 1 / 0."""
    kind, overrides, _ = MORE_FAMILIES[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **overrides)
    torch.manual_seed(seed)
    model = MORE_HEADS[kind].from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__:
                for param in module.parameters(recurse=False):
                    param.add_(torch.randn_like(param) * 0.1)
    return model


def padded_batch(seed=1):
    """ids and mask of 3 sequences of 11 positions: one whole, two padded (7 and 2 real)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 99, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    return ids, mask


def real_tokens(model, ids, mask):
    """The model's last hidden states at the real (unmasked) positions."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
