"""The ``cpift`` command line."""

from __future__ import annotations

import argparse
import sys

from ._version import __version__
from .errors import CpiftError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cpift`` command."""
    parser = argparse.ArgumentParser(prog="cpift", description="Parameter-isolation fine-tuning for LLMs.")
    parser.add_argument("--version", action="version", version=f"cpift {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="tour the core library on the embedded SmolLM2-135M model")
    demo.add_argument("--p", type=float, default=1.0, help="core-region size in percent (default 1)")
    demo.add_argument("--tau", type=float, default=0.1, help="Jaccard threshold for grouping (default 0.1)")
    demo.add_argument("--steps", type=int, default=3, help="AdamW steps per probe fine-tune (default 3)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cpift`` console script."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(p=args.p, tau=args.tau, steps=args.steps)
    except CpiftError as exc:
        print(f"cpift: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
