"""The `transfuse` command: `transfuse info` and `transfuse bench`."""
from __future__ import annotations

import argparse
import json
import sys


class _Parser(argparse.ArgumentParser):
    """Errors as one line on stderr and exit status 2 (the usage is what -h prints)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def main(argv=None):
    """Runs the command; returns its exit status. Bad arguments (checked before any work) end in
    SystemExit(2) with one line on stderr, and leave the result files as they were."""
    parser = _Parser(prog="transfuse", description=__doc__)
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
    from .bench import check_arguments, run
    problem = check_arguments(args)
    if problem:
        bench.error(problem)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
