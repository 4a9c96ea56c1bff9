"""The kernel-benchmark command line: what ``bench_mixture_noise.py`` and ``bench_siss_loss.py`` share.

:func:`bench_main` parses the common command line (:func:`harness.common_parser`), makes a :class:`Plan` (shapes,
dtypes, modes, providers, repeats) for the device, times every (shape, dtype) group through :func:`harness.run_cases`,
prints the table and writes JSON + markdown. The providers are the two baselines (``research-eager``,
``compiled-ref``) and every registered siss_fast backend (:func:`kernel_providers`); :func:`admit_backend` says which
backend runs on this device and :func:`use_backend` selects it inside a timed callable.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from harness import (BenchRow, Case, Target, check_target, common_parser, dtype_name, fill_bandwidth, fill_speedups,
                     parse_dtype, parse_shape, print_rows, resolve_device_arg, run_cases, setup, shape_name,
                     split_list, target_line, write_results)
from machine import copy_bandwidth, load_average, machine_header, oversubscription_warning

__all__ = ["Plan", "make_plan", "kernel_providers", "compiled_reference", "admit_backend", "backend_status",
           "use_backend", "configure_compile", "bench_main", "SHAPES", "DTYPES"]

#: Shapes (B, C, H, W): Stable Diffusion latents, pixel space, one large (64 MiB per fp32 input), one awkward.
SHAPES = {
    "cpu": ("16x4x64x64", "64x4x64x64", "4x3x256x256", "3x4x17x23"),
    "cpu-full": ("16x4x64x64", "64x4x64x64", "4x3x256x256", "64x4x256x256", "3x4x17x23"),
    "cuda": ("16x4x64x64", "64x4x64x64", "4x3x256x256", "64x4x256x256", "3x4x17x23"),
    "cpu-quick": ("16x4x64x64", "3x4x17x23"),
    "cuda-quick": ("16x4x64x64", "64x4x256x256", "3x4x17x23"),
    "tiny": ("2x4x8x8", "3x4x17x23"),
}
DTYPES = {
    "cpu": ("fp32", "bf16"),
    "cuda": ("fp32", "bf16", "fp16"),
    "cpu-quick": ("fp32",),
    "cuda-quick": ("fp32", "bf16"),
    "tiny": ("fp32", "bf16"),
}
#: Under TRITON_INTERPRET=1 every program instance costs about a millisecond: only tiny cases get a triton row.
TRITON_INTERPRETER_MAX_NUMEL = 16384


@dataclasses.dataclass
class Plan:
    """What one run measures (from the command line and the device)."""

    device: torch.device
    shapes: List[Tuple[int, ...]]
    dtypes: List[torch.dtype]
    modes: List[str]
    providers: List[str]
    repeats: int
    compile_backend: Optional[str]  # "inductor", "aot_eager" (smoke: exercises tracing, not a speed figure) or None
    min_sample_ms: float
    rep_ms: float
    tiny: bool


def make_plan(args: argparse.Namespace, device: torch.device, providers: Sequence[str], modes: Sequence[str]) -> Plan:
    dev = device.type
    if args.tiny:
        shapes, dtypes, repeats, min_ms, rep_ms = SHAPES["tiny"], DTYPES["tiny"], 3, 1.0, 10.0
    elif args.quick:
        shapes, dtypes, repeats, min_ms, rep_ms = SHAPES[f"{dev}-quick"], DTYPES[f"{dev}-quick"], 9, 10.0, 50.0
    else:
        key = "cpu-full" if (dev == "cpu" and args.full) else dev
        shapes, dtypes, repeats, min_ms, rep_ms = SHAPES[key], DTYPES[dev], 15, 20.0, 100.0
    shapes = split_list(args.shapes) or list(shapes)
    dtypes = split_list(args.dtypes) or list(dtypes)
    chosen_modes = split_list(args.modes) or list(modes)
    bad = [m for m in chosen_modes if m not in modes]
    if bad:
        raise SystemExit(f"--modes: expected a subset of {list(modes)}, got {bad}")
    chosen = split_list(args.providers) or list(providers)
    bad = [p for p in chosen if p not in providers]
    if bad:
        raise SystemExit(f"--providers: expected a subset of {list(providers)}, got {bad}")
    if args.no_compile and "compiled-ref" in chosen:
        chosen.remove("compiled-ref")
    return Plan(
        device=device,
        shapes=[parse_shape(s) for s in shapes],
        dtypes=[parse_dtype(d) for d in dtypes],
        modes=chosen_modes,
        providers=chosen,
        repeats=args.repeats or repeats,
        compile_backend=None if args.no_compile else ("aot_eager" if args.tiny else "inductor"),
        min_sample_ms=args.min_sample_ms if args.min_sample_ms is not None else min_ms,
        rep_ms=rep_ms,
        tiny=bool(args.tiny),
    )


def kernel_providers() -> Tuple[str, ...]:
    """The providers of a kernel benchmark: the research code's eager formulation, ``torch.compile`` of the
    reference, then every registered siss_fast backend (:func:`siss_fast.backends.backend_names`)."""
    from siss_fast.backends import backend_names

    return ("research-eager", "compiled-ref") + backend_names()


def compiled_reference(fn: Callable, plan: "Plan", notes: Dict[str, str]) -> Callable:
    """``torch.compile(fn)`` with the plan's compile backend (the ``compiled-ref`` provider); notes a smoke run."""
    compiled = torch.compile(fn, backend=plan.compile_backend, dynamic=False)
    if plan.compile_backend != "inductor":
        notes["compiled-ref"] = f"torch.compile backend={plan.compile_backend} (smoke), not a speed figure"
    return compiled


def admit_backend(name: str, device: torch.device, numel: int, skipped: Dict[str, str],
                  interpreted: List[str]) -> bool:
    """Whether backend provider ``name`` runs in this case; records why not in ``skipped`` and an interpreted run
    (no speed figure) in ``interpreted``."""
    ok, why, interp = backend_status(name, device, numel)
    if not ok:
        skipped[name] = why
    elif interp:
        interpreted.append(name)
    return ok


def backend_status(name: str, device: torch.device, numel: int) -> Tuple[bool, str, bool]:
    """``(runnable, reason, interpreted)`` for a siss_fast backend on tensors of ``numel`` elements on ``device``."""
    from siss_fast import backends

    ok, why = backends.availability(name, device.type)
    if not ok:
        if name == "cuda" and device.type == "cpu":
            why = f"GPU: not measured in a CPU run ({why})"
        return False, why, False
    interpreted = name == "triton" and device.type == "cpu"
    if interpreted and numel > TRITON_INTERPRETER_MAX_NUMEL:
        return False, (f"TRITON_INTERPRET=1 interpreter only on this machine; too slow above "
                       f"{TRITON_INTERPRETER_MAX_NUMEL} elements (see the 3x4x17x23 row)"), True
    return True, why, interpreted


def use_backend(name: str) -> None:
    """Select a siss_fast backend, cheaply when it is already the current one (called inside timed callables so
    that interleaved providers each run on their own backend)."""
    import siss_fast as sf

    if sf.get_backend() != name:
        sf.set_backend(name)


def configure_compile() -> None:
    """Room for one compiled graph per (shape, dtype, requires_grad) case without hitting dynamo's recompile limit."""
    import torch._dynamo.config as dynamo_config

    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, attr):
            setattr(dynamo_config, attr, max(getattr(dynamo_config, attr), 256))


def bench_main(
    title: str,
    stem: str,
    providers: Sequence[str],
    modes: Sequence[str],
    build_cases: Callable[[Tuple[int, ...], torch.dtype, Plan], List[Case]],
    targets: Sequence[Target] = (),
    argv: Optional[Sequence[str]] = None,
) -> int:
    """The ``main`` of every benchmark script: parse, plan, measure every (shape, dtype), print, write, check targets.

    Returns the exit status: 1 when any row errored, else 0. With ``--out`` the JSON (+ .md) is rewritten after every
    (shape, dtype) group, so a run cut short by a time limit still leaves its finished rows.
    """
    args = common_parser(title).parse_args(argv)
    device = setup(resolve_device_arg(args), args.threads, value_checks=not args.no_value_checks)
    plan = make_plan(args, device, providers, modes)
    if plan.compile_backend is not None:
        configure_compile()
    command = "python " + " ".join([os.path.relpath(sys.argv[0], os.getcwd()) if sys.argv else stem,
                                    *(argv if argv is not None else sys.argv[1:])])
    copy = copy_bandwidth(device, 2**24 if plan.tiny else None)
    header = machine_header(device, copy=copy)
    header["compile_backend"] = plan.compile_backend or "skipped (--no-compile)"
    if oversubscription_warning(device):
        print("WARNING: " + oversubscription_warning(device), flush=True)
    print(f"== {title} on {device.type}: {header['cpu_model']}, {header['torch_threads']} threads"
          + (f", {header['gpu']}" if header["gpu"] else "")
          + f"; torch {header['torch']}, triton {header['triton']}; copy_ {copy['copy_gbps']:.1f} GB/s", flush=True)
    rows: List[BenchRow] = []
    evaluated: List[Dict[str, object]] = []

    def finish(final: bool) -> None:
        fill_bandwidth(rows, header)
        fill_speedups(rows)
        header["load_average_at_end"] = load_average()
        warning = oversubscription_warning(device)
        if warning:
            header["WARNING"] = warning
        evaluated.clear()
        planned = {(H_shape, H_dtype, m) for H_shape in map(shape_name, plan.shapes)
                   for H_dtype in map(dtype_name, plan.dtypes) for m in plan.modes}
        for target in targets:
            if target.device == device.type and (target.shape, target.dtype, target.mode) in planned:
                t = dataclasses.replace(target, threads=torch.get_num_threads() if device.type == "cpu" else None)
                evaluated.append(check_target(rows, t))
        if args.out is not None:
            write_results(args.out, title, header, rows, evaluated, command)

    for shape in plan.shapes:
        for dtype in plan.dtypes:
            cases = build_cases(shape, dtype, plan)
            rows.extend(run_cases(cases, device, plan.providers, repeats=plan.repeats, min_sample_ms=plan.min_sample_ms,
                                  rep_ms=plan.rep_ms))
            del cases
            if device.type == "cuda":
                torch.cuda.empty_cache()
            finish(final=False)
    finish(final=True)
    print()
    print_rows(rows)
    if evaluated:
        print()
        for t in evaluated:
            print(target_line(t))
    if args.out is not None:
        print(f"\nwrote {args.out} and {Path(args.out).with_suffix('.md')}")
    errors = [r for r in rows if r.status == "error"]
    if errors:
        print(f"\n{len(errors)} row(s) errored:", file=sys.stderr)
        for r in errors:
            print(f"  {r.op} {r.shape} {r.dtype} {r.mode} {r.provider}: {r.note}", file=sys.stderr)
        return 1
    return 0
