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


def _cmd_verify(args: argparse.Namespace) -> int:
    from .verify import VerifyError, verify_run

    try:
        result = verify_run(args.run_dir, samples=args.samples, relearn_steps=args.relearn_steps,
                            relearn_every=args.relearn_every, relearn_samples=args.relearn_samples, seed=args.seed,
                            out=args.out, sampler_steps=args.sampler_steps, batch_size=args.batch_size,
                            max_forget_rate=args.max_forget_rate, max_relearn_rate=args.max_relearn_rate,
                            device=args.device, plots=not args.no_plots, control=args.control,
                            relearn_lr=args.relearn_lr, relearn_batch=args.relearn_batch,
                            perturb_samples=args.perturb_samples, max_perturbed_rate=args.max_perturbed_rate)
    except VerifyError as exc:
        print(f"siss-fast verify: {exc}", file=sys.stderr)
        return 2
    for failure in result.failures:
        print(f"siss-fast verify: check failed: {failure}", file=sys.stderr)
    return 0 if result.passed else 1


def _add_verify(sub) -> None:
    verify = sub.add_parser(
        "verify", help="audit a finished run: fresh-seed forget rates, membership, relearning probe, prompt "
        "perturbations (exit 1: a threshold failed, 2: the run cannot be audited)",
        description="Proof of deletion for a finished run (pixel DDPM or Stable Diffusion): checks final/ against "
        "the manifest, re-measures each forget item on fresh seeds (Stable Diffusion: with its own prompt; "
        "Clopper-Pearson 95 %% intervals), its membership percentile, a retain-only relearning probe and, for "
        "Stable Diffusion, a prompt perturbation probe; writes verify.json, verify.md and a picture per item.")
    verify.add_argument("run_dir", help="the run's output_dir (holds manifest.json and final/)")
    verify.add_argument("--samples", type=int, default=None, help="fresh samples per model (default 1000; Stable "
                        "Diffusion: 128 per forget prompt)")
    verify.add_argument("--relearn-steps", type=int, default=100, help="retain-only fine-tune steps (default 100)")
    verify.add_argument("--relearn-every", type=int, default=25, help="re-measure every N steps (default 25)")
    verify.add_argument("--relearn-samples", type=int, default=None, help="samples per relearning point "
                        "(default 250; Stable Diffusion 32; at most --samples)")
    verify.add_argument("--relearn-lr", type=float, default=None, help="learning rate of the relearning "
                        "fine-tune (default: the engine's for the model kind: 1e-4 pixel, 1e-5 Stable Diffusion)")
    verify.add_argument("--relearn-batch", type=int, default=None, help="batch of the relearning fine-tune "
                        "(default: the engine's for the model kind: 64 pixel, 8 Stable Diffusion)")
    verify.add_argument("--perturb-samples", type=int, default=None, help="Stable Diffusion: samples per "
                        "perturbed prompt (default 16, at most --samples; 0: no prompt perturbation probe)")
    verify.add_argument("--seed", type=int, default=None, help="base seed (default: the smallest seed disjoint "
                        "from the run's validation seeds; a colliding one is refused)")
    verify.add_argument("--out", default=None, help="output folder (default RUN_DIR/verify)")
    verify.add_argument("--sampler-steps", type=int, default=None, help="DDIM steps (default: the run's validation)")
    verify.add_argument("--batch-size", type=int, default=250, help="sampling chunk size (default 250)")
    verify.add_argument("--max-forget-rate", type=float, default=None,
                        help="fail (exit 1) when an item's fresh-seed rate under the final model exceeds this")
    verify.add_argument("--max-relearn-rate", type=float, default=None,
                        help="fail (exit 1) when an item's rate along the relearning probe exceeds this")
    verify.add_argument("--max-perturbed-rate", type=float, default=None,
                        help="Stable Diffusion: fail (exit 1) when a perturbed forget prompt's rate under the final "
                        "model exceeds this")
    verify.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    verify.add_argument("--no-plots", action="store_true", help="write no pictures")
    verify.add_argument("--control", default=None, metavar="MODEL_DIR",
                        help="a model retrained without the forget items: its relearning curve as a second control")
    verify.set_defaults(func=_cmd_verify)


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
    _add_verify(sub)
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
