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


def _cmd_unlearn(args: argparse.Namespace) -> int:
    from .engine import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"siss-fast unlearn: config error: {exc}", file=sys.stderr)
        return 2
    from .engine.checkpoint import CheckpointError
    from .engine.loop import run

    try:
        result = run(cfg)
    except CheckpointError as exc:
        print(f"siss-fast unlearn: {exc}", file=sys.stderr)
        return 2
    return 1 if result.stop_reason == "non_finite" else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="siss-fast",
        description="Fused kernels and a lean engine for SISS data unlearning in diffusion models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    env = sub.add_parser("env", help="versions, compiled extensions (and why any failed), devices, backends")
    env.set_defaults(func=_cmd_env)
    unlearn = sub.add_parser(
        "unlearn",
        help="unlearn a forget set from a diffusion model (config: YAML; overrides: key=value)",
        description="Run the unlearning engine. Overrides: dotted keys (train.lr=1e-4) or the shortcuts model=PATH, "
        "steps=N, output_dir=PATH, checkpoint_every=N, resume=latest, method=NAME, batch_size=N, lr=X.",
    )
    unlearn.add_argument("config", help="YAML run configuration (see examples/tiny-ddpm.yaml)")
    unlearn.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    unlearn.set_defaults(func=_cmd_unlearn)
    from .demo import add_demo_arguments, add_report_arguments, demo_main, report_main

    demo = sub.add_parser("demo", help="a real diffusion model forgets a planted image, offline, in a few minutes "
                          "(--compare: every method; --pretrain: re-train the shipped base model)")
    add_demo_arguments(demo).set_defaults(func=demo_main)
    report = sub.add_parser("report", help="rebuild RUN_DIR/report.md from RUN_DIR/report.json")
    add_report_arguments(report).set_defaults(func=report_main)
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
