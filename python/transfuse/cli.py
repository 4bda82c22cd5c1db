"""The `transfuse` command: `transfuse info` and `transfuse bench`."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="transfuse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="backends available here, and why a missing one is missing")
    bench = commands.add_parser("bench", help="benchmark the ops and a model against eager PyTorch")
    from .bench import add_arguments
    add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import info
        print(json.dumps(info(), indent=2))
        return 0
    from .bench import run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
