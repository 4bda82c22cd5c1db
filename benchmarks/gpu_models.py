"""Whole models on a lent GPU, as their users run them: gpu_quick.py's `models` stage.

- an all-MiniLM-L6-v2-shaped BertModel (6 layers, hidden 384, 12 heads of 32, MLP 1536) on the
  bench's 64 real sentences, each as long as that model's tokenizer makes it
  (transfuse.bench_sentences.TOKEN_COUNTS), right-padded in batches of 8 and as one batch of 64;
- a BERT-base-shaped one (12 layers, hidden 768, 12 heads of 64, MLP 3072) on 128 passages of
  64-256 tokens (PASSAGE_LENGTHS), right-padded in batches of 32: where the kernels, not the host,
  set the pace;
- a Qwen3-0.6B-shaped Qwen3ForCausalLM (decode_cpu.QWEN3_0_6B) decoding greedily from a
  16-token prompt, batch 1: ms per new token (generate(n + 1) - generate(1), over n) and the
  prefill (generate(1)).

Sides, bf16: eager attention, SDPA, and transfuse.patch(the eager model). The weights are random
(nothing can be downloaded there), so the tokens mean nothing: the encoder's check is each side's
worst relative error over a sequence's real tokens against the float32 eager model (patch must
stay within 2x SDPA's + 1e-3); the decoder's tokens are counted where they equal eager's, and
at the first that differs eager's own logits for the two tokens must tie within NEAR_TIE.
The sides take turns, median of the rounds (CUDA synchronized around each). --dry-run: tiny
shapes on the CPU, checks only.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with PYTHONSAFEPATH=1

from decode_cpu import QWEN3_0_6B, fixed_length  # noqa: E402
from embedding_cpu import padded_batches  # noqa: E402
from transfuse.bench_sentences import TOKEN_COUNTS  # noqa: E402

MINILM_L6 = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                 intermediate_size=1536, vocab_size=30522, max_position_embeddings=512)
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, vocab_size=30522, max_position_embeddings=512)
PASSAGE_LENGTHS = [64 + (37 * i) % 193 for i in range(128)]  # 64-256 tokens, mean ~160
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            vocab_size=1000)
TINY_DECODER = dict(TINY, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)


def build(model_type, shape, task, dtype, device):
    """{side: model} with the same random weights: eager, SDPA and transfuse.patch(eager)."""
    import transformers
    import transfuse
    config = transformers.AutoConfig.for_model(model_type, **shape)
    cls = getattr(transformers, "AutoModelForCausalLM" if task == "generate" else "AutoModel")
    torch.manual_seed(0)
    with torch.device(device):
        eager = cls.from_config(config, attn_implementation="eager", dtype=dtype).eval()
        sdpa = cls.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    sdpa.load_state_dict(eager.state_dict())
    return {"eager": eager, "sdpa": sdpa,
            "transfuse patch": transfuse.patch(copy.deepcopy(eager))}


def rounds_median(calls, rounds, device):
    """{label: median seconds} of calls taking turns, a first round of each untimed."""
    times = {label: [] for label in calls}
    for r in range(rounds + 1):
        for label, call in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def encoder_case(dry, device, dtype):
    yield from encoder_rows("MiniLM-L6-shaped BERT, 64 sentences", TINY if dry else MINILM_L6,
                            list(TOKEN_COUNTS), (8, 64), dry, device, dtype)
    yield from encoder_rows("BERT-base-shaped, 128 passages", TINY if dry else BERT_BASE,
                            PASSAGE_LENGTHS[:8] if dry else PASSAGE_LENGTHS, (32,), dry, device,
                            dtype)


def encoder_rows(name, shape, lengths, batch_sizes, dry, device, dtype):
    models = build("bert", shape, "encode", dtype, device)
    reference = copy.deepcopy(models["eager"]).float()
    for batch in batch_sizes:
        batches = [{k: v.to(device) for k, v in b.items()}
                   for b in padded_batches(lengths, batch, "right", shape["vocab_size"])]

        def run(model):
            with torch.inference_mode():
                return [model(**b).last_hidden_state for b in batches]

        expected = run(reference)
        errors = {}
        for side, model in models.items():
            worst = 0.0
            for got, want, b in zip(run(model), expected, batches):
                for row, n in enumerate(b["attention_mask"].sum(1).tolist()):
                    g, w = got[row, :n].double(), want[row, :n].double()
                    worst = max(worst, ((g - w).norm() / w.norm()).item())
            errors[side] = worst
        bound = 2 * errors["sdpa"] + 1e-3
        row = dict(stage="models", case=f"{name} in batches of {batch}",
                   dtype=str(dtype), device=str(device), real_tokens=sum(lengths),
                   padded_tokens=sum(b["input_ids"].numel() for b in batches),
                   worst_rel_err=errors, bound=bound,
                   check="ok" if errors["transfuse patch"] <= bound else "FAILED")
        if not dry:
            ms = rounds_median({s: (lambda m=m: run(m)) for s, m in models.items()}, 10, device)
            row["ms"] = {s: t * 1e3 for s, t in ms.items()}
            row["speedup_vs_eager"] = {s: ms["eager"] / t for s, t in ms.items()}
        yield row


# Greedy decoding may take another token than eager's where eager's two candidates tie within
# rounding: bf16 logits of ~3 are 1/64 apart, and random weights give exact ties (on the CPU in
# bf16, 2.78125 = 2.78125 at the steps where a patched model differed).
NEAR_TIE = 0.01  # eager's margin for its token over the other's, relative to its logit


def first_flip(scored, tokens):
    """Where `tokens` first differs from eager's generation `scored` (generate's output with its
    scores): {"step", "relative_gap": eager's logit for its token minus its logit for the other
    token, over |its logit|}; None where no token differs."""
    eager = scored.sequences[0, -len(tokens):]
    differs = (tokens != eager).nonzero()
    if not len(differs):
        return None
    step = int(differs[0, 0])
    logits = scored.scores[step][0].float()
    top = logits[eager[step]]
    gap = (top - logits[tokens[step]]) / top.abs().clamp_min(1e-6)
    return {"step": step, "relative_gap": float(gap)}


def decoder_case(dry, device, dtype):
    models = build("qwen3", TINY_DECODER if dry else QWEN3_0_6B, "generate", dtype, device)
    new_tokens = 4 if dry else 32
    prompt = torch.randint(1, 1000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)

    def generate(model, n):
        with torch.inference_mode():
            return model.generate(prompt, generation_config=fixed_length(model, n))[0, 16:]

    config = fixed_length(models["eager"], new_tokens + 1)
    config.output_scores = config.return_dict_in_generate = True
    with torch.inference_mode():
        scored = models["eager"].generate(prompt, generation_config=config)
    tokens = {side: generate(m, new_tokens + 1) for side, m in models.items()}
    flips = {s: first_flip(scored, t) for s, t in tokens.items()}
    row = dict(stage="models", case=f"Qwen3-0.6B-shaped greedy decoding, {new_tokens} tokens",
               dtype=str(dtype), device=str(device),
               tokens_equal_to_eager={s: int((t == tokens["eager"]).sum()) for s, t in
                                      tokens.items()}, first_difference=flips,
               check="ok" if all(f is None or f["relative_gap"] <= NEAR_TIE
                                 for f in flips.values()) else "FAILED")
    if not dry:
        long = rounds_median({s: (lambda m=m: generate(m, new_tokens + 1))
                              for s, m in models.items()}, 5, device)
        prefill = rounds_median({s: (lambda m=m: generate(m, 1)) for s, m in models.items()}, 5,
                                device)
        row["ms_per_token"] = {s: (long[s] - prefill[s]) / new_tokens * 1e3 for s in long}
        row["prefill_ms"] = {s: t * 1e3 for s, t in prefill.items()}
        row["speedup_vs_eager"] = {s: row["ms_per_token"]["eager"] / t
                                   for s, t in row["ms_per_token"].items()}
    yield row


def models_stage(out, dry):
    """Each case's row recorded as it ends; an error in one case is recorded and the next runs.
    Returns 0 when every check passed."""
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    ok = True
    for case in (encoder_case, decoder_case):
        try:
            for row in case(dry, device, dtype):
                out.record(**row)
                figures = {k: row[k] for k in ("speedup_vs_eager", "worst_rel_err",
                                               "tokens_equal_to_eager") if k in row}
                out.line(f"{row['case']}: check {row['check']} " + " ".join(
                    f"{k}=" + ",".join(f"{s}:{v:.3g}" for s, v in d.items())
                    for k, d in figures.items()))
                ok &= row["check"] == "ok"
        except Exception as error:
            out.record(stage="models", case=case.__name__, check=f"error: {error!r}"[:500])
            out.line(f"{case.__name__}: error {error!r}"[:300])
            ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    from gpu_quick import Out
    sys.exit(models_stage(Out(__import__("pathlib").Path(sys.argv[1])), "--dry-run" in sys.argv))
