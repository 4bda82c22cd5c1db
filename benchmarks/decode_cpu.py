"""Greedy decoding of a SmolLM-135M-shaped Llama (or a Qwen3-0.6B-shaped Qwen3) on the CPU: ms
per generated token of eager PyTorch, transfuse.patch(model) and patch(model, int8=...,
int8_heads=...), with the floor beside each (the bytes of the weights one token reads over the
measured copy bandwidth).

The weights are random (the shapes are SmolLM-135M's: 30 layers, hidden 576, 9 query and 3
key/value heads, MLP 1536, vocabulary 49152, the head tied to the embedding; or, --model
qwen3-0.6b, Qwen3-0.6B's: 28 layers, hidden 1024, 16 query and 8 key/value heads of 128, head
norms on the query and key, MLP 3072, vocabulary 151936, the head tied), so the tokens mean
nothing; the table says how many of each side's tokens equal eager's. "bf16 copy": the model
cast to bfloat16, eager and patched. "+ head": int8_heads=True,
the tied head (a third of the int8 model's bytes) in int8 too. A token's time is
(generate(prompt, n + 1 new tokens) - generate(prompt, 1 new token)) / n: the prefill is taken out.
The sides take turns (A B A B ...), median of the rounds. With --compile, also eager, the patch
and w8a16 + head with a static cache and the forward compiled by generate() (Inductor; the
warm-up compiles both lengths). With --ctranslate2, also CTranslate2's Generator (the model saved
with a vocabulary of its own and converted by its TransformersConverter, float32 and int8; its
CPU build has no bf16) in a process of its own, timed there the same way; its weights column is
its model.bin.

    python benchmarks/decode_cpu.py [--model smollm-135m|qwen3-0.6b] [--new-tokens 32]
                                    [--rounds 5] [--compile] [--ctranslate2] [--side LABEL]
                                    [--out F.json]
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
from pathlib import Path

import torch

import transfuse
from transfuse.bench import copy_bandwidth_gbps
from transfuse.bench_peers import Worker, ctranslate2_conversions

SMOLLM_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                   max_position_embeddings=2048, tie_word_embeddings=True)
# (Qwen/Qwen3-0.6B's config.json)
QWEN3_0_6B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                  max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True)
# --model: (transformers model type, config, what the table calls it)
MODELS = {"smollm-135m": ("llama", SMOLLM_135M, "SmolLM-135M-shaped Llama"),
          "qwen3-0.6b": ("qwen3", QWEN3_0_6B, "Qwen3-0.6B-shaped Qwen3")}
SIDES = {"eager": None, "transfuse patch(model)": {}, "transfuse int8=w8a16": {"int8": "w8a16"},
         "transfuse int8=w8a8": {"int8": "w8a8"},
         "transfuse w8a16 + head": {"int8": "w8a16", "int8_heads": True},
         "transfuse w8a8 + head": {"int8": "w8a8", "int8_heads": True}}
# the model cast to bfloat16, as it is and patched
BF16_SIDES = {"eager, bf16 copy": lambda bf16: bf16,
              "transfuse patch(bf16 copy)": lambda bf16: transfuse.patch(copy.deepcopy(bf16))}
COMPILED = ("eager", "transfuse patch(model)", "transfuse w8a16 + head")  # --compile


def weight_bytes(model):
    """Bytes of the parameters and buffers (a tied head and embedding counted once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def bytes_per_token(model):
    """The weight bytes one token reads (the KV cache aside): all of them, but an input
    embedding that is not also the head (one row of it is read)."""
    embedding = model.get_input_embeddings().weight
    if getattr(model.get_output_embeddings(), "weight", None) is embedding:
        return weight_bytes(model)
    return weight_bytes(model) - embedding.numel() * embedding.element_size()


def compile_config():
    """generate()'s compilation of the forward, on the CPU too (transformers does it by itself on
    CUDA only): Inductor, whole graph."""
    from transformers.generation.configuration_utils import CompileConfig
    config = CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True
    return config


def fixed_length(model, new_tokens):
    """The model's generation config for greedy decoding of `new_tokens` tokens, without an
    end-of-sequence token (nor a forced one): generate() then gives exactly that many tokens and
    runs no logits processor of its own (min_new_tokens would add two, which build and search
    vocabulary-sized tensors at every step, a cost that a user generating until the end token
    does not pay, nor CTranslate2's min_length)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = config.forced_eos_token_id = None
    config.max_new_tokens, config.do_sample, config.num_beams = new_tokens, False, 1
    return config


def timed_generate(model, prompt, new_tokens, compiled=False):
    """(seconds, the new token ids) of generate()'s greedy decoding."""
    config = fixed_length(model, new_tokens)
    if compiled:
        config.cache_implementation, config.compile_config = "static", compile_config()
    start = time.perf_counter()
    with torch.inference_mode():
        ids = model.generate(prompt, generation_config=config)
    return time.perf_counter() - start, ids[0, prompt.shape[1]:]


def save_with_vocabulary(model, folder):
    """The model and a word-level tokenizer of its vocabulary size ("t0", "t1", ...: token i is
    "t{i}"), which CTranslate2's converter reads its vocabulary from."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocabulary = {f"t{i}": i for i in range(model.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0")),
        unk_token="t0", bos_token="t1", eos_token="t2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def ctranslate2_worker(connection, folder, prompt, threads):
    """CTranslate2's process: converts the saved model in `folder` (float32, int8; into folders
    under it), sends (label, compute type, model.bin bytes) per side, then answers each (label,
    n): greedy generation of n tokens after `prompt` (ids), as (seconds, the n ids), until the
    pipe closes."""
    import ctranslate2
    try:
        generators, about = {}, []
        for label, compute, converted in ctranslate2_conversions(folder, folder):
            generators[label] = ctranslate2.Generator(converted, device="cpu", compute_type=compute,
                                                      intra_threads=threads, inter_threads=1)
            about.append((label, compute, (Path(converted) / "model.bin").stat().st_size))
        connection.send(about)
        tokens = [f"t{i}" for i in prompt]
        while True:
            label, n = connection.recv()
            start = time.perf_counter()
            result = generators[label].generate_batch(
                [tokens], max_length=n, min_length=n, sampling_topk=1,
                include_prompt_in_result=False)
            connection.send((time.perf_counter() - start, result[0].sequences_ids[0]))
    except EOFError:  # the bench dropped its end: done
        return
    except Exception as error:  # noqa: BLE001 -- raised again in the bench's process
        connection.send(error)


def chosen_sides(parser, side, labels):
    """"eager" and the --side labels given (all of `labels` without one); an unknown one is the
    parser's error."""
    chosen = ["eager", *side] if side else list(labels)
    unknown = set(chosen) - set(labels)
    if unknown:
        parser.error(f"--side: unknown {', '.join(sorted(unknown))}; the labels: "
                     f"{', '.join(repr(label) for label in labels[1:])}")
    return chosen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="smollm-135m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=8, help="prompt tokens")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--compile", action="store_true",
                        help=f"also {', '.join(COMPILED)} compiled, with a static cache")
    parser.add_argument("--ctranslate2", action="store_true",
                        help="also CTranslate2's Generator, fp32 and int8")
    parser.add_argument("--side", action="append", help="a side to run besides eager, by its "
                        "label (repeated; default: all of them): a 0.6B model in all of them "
                        "and CTranslate2's process outgrow 24 GB")
    parser.add_argument("--out", help="JSON file for the figures")
    args = parser.parse_args(argv)
    labels = [*SIDES, *BF16_SIDES]
    chosen = chosen_sides(parser, args.side, labels)
    warnings.filterwarnings("ignore")  # generation-config notes
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, config, name = MODELS[args.model]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).eval()
    models = {label: model if kwargs is None else transfuse.patch(copy.deepcopy(model), **kwargs)
              for label, kwargs in SIDES.items() if label in chosen}
    if any(label in chosen for label in BF16_SIDES):
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        models.update({label: side(bf16) for label, side in BF16_SIDES.items()
                       if label in chosen})
    sides = {label: (m, False) for label, m in models.items()}  # label -> (model, compiled)
    if args.compile:
        sides.update({f"{label}, compiled": (models[label], True) for label in COMPILED
                      if label in models})
    prompt = torch.randint(0, config["vocab_size"], (1, args.prompt))
    # label -> a function of n: (seconds to generate n tokens, their ids)
    runs = {label: functools.partial(timed_generate, m, prompt, compiled=compiled)
            for label, (m, compiled) in sides.items()}
    weights = {label: (weight_bytes(m), bytes_per_token(m)) for label, (m, _) in sides.items()}
    folder = tempfile.TemporaryDirectory() if args.ctranslate2 else None
    if folder:
        save_with_vocabulary(model, f"{folder.name}/model")
        worker = Worker(ctranslate2_worker, f"{folder.name}/model", prompt[0].tolist(),
                        torch.get_num_threads())
        for label, _, file_bytes in worker.receive():
            runs[label] = lambda n, label=label: worker.ask((label, n))
            weights[label] = (file_bytes, file_bytes)
    tokens = {}
    for label, run in runs.items():  # (the warm-up: compiles both lengths)
        run(1)
        tokens[label] = torch.as_tensor(run(args.new_tokens + 1)[1])  # (ids: a tensor or a list)
    bandwidth = copy_bandwidth_gbps(torch.device("cpu"), 20)
    load_before = os.getloadavg()
    times = {label: [] for label in runs}
    for _ in range(args.rounds):
        for label, run in runs.items():
            first, last = run(1)[0], run(args.new_tokens + 1)[0]
            times[label].append((last - first) / args.new_tokens * 1e3)
    load_after = os.getloadavg()
    results = {}
    for label in runs:
        ms = statistics.median(times[label])
        floor = weights[label][1] / bandwidth / 1e6
        results[label] = {"ms_per_token": ms, "weight_MB": weights[label][0] / 2**20,
                          "floor_ms": floor,
                          "tokens_equal_to_eager": int((tokens[label] == tokens["eager"]).sum())}
    eager = results["eager"]["ms_per_token"]
    print(f"{name} (random weights), greedy, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; copy bandwidth {bandwidth:.1f} GB/s; load {load_before} before, "
          f"{load_after} after")
    print(f"  {'':34} {'ms/token':>9} {'x eager':>8} {'weights':>9} {'floor':>8} "
          f"{'same tokens':>12}")
    for label, r in results.items():
        print(f"  {label:34} {r['ms_per_token']:9.2f} {eager / r['ms_per_token']:7.2f}x "
              f"{r['weight_MB']:7.1f}MB {r['floor_ms']:6.2f}ms "
              f"{r['tokens_equal_to_eager']:5d} of {args.new_tokens + 1}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": name, "config": config, "prompt": args.prompt,
                       "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "copy_bandwidth_GBps": bandwidth,
                       "loadavg_before": load_before, "loadavg_after": load_after,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
