"""The rules per family: class name -> (rule, the attributes it uses).
"""
from __future__ import annotations


_BERT_LIKE = ("Bert", "Roberta", "XLMRoberta", "Electra", "Camembert")
_DECODERS = ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma", "SmolLM3", "Granite")
# decoders whose layers norm the attention's and the MLP's outputs too (sandwich_rms_norm)
_SANDWICH_DECODERS = ("Gemma2", "Gemma3")
# encoder-decoder models whose decoder layers are BART's, post-norm or pre-norm
_SEQ2SEQ_DECODERS = ("Bart", "Marian", "PLBart", "BlenderbotSmall", "MBart", "M2M100", "Pegasus",
                     "Blenderbot", "Whisper")
SEQ2SEQ_NORMS = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")

# class name -> (rule, the attributes it uses)
BLOCK_RULES = {
    **{f"{family}SelfAttention": ("projections", ("query", "key", "value"))
       for family in _BERT_LIKE},
    **{f"{family}{part}": ("residual_norm", ("dense", "dropout", "LayerNorm"))
       for family in _BERT_LIKE for part in ("SelfOutput", "Output")},
    "MPNetOutput": ("residual_norm", ("dense", "dropout", "LayerNorm")),
    # MPNet: BERT's layer with a relative position bias in its attention (RELATIVE_BIAS_*)
    "MPNetSelfAttention": ("relative_bias_attention", ()),  # (q, k, v, o: the linear rule's)
    "MPNetAttention": ("relative_bias_container", ("attn", "LayerNorm", "dropout")),
    "MPNetLayer": ("relative_bias_layer", ("attention", "intermediate", "output")),
    "MPNetEncoder": ("relative_bias_stack", ("layer",)),
    **{f"{family}Intermediate": ("bias_gelu", ("dense", "intermediate_act_fn"))
       for family in (*_BERT_LIKE, "MPNet")},
    **{f"{family}Layer": ("encoder_layer", ("attention", "intermediate", "output"))
       for family in _BERT_LIKE},
    **{f"{family}Encoder": ("encoder_stack", ("layer",)) for family in _BERT_LIKE},
    # DistilBERT's block and stack: the same computation under other names (DISTILBERT_*)
    "TransformerBlock": ("encoder_layer", ("attention", "sa_layer_norm", "ffn",
                                           "output_layer_norm")),
    "Transformer": ("encoder_stack", ("layer",)),
    # (RoBERTa's embeddings number positions from the ids: another forward)
    **{f"{family}Embeddings": ("embeddings", ("word_embeddings", "token_type_embeddings",
                                              "position_embeddings", "LayerNorm", "dropout"))
       for family in ("Bert", "Electra")},
    **{f"{family}Attention": ("rotary_attention", ("q_proj", "k_proj", "v_proj"))
       for family in (*_DECODERS, *_SANDWICH_DECODERS)},
    **{f"{family}MLP": ("gated_mlp", ("gate_proj", "up_proj"))
       for family in (*_DECODERS, *_SANDWICH_DECODERS)},
    "ModernBertAttention": ("joint_rotary_attention", ()),  # (Wqkv, Wo: the linear rule's)
    "ModernBertMLP": ("joint_gated_mlp", ()),  # (Wi, Wo: the linear rule's)
    **{f"{family}DecoderLayer": ("residual_rms_norm",
                                 ("input_layernorm", "self_attn", "post_attention_layernorm",
                                  "mlp")) for family in _DECODERS},
    **{f"{family}DecoderLayer": ("sandwich_rms_norm",
                                 ("input_layernorm", "self_attn", "post_attention_layernorm",
                                  "pre_feedforward_layernorm", "mlp",
                                  "post_feedforward_layernorm")) for family in _SANDWICH_DECODERS},
    **{f"{family}DecoderLayer": ("seq2seq_decoder_layer",
                                 ("self_attn", "encoder_attn", *SEQ2SEQ_NORMS))
       for family in _SEQ2SEQ_DECODERS},
    "Linear": ("linear", ()),  # torch.nn.Linear itself (_patch_linear checks the class)
}
