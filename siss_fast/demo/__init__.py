"""The embedded demo (layer 5): digits + a planted T-shirt, a shipped base DDPM, SISS unlearning, a report.

    siss-fast demo [--out DIR]            # measure, unlearn with SISS, measure, write DIR/report.md (a few minutes)
    siss-fast demo --compare              # every method of SPEC §5, same budget and seed, + pareto.png
    siss-fast demo --pretrain --out DIR   # re-train the shipped base model and classifier (seeded)
    siss-fast demo --text-to-image        # a tiny Stable Diffusion memorizes 3 images (a prompt each), forgets them
                                          # all in one engine run
    siss-fast demo --text-to-image --compare-separate   # ... and each in its own run, wall times side by side
    siss-fast report RUN_DIR              # rebuild RUN_DIR/report.md from RUN_DIR/report.json

The command-line glue lives here (:func:`add_demo_arguments`, :func:`demo_main`, :func:`report_main`) so that
``siss_fast/cli.py`` only wires two subparsers.
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import torch

__all__ = ["add_demo_arguments", "demo_main", "add_report_arguments", "report_main", "main"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .run import DemoConfig
    from .text_to_image import T2IConfig

    d, t = DemoConfig(), T2IConfig()
    parser.add_argument("--out", default=None, help="run directory (default runs/demo, runs/demo-compare, "
                        "runs/pretrain with --pretrain)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--compare", action="store_true", help="run every method of SPEC §5 with the same budget")
    mode.add_argument("--pretrain", action="store_true", help="re-train the base model and classifier (seeded)")
    mode.add_argument("--text-to-image", action="store_true",
                      help="a tiny Stable Diffusion built from configs memorizes several images, each for its own "
                      "prompt, then SISS unlearns them all in one engine run (default --out runs/demo-t2i)")
    parser.add_argument("--model", default=None, help="base model folder written by --pretrain (default: shipped); "
                        "with --text-to-image: the base_model/ of an earlier run (skips building and memorizing)")
    parser.add_argument("--seed", type=int, default=d.seed)
    # --steps, --num-samples, --sampler-steps: None = the mode's default, filled in by demo_main
    parser.add_argument("--steps", type=int, default=None,
                        help=f"unlearning budget in optimizer steps (default {d.max_steps}; text-to-image "
                        f"{t.max_steps})")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="retain/forget pairs per step (default: the engine's default for a pixel DDPM, 64)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the engine's for a pixel DDPM, 1e-4)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help=f"samples for before/after metrics (default {d.num_samples}; text-to-image "
                        f"{t.num_samples}, of the memorized prompt)")
    parser.add_argument("--sampler-steps", type=int, default=None,
                        help=f"DDIM steps (default {d.sampler_steps}; text-to-image {t.sampler_steps})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-likelihood", action="store_true", help="skip the bits/dim bound")
    t2i = parser.add_argument_group("text-to-image demo (--text-to-image)")
    t2i.add_argument("--items", type=int, default=None,
                     help=f"memorized items forgotten in one run (default {t.items}; 1: the T-shirt alone)")
    t2i.add_argument("--compare-separate", action="store_true",
                     help="also unlearn each item in its own engine run from the same base model and report the wall "
                     "time of the combined run against the sum of the separate runs")
    t2i.add_argument("--lora-rank", type=int, default=None,
                     help="train LoRA adapters of this rank on the UNet (engine train.lora_rank; default: full UNet)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip siss-fast verify on the finished run (fresh seeds, membership, relearning)")
    return parser


def _resolve_mode_defaults(args: argparse.Namespace) -> None:
    """Fill ``--steps`` / ``--num-samples`` / ``--sampler-steps`` left at ``None`` with the chosen mode's defaults
    (the pixel demo's and the text-to-image demo's budgets differ)."""
    if getattr(args, "text_to_image", False):
        from .text_to_image import T2IConfig as Config
    else:
        from .run import DemoConfig as Config
    c = Config()
    for key, value in (("steps", c.max_steps), ("num_samples", c.num_samples), ("sampler_steps", c.sampler_steps)):
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _command(args: argparse.Namespace) -> List[str]:
    """The demo options of ``args`` as an argument list (recorded in report.json)."""
    out = []
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command") or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def demo_main(args: argparse.Namespace, argv: Optional[List[str]] = None) -> int:
    from pathlib import Path

    _resolve_mode_defaults(args)
    argv = _command(args) if argv is None else argv

    if getattr(args, "text_to_image", False):
        return _text_to_image_main(args, argv)
    if args.pretrain:
        from .pretrain import pretrain

        pretrain(Path(args.out or "runs/pretrain"), seed=args.seed)
        return 0
    for flag in ("items", "lora_rank"):
        if getattr(args, flag, None) is not None:
            raise SystemExit(f"siss-fast demo: --{flag.replace('_', '-')} is for --text-to-image")
    if getattr(args, "compare_separate", False):
        raise SystemExit("siss-fast demo: --compare-separate is for --text-to-image (--compare: every method)")
    from .run import DemoConfig, run_compare, run_demo

    cfg = DemoConfig(out=args.out or ("runs/demo-compare" if args.compare else "runs/demo"), model=args.model,
                     seed=args.seed, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                     num_samples=args.num_samples, sampler_steps=args.sampler_steps, threads=args.threads,
                     likelihood=not args.no_likelihood, verify=not args.no_verify and not args.compare)
    # the command owns its process: denormals off for speed (a library call never changes global FP state)
    torch.set_flush_denormal(True)
    report = (run_compare if args.compare else run_demo)(cfg, argv)
    if args.compare:
        return 0
    print(Path(cfg.out, "report.md").read_text())
    return 0 if all(report["pass_criteria"].values()) else 1


def _text_to_image_main(args: argparse.Namespace, argv: List[str]) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .text_to_image import T2IConfig, run_text_to_image

    if args.no_likelihood:
        raise SystemExit("siss-fast demo --text-to-image: --no-likelihood is for the pixel demo (no bits/dim here)")
    cfg_items = {} if args.items is None else {"items": args.items}
    cfg = T2IConfig(out=args.out or "runs/demo-t2i", model=args.model, seed=args.seed, threads=args.threads,
                    max_steps=args.steps, num_samples=args.num_samples, sampler_steps=args.sampler_steps,
                    compare_separate=args.compare_separate, lora_rank=args.lora_rank, verify=not args.no_verify,
                    **cfg_items)
    if args.batch_size is not None:
        cfg = replace(cfg, batch_size=args.batch_size)
    if args.lr is not None:
        cfg = replace(cfg, lr=args.lr)
    torch.set_flush_denormal(True)  # the command owns its process (see demo_main)
    report = run_text_to_image(cfg, argv)
    print(Path(cfg.out, "report.md").read_text())
    return 0 if all(report["pass_criteria"].values()) else 1


def add_report_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding report.json")
    return parser


def report_main(args: argparse.Namespace) -> int:
    from .report import rebuild_report

    path = rebuild_report(args.run_dir)
    print(path.read_text())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m siss_fast.demo [demo options]`` (same options as ``siss-fast demo``)."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    parser = add_demo_arguments(argparse.ArgumentParser(prog="python -m siss_fast.demo"))
    return demo_main(parser.parse_args(argv), argv)
