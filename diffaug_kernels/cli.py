"""Command line: `diffaug <command>` or `python -m diffaug_kernels <command>`.

Each command is one module of commands/ with NAME, HELP, DESCRIPTION, add_arguments(parser) and main(args);
this module only assembles them.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from .commands.options import HelpFormatter, Parser

COMMANDS = ("bench", "bench_model", "bench_ensemble", "bench_certify", "bench_sample", "bench_train", "bench_fp8",
            "plot", "train_score", "train_classifier", "train_guidance", "sample", "evaluate", "certify", "pag", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="diffaug", description="diffaug-kernels: fused DiffAug ops, "
                                     "benchmarks and recipes.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=Parser)
    sub.required = True
    for name in COMMANDS:
        cmd = importlib.import_module(f"{__package__}.commands.{name}")
        p = sub.add_parser(cmd.NAME, help=cmd.HELP, description=cmd.DESCRIPTION, formatter_class=HelpFormatter)
        cmd.add_arguments(p)
        p.set_defaults(func=cmd.main)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C where a command has nothing to save (the training loops stop at a step)
        print(f"\ndiffaug {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
