"""Sentence embeddings on the CPU from an embedding model of a named shape (--model): a
Qwen3-Embedding-0.6B-shaped Qwen3Model (last token, left padding), a ModernBERT-base-shaped
ModernBertModel, an EmbeddingGemma-300m-shaped Gemma3TextModel or a GTR-T5-base-shaped
T5EncoderModel (mean over the real tokens, right padding; the transformer alone, without its
sentence-transformers dense layers): sentences per second of eager
PyTorch, transfuse.patch(model) (fp32, w8a8, a bf16 copy, bf16 w8a16) and OpenVINO (fp32, the
bf16 hint, int8 weights, int8 post-training quantization), with each side's worst cosine to eager
fp32 (on random weights: what it says of a real model's accuracy is little).

The inputs are `transfuse bench`'s 64 real sentences (transfuse.bench_sentences) in batches of 8
(--batch), padded as the model's users pad them. The weights are random (Qwen3-0.6B's shapes: 28
layers, hidden 1024, 16 query and 8 key/value heads of 128, MLP 3072; ModernBERT-base's: 22
layers, hidden 768, 12 heads, GeGLU MLP 1152, local attention over 128 tokens in two layers of
three; EmbeddingGemma-300m's: 24 layers, hidden 768, 3 query heads and 1 key/value head of 256,
GeGLU MLP 1152 (tanh GELU), bidirectional, 512-token windows in five layers of six;
GTR-T5-base's: T5-base's encoder, 12 layers, d_model 768, 12 heads, ReLU FFN 3072) and no
tokenizer of theirs is at hand offline: the token ids are random, each sentence as
long as all-MiniLM-L6-v2's WordPiece tokenizer makes it (with its [CLS] and [SEP]; a BPE
tokenizer gives English about as many tokens). The sides take turns (A B A B ...), median of the
rounds.

    python benchmarks/embedding_cpu.py [--model qwen3-embedding-0.6b | modernbert-base |
                                        embeddinggemma-300m | gtr-t5-base]
        [--rounds 3] [--batch 8] [--save-model DIR] [--openvino DIR|torch]
        [--openvino-int8 DIR] [--out F.json]

--save-model writes the random model (save_pretrained) and stops. OpenVINO: for ModernBERT and T5
`--openvino torch` converts the model in this process (openvino.convert_model, traced), its int8
weights by nncf.compress_weights; for Qwen3 IR folders from optimum-intel, which needs
transformers < 5.6 (a venv of its own; its torchvision removed, which fails to import beside
torch 2.13) and exports Qwen3 but not ModernBERT:
    OVModelForFeatureExtraction.from_pretrained(DIR, export=True).save_pretrained(OV_DIR)
    ... quantization_config=OVWeightQuantizationConfig(bits=8) ... (OV_INT8_DIR)
The PTQ side is nncf.quantize of the fp32 IR here, calibrated on the first 16 sentences.
EmbeddingGemma has no OpenVINO side: openvino.convert_model of the traced Gemma3TextModel fails
(2026.4: "unordered_map::at"), through torch.export it converts but computes other values (0.08
off without padding on a tiny model, NaN with it), and optimum-intel 2.2 refuses transformers
above 5.0 for its export.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

import transfuse
from transfuse.bench_sentences import TOKEN_COUNTS

from decode_cpu import QWEN3_0_6B

MODERNBERT_BASE = dict(hidden_size=768, num_hidden_layers=22, num_attention_heads=12,
                       intermediate_size=1152, vocab_size=50368, global_attn_every_n_layers=3,
                       local_attention=128, hidden_activation="gelu")
# google/embeddinggemma-300m's config.json: a bidirectional Gemma 3 (5 of 6 layers attend within
# 512 tokens), its config's use_cache true (so a call creates a cache, as sentence-transformers'
# does)
EMBEDDINGGEMMA_300M = dict(hidden_size=768, num_hidden_layers=24, num_attention_heads=3,
                           num_key_value_heads=1, head_dim=256, intermediate_size=1152,
                           vocab_size=262144, sliding_window=512, query_pre_attn_scalar=256,
                           use_bidirectional_attention=True, max_position_embeddings=2048,
                           pad_token_id=0)
# sentence-transformers/gtr-t5-base's encoder (sentence-t5-base's too): T5-base's, ReLU FFN,
# relative position buckets 32 up to distance 128
GTR_T5_BASE = dict(d_model=768, num_layers=12, num_heads=12, d_kv=64, d_ff=3072,
                   vocab_size=32128, feed_forward_proj="relu")
# --model: (transformers model type, config, padding side, pooling, what the output calls it)
MODELS = {"qwen3-embedding-0.6b": ("qwen3", QWEN3_0_6B, "left", "last",
                                   "Qwen3-Embedding-0.6B-shaped Qwen3Model"),
          "modernbert-base": ("modernbert", MODERNBERT_BASE, "right", "mean",
                              "ModernBERT-base-shaped ModernBertModel"),
          "embeddinggemma-300m": ("gemma3_text", EMBEDDINGGEMMA_300M, "right", "mean",
                                  "EmbeddingGemma-300m-shaped Gemma3TextModel"),
          "gtr-t5-base": ("t5", GTR_T5_BASE, "right", "mean",
                          "GTR-T5-base-shaped T5EncoderModel")}


def padded_batches(lengths, size, side, vocab, seed=0):
    """Batches of `size` random-id sequences of these lengths, padded on `side` ("left" or
    "right") to each batch's longest (pad id 0, masked)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(lengths), size):
        chunk = lengths[start:start + size]
        width = max(chunk)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, n in enumerate(chunk):
            if side == "left":
                mask[row, width - n:] = 1
            else:
                mask[row, :n] = 1
        ids = torch.randint(1, vocab, (len(chunk), width), generator=g) * mask
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def pooled(hidden, mask, pooling):
    """The last token's hidden state (left padding) or the mean over the real tokens."""
    if pooling == "last":
        return hidden[:, -1]
    real = mask.bool().unsqueeze(-1)  # (what a pad position holds is not read: NaN in some)
    return hidden.masked_fill(~real, 0).sum(1) / real.sum(1)


def torch_side(model, pooling):
    def embed(batch):
        with torch.inference_mode():
            return pooled(model(**batch).last_hidden_state, batch["attention_mask"], pooling)
    return embed


class _LastHiddenState(torch.nn.Module):
    """model(input_ids, attention_mask).last_hidden_state, for openvino.convert_model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def openvino_models(model, batch, folder, int8_folder):
    """(fp32, int8-weight) OpenVINO models: the IR folders as given (or None), or with folder
    "torch" the model converted here (traced on `batch`) and its weights compressed by nncf
    (int8, per channel)."""
    if folder != "torch":
        return folder, int8_folder
    if model.config.model_type not in ("modernbert", "t5"):
        raise SystemExit("--openvino torch converts ModernBERT and T5 only; for Qwen3 pass the IR "
                         "folders optimum-intel exports (EmbeddingGemma: none, see the module's "
                         "docstring)")
    import nncf
    import openvino
    with torch.no_grad():
        converted = openvino.convert_model(
            _LastHiddenState(model), example_input=(batch["input_ids"], batch["attention_mask"]))
    return converted, nncf.compress_weights(converted.clone())


def _read(model):
    """An openvino model: an IR folder's, or the model itself."""
    import openvino
    if isinstance(model, str):
        return openvino.Core().read_model(os.path.join(model, "openvino_model.xml"))
    return model.clone()


def openvino_ptq(model, calibration):
    """nncf.quantize (int8 weights and activations) of the model, calibrated on these batches."""
    import nncf
    model = _read(model)
    feeds = [[b["input_ids"].numpy(), b["attention_mask"].numpy()] for b in calibration]
    return nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds),
                         model_type=nncf.ModelType.TRANSFORMER)


def openvino_side(model, precision, threads, pooling):
    """model (an IR folder or an openvino model) compiled for the CPU with the precision hint;
    with the precision it runs."""
    import openvino
    compiled = openvino.Core().compile_model(
        _read(model), "CPU",
        {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
         "INFERENCE_PRECISION_HINT": precision})
    ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def embed(batch):
        out = compiled([batch["input_ids"].numpy(), batch["attention_mask"].numpy()])[0]
        return pooled(torch.from_numpy(out), batch["attention_mask"], pooling)
    return embed, ran


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="qwen3-embedding-0.6b")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="sentences per batch")
    parser.add_argument("--save-model", help="write the random model here and stop")
    parser.add_argument("--openvino", help="OpenVINO IR folder of the saved model (fp32), or "
                        "'torch': convert the model here")
    parser.add_argument("--openvino-int8", help="the same with int8 weights")
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers import AutoConfig, AutoModel, T5EncoderModel

    model_type, config, side, pooling, name = MODELS[args.model]
    torch.manual_seed(0)
    model_config = AutoConfig.for_model(model_type, **config)
    model = (T5EncoderModel(model_config) if model_type == "t5"  # (the encoder alone)
             else AutoModel.from_config(model_config)).eval()
    if args.save_model:
        model.save_pretrained(args.save_model)
        return
    threads = torch.get_num_threads()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    lengths = list(TOKEN_COUNTS)
    vocab = config["vocab_size"]
    batches = padded_batches(lengths, args.batch, side, vocab)
    ov_fp32, ov_int8 = openvino_models(model, batches[0], args.openvino, args.openvino_int8)
    sides = {"eager": torch_side(model, pooling),
             "transfuse patch(model)": torch_side(transfuse.patch(copy.deepcopy(model)), pooling),
             "transfuse int8=w8a8": torch_side(transfuse.patch(copy.deepcopy(model),
                                                               int8="w8a8"), pooling),
             "eager, bf16 copy": torch_side(bf16, pooling),
             "transfuse patch(bf16 copy)": torch_side(transfuse.patch(copy.deepcopy(bf16)),
                                                      pooling),
             "transfuse bf16 int8=w8a16": torch_side(transfuse.patch(copy.deepcopy(bf16),
                                                                     int8="w8a16"), pooling)}
    openvino = (("openvino", ov_fp32, ("f32", "bf16")),
                ("openvino int8 weights", ov_int8, ("f32",)))
    if ov_fp32 is not None:
        openvino += (("openvino int8 PTQ", openvino_ptq(ov_fp32, padded_batches(
            lengths[:16], 8, side, vocab, seed=1)), ("f32",)),)
    for label, ov_model, precisions in openvino:
        for precision in precisions if ov_model is not None else ():
            embed, ran = openvino_side(ov_model, precision, threads, pooling)
            sides[f"{label} {precision}" + ("" if ran == precision else f" (ran {ran})")] = embed
    reference = torch.cat([F.normalize(sides["eager"](b).float(), dim=-1) for b in batches])
    cosines = {}
    for label, embed in sides.items():  # (also the warm-up)
        out = torch.cat([F.normalize(embed(b).float(), dim=-1) for b in batches])
        cosines[label] = float((out * reference).sum(-1).min())
    load_before = os.getloadavg()
    times = {label: [] for label in sides}
    for _ in range(args.rounds):
        for label, embed in sides.items():
            start = time.perf_counter()
            for b in batches:
                embed(b)
            times[label].append(time.perf_counter() - start)
    load_after = os.getloadavg()
    real = sum(lengths)
    padded = sum(b["input_ids"].numel() for b in batches)
    eager = statistics.median(times["eager"])
    print(f"{name} (random weights), {len(lengths)} real sentences in {side}-padded batches "
          f"of {args.batch} ({real} tokens of {padded} positions), embeddings: "
          f"{'the last token' if pooling == 'last' else 'mean over the real tokens'}, "
          f"{threads} threads, torch {torch.__version__}; load {load_before} before, "
          f"{load_after} after")
    print(f"  {'':36} {'sentences/s':>11} {'x eager':>8} {'min cosine':>11}")
    results = {}
    for label in sides:
        seconds = statistics.median(times[label])
        results[label] = {"sentences_per_s": len(lengths) / seconds, "x_eager": eager / seconds,
                          "min_cosine_to_eager": cosines[label], "seconds": times[label]}
        print(f"  {label:36} {len(lengths) / seconds:11.1f} {eager / seconds:7.2f}x "
              f"{cosines[label]:11.5f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "config": config, "batch": args.batch,
                       "threads": threads,
                       "torch": torch.__version__,
                       "real_tokens": real, "padded_positions": padded,
                       "loadavg_before": load_before, "loadavg_after": load_after,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
