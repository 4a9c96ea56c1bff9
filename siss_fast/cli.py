"""``siss-fast`` command line: thin; it parses and calls."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["main"]


def _cmd_env(args: argparse.Namespace) -> int:
    from .env import env_report

    print(env_report())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siss-fast",
        description="Fused kernels and a lean engine for SISS data unlearning in diffusion models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = sub.add_parser("env", help="versions, compiled extensions (and why any failed), devices, backends")
    env.set_defaults(func=_cmd_env)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
