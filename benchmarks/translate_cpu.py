"""Greedy translation on the CPU with a Marian-shaped (opus-mt-en-de) or NLLB-200-distilled-600M-
shaped (M2M100) model: the seconds to translate `transfuse bench`'s 64 real sentences of eager
PyTorch, transfuse.patch(model) (fp32, int8, a bf16 copy) and CTranslate2's Translator (float32,
int8), with how many of each side's tokens equal eager's.

The sentences (transfuse.bench_sentences) go in batches of 8 (--batch), each as long as
all-MiniLM-L6-v2's tokenizer makes it (a SentencePiece tokenizer gives English about as many
tokens), right-padded as `tokenizer(..., padding=True)` pads them; the token ids and the weights
are random (Helsinki-NLP/opus-mt-en-de's shapes: 6 + 6 layers, d_model 512, 8 heads, FFN 2048,
SiLU, vocabulary 58101, the head tied to the shared embedding; or NLLB-200-distilled-600M's:
12 + 12 layers, d_model 1024, 16 heads, FFN 4096, ReLU, vocabulary 256206, tied), so the tokens
mean nothing: each batch is translated to as many tokens as its longest sentence has (greedy,
no end token: decode_cpu.fixed_length). The sides take turns (A B A B ...), median of the
rounds. CTranslate2 runs in a process of its own (its OpenMP runtime slows torch's in the same
process), converted by its TransformersConverter from the saved model and a word-level
vocabulary.

    python benchmarks/translate_cpu.py [--model opus-mt-en-de|nllb-600m] [--batch 8]
                                       [--sentences 64] [--rounds 3] [--side LABEL]
                                       [--no-ctranslate2] [--out F.json]
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import tempfile
import time
import warnings

import torch

import transfuse
from decode_cpu import chosen_sides, fixed_length
from embedding_cpu import padded_batches
from transfuse.bench_peers import Worker, ctranslate2_conversions
from transfuse.bench_sentences import TOKEN_COUNTS

# (Helsinki-NLP/opus-mt-en-de's and facebook/nllb-200-distilled-600M's config.json)
OPUS_MT_EN_DE = dict(vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6,
                     encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                     decoder_ffn_dim=2048, activation_function="swish", max_position_embeddings=512,
                     scale_embedding=True, pad_token_id=58100, decoder_start_token_id=58100,
                     eos_token_id=0)
NLLB_600M = dict(vocab_size=256206, d_model=1024, encoder_layers=12, decoder_layers=12,
                 encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                 decoder_ffn_dim=4096, activation_function="relu", max_position_embeddings=1024,
                 scale_embedding=True, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                 decoder_start_token_id=2)
# --model: (transformers model type, config, what the table calls it)
MODELS = {"opus-mt-en-de": ("marian", OPUS_MT_EN_DE, "opus-mt-en-de-shaped Marian"),
          "nllb-600m": ("m2m_100", NLLB_600M, "NLLB-200-distilled-600M-shaped M2M100")}
SIDES = {"eager": None, "transfuse patch(model)": {},
         "transfuse int8=w8a8": {"int8": "w8a8"},
         "transfuse w8a8 + head": {"int8": "w8a8", "int8_heads": True},
         "transfuse w8a16 + head": {"int8": "w8a16", "int8_heads": True},
         "transfuse patch(bf16 copy)": "bf16"}
COMPUTES = {"ctranslate2 fp32": "float32", "ctranslate2 int8": "int8"}  # side -> compute type
CT2_SIDES = tuple(COMPUTES)


def save_with_vocabulary(model, folder):
    """The model and a word-level tokenizer of its vocabulary ("t0", "t1", ...: token i is
    "t{i}"; Marian's last one "<pad>", which CTranslate2's Marian converter drops)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    config = model.config
    names = [f"t{i}" for i in range(config.vocab_size)]
    names[config.pad_token_id] = "<pad>"
    special = {name: names[getattr(config, f"{name}_token_id")] for name in ("pad", "eos")}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(
            {name: i for i, name in enumerate(names)}, unk_token=names[3])),
        unk_token=names[3], pad_token=special["pad"], eos_token=special["eos"],
        bos_token=names[getattr(config, "bos_token_id", None) or 0])
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return names


def ctranslate2_worker(connection, folder, labels, sources, threads):
    """CTranslate2's process: converts the saved model for the sides `labels` (of CT2_SIDES:
    float32, int8), says so, then answers each (label, batch index, n): the batch's greedy
    translation to n tokens, as (seconds, the tokens of each sentence)."""
    import ctranslate2
    try:
        translators = {}
        computes = [COMPUTES[label] for label in labels]
        for label, compute, converted in ctranslate2_conversions(folder, folder, computes):
            translators[label] = ctranslate2.Translator(
                converted, device="cpu", compute_type=compute, intra_threads=threads,
                inter_threads=1)
        connection.send("ready")
        while True:
            label, index, n = connection.recv()
            start = time.perf_counter()
            results = translators[label].translate_batch(
                sources[index], beam_size=1, max_decoding_length=n, min_decoding_length=n)
            connection.send((time.perf_counter() - start, [r.hypotheses[0] for r in results]))
    except EOFError:  # the bench dropped its end: done
        return
    except Exception as error:  # noqa: BLE001 -- raised again in the bench's process
        connection.send(error)


def translate(model, batch, n):
    """(seconds, the new ids [B, n]) of generate()'s greedy translation of the batch."""
    start = time.perf_counter()
    with torch.inference_mode():
        ids = model.generate(**batch, generation_config=fixed_length(model, n))
    return time.perf_counter() - start, ids[:, 1:]  # (the decoder start token dropped)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="opus-mt-en-de")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sentences", type=int, default=64, help="the first N sentences")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--side", action="append", help="a side to run besides eager, by its "
                        "label (repeated; default: all of them)")
    parser.add_argument("--no-ctranslate2", action="store_true")
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args(argv)
    labels = [*SIDES, *([] if args.no_ctranslate2 else CT2_SIDES)]
    chosen = chosen_sides(parser, args.side, labels)
    warnings.filterwarnings("ignore")  # generation-config notes
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    model_type, config, name = MODELS[args.model]
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(model_type, **config)).eval()
    pad = config["pad_token_id"]
    lengths = list(TOKEN_COUNTS[:args.sentences])
    batches = padded_batches(lengths, args.batch, "right", config["vocab_size"] - 1, seed=1)
    for batch in batches:  # ids 3 .. vocab - 2 at real positions (no special token), pad at pads
        batch["input_ids"] = torch.where(batch["attention_mask"].bool(),
                                         batch["input_ids"].clamp(min=3), pad)
    new_tokens = [int(b["attention_mask"].sum(1).max()) for b in batches]
    sides = {}
    for label, kwargs in SIDES.items():
        if label not in chosen:
            continue
        if kwargs is None:
            sides[label] = model
        elif kwargs == "bf16":
            sides[label] = transfuse.patch(copy.deepcopy(model).to(torch.bfloat16))
        else:
            sides[label] = transfuse.patch(copy.deepcopy(model), **kwargs)
    # label -> a function of the batch index: (seconds, the new ids as a [B, n] tensor)
    runs = {label: (lambda i, m=m: translate(m, batches[i], new_tokens[i]))
            for label, m in sides.items()}
    folder = tempfile.TemporaryDirectory() if any(c in chosen for c in CT2_SIDES) else None
    if folder:
        names = save_with_vocabulary(model, f"{folder.name}/model")
        index = {name: i for i, name in enumerate(names)}
        sources = [[[names[t] for t in row[real.bool()].tolist()]
                    for row, real in zip(b["input_ids"], b["attention_mask"])] for b in batches]
        labels = [label for label in CT2_SIDES if label in chosen]
        worker = Worker(ctranslate2_worker, f"{folder.name}/model", labels, sources,
                        torch.get_num_threads())
        worker.receive()

        def ctranslate2_run(label, i):
            seconds, hypotheses = worker.ask((label, i, new_tokens[i]))
            return seconds, torch.tensor([[index[t] for t in h] for h in hypotheses])
        runs.update({label: functools.partial(ctranslate2_run, label) for label in labels})
    outputs = {label: [run(i)[1] for i in range(len(batches))] for label, run in runs.items()}
    load_before = os.getloadavg()
    times = {label: [] for label in runs}
    for _ in range(args.rounds):
        for label, run in runs.items():
            times[label].append(sum(run(i)[0] for i in range(len(batches))))
    load_after = os.getloadavg()
    total = sum(len(b["input_ids"]) * n for b, n in zip(batches, new_tokens))
    results = {}
    for label in runs:
        same = sum(int((a == b).sum()) for a, b in zip(outputs[label], outputs["eager"]))
        results[label] = {"seconds": statistics.median(times[label]), "rounds": times[label],
                          "tokens_equal_to_eager": same}
    eager = results["eager"]["seconds"]
    real = sum(lengths)
    positions = sum(b["attention_mask"].numel() for b in batches)
    print(f"{name} (random weights), greedy, {len(lengths)} sentences in batches of "
          f"{args.batch} ({real} source tokens, {1 - real / positions:.1%} padding), "
          f"{total} new tokens, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"load {load_before} before, {load_after} after")
    print(f"  {'':30} {'seconds':>8} {'x eager':>8} {'same tokens':>18}")
    for label, r in results.items():
        print(f"  {label:30} {r['seconds']:8.2f} {eager / r['seconds']:7.2f}x "
              f"{r['tokens_equal_to_eager']:8d} of {total}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": name, "config": config, "batch": args.batch,
                       "sentences": len(lengths), "source_tokens": real,
                       "padding_fraction": 1 - real / positions, "new_tokens": total,
                       "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "loadavg_before": load_before, "loadavg_after": load_after,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
