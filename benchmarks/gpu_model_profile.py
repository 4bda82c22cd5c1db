"""Where a patched encoder's time goes on a GPU: the models stage's MiniLM-L6-shaped BERT (bf16,
random weights), eager against transfuse.patch, one padded batch at a time.

For each side: host ms per forward (calls queued back to back, no synchronization: what the CPU
spends issuing them), wall ms per forward (synchronized), CUDA kernels per forward, and the
profiler's table of the ops with the most self CPU time; the patched side under each backend.
Then single op calls on the model's shapes (and quantize_per_token at 4096 x 4096), host us per
call: eager PyTorch against transfuse's backends. Prints only: a diagnostic, gpu_quick.py's
`profile` stage (or by hand after a build).
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with PYTHONSAFEPATH=1

from embedding_cpu import padded_batches  # noqa: E402
from gpu_models import MINILM_L6, build  # noqa: E402
from transfuse.bench_sentences import TOKEN_COUNTS  # noqa: E402


def per_call_ms(call, n=30):
    """(host ms, wall ms) per call over n calls queued back to back."""
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        call()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return host / n * 1e3, (time.perf_counter() - start) / n * 1e3


def kernels_and_table(call, rows=18):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return launches, events.table(sort_by="self_cpu_time_total", row_limit=rows)


def model_side(name, model, batch, backend=None):
    if backend:
        os.environ["TRANSFUSE_BACKEND"] = backend
    try:
        with torch.inference_mode():
            def call():
                return model(**batch)
            host, wall = per_call_ms(call)
            launches, table = kernels_and_table(call)
        print(f"\n== {name}{f' [{backend}]' if backend else ''}: host {host:.3f} ms, wall "
              f"{wall:.3f} ms, {launches} CUDA kernels per forward", flush=True)
        print(table, flush=True)
    finally:
        os.environ.pop("TRANSFUSE_BACKEND", None)


def op_calls(tokens):
    import transfuse.ops as ops
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(tokens, 384, device=dev, dtype=dt)
    res = torch.randn_like(x)
    w, b = torch.randn(384, device=dev, dtype=dt), torch.randn(384, device=dev, dtype=dt)
    h = torch.randn(tokens, 1536, device=dev, dtype=dt)
    hb = torch.randn(1536, device=dev, dtype=dt)
    wl = torch.randn(1536, 384, device=dev, dtype=dt)
    q = torch.randn(1, 12, tokens, 32, device=dev, dtype=dt)
    calls = {
        "layer_norm+residual": {"eager": lambda: F.layer_norm(x + res, (384,), w, b),
                                "transfuse": lambda bk: ops.layer_norm(x, w, b, residual=res,
                                                                       backend=bk)},
        "bias+gelu": {"eager": lambda: F.gelu(h + hb),
                      "transfuse": lambda bk: ops.bias_gelu(h, hb, backend=bk)},
        "linear 384->1536": {"eager": lambda: F.linear(x, wl),
                             "transfuse": lambda bk: ops.linear(x, wl, backend=bk)},
        "attention 1 seq": {"eager": lambda: F.scaled_dot_product_attention(q, q, q),
                            "transfuse": lambda bk: ops.attention(q, q, q, backend=bk)},
    }
    print(f"\n== single op calls, {tokens} tokens: host us per call (wall us)", flush=True)
    with torch.inference_mode():
        for name, sides in calls.items():
            figures = []
            for backend in (None, "cuda", "triton"):
                label = "eager" if backend is None else backend
                call = (sides["eager"] if backend is None
                        else (lambda bk=backend: sides["transfuse"](bk)))
                try:
                    host, wall = per_call_ms(call, 200)
                    figures.append(f"{label} {host * 1e3:.1f} ({wall * 1e3:.1f})")
                except Exception as error:  # an op a backend does not take: say so, go on
                    figures.append(f"{label} error {type(error).__name__}: {str(error)[:80]}")
            print(f"{name}: " + "; ".join(figures), flush=True)
        big = torch.randn(4096, 4096, device=dev, dtype=dt)
        for backend in ("cuda", "triton"):
            host, wall = per_call_ms(lambda: ops.quantize_per_token(big, backend=backend), 200)
            print(f"quantize_per_token 4096x4096 [{backend}]: host {host * 1e3:.1f} us, wall "
                  f"{wall * 1e3:.1f} us per call (floor 48 MB at the copy bandwidth)", flush=True)


def main():
    models = build("bert", MINILM_L6, "encode", torch.bfloat16, "cuda")
    for size in (64, 8):
        first = padded_batches(list(TOKEN_COUNTS), size, "right", MINILM_L6["vocab_size"])[0]
        batch = {k: v.cuda() for k, v in first.items()}
        print(f"\n######## batch of {size}: {tuple(batch['input_ids'].shape)}, "
              f"{int(batch['attention_mask'].sum())} real tokens", flush=True)
        model_side("eager", models["eager"], batch)
        model_side("sdpa", models["sdpa"], batch)
        for backend in (None, "cuda", "triton"):
            model_side("transfuse patch", models["transfuse patch"], batch, backend)
    op_calls(int(sum(TOKEN_COUNTS)))


if __name__ == "__main__":
    main()
