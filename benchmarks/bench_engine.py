"""Engine benchmark: optimizer steps of the lean SISS engine against the research code's loop, side by side.

    python benchmarks/bench_engine.py [--device cpu|cuda] [--threads N] [--quick] [--tiny] [--sd-v1]
                                      [--accumulation 1,2] [--schedule sd|linear] [--out results/x.json]

One timed call = one optimizer step (``accumulation`` micro-batches of ``B`` samples, then ``optimizer.step()``).
The shape ``B x 4 x H x W`` is the micro-batch of latents; SISS draws ``B`` retain and ``B`` forget latents per
micro-batch. Providers (one row each; their steps live in :mod:`engine_steps`):

* ``research-loop``: a re-implementation of the research code's SISS step (claserken/SISS ``delete_sd.py`` with
  ``importance_sampling_with_mixture``), fp32: per micro-batch the VAE encodes the retain and forget *images* and the
  text encoder runs on the tokenised prompt; two ``add_noise``; one UNet forward on the mixture sample; backward of
  the weighted retain loss (graph retained), a clone of every gradient, backward of the weighted forget loss, a second
  clone minus the first accumulated into ``G_a``; at the step ``G_x = .grad - G_a`` (a third copy), both norms,
  ``.grad = G_x - c/|G_a| G_a``, ``clip_grad_norm_(1.0)``, AdamW, LR schedule. Its per-micro-batch statistics
  (``.item()`` of loss/weight means, maxima, minima, stds) are computed as there; logging itself is not.
* ``lean-exact``: the engine's step itself (:class:`siss_fast.engine.step.UnlearnStep`, what ``loop.run`` calls):
  ``RunData.draw`` (cached VAE latent distributions, cached text embeddings) -> ``Objective('siss')`` through
  ``PartitionedForward`` -> ``GradientCombiner.backward`` (mode exact, ``scaling_norm: auto``) -> ``finish_step`` ->
  AdamW -> LR schedule. Config defaults of :class:`siss_fast.engine.config.EngineConfig` otherwise.
* ``lean-exact-2bwd``: the same with ``gradient.partitioned: false`` (the plain two-backward prototype).
* ``lean-lagged``: ``gradient.mode: lagged`` (default ``lag_every: 10``, partitioned as by default). The median is a
  lagged step; one step in ``lag_every`` re-measures ``|G_a|`` at about the cost of a ``lean-exact`` step, so the
  amortised time ``((N-1) lagged + exact) / N`` is reported beside it and decides the lagged targets.
* ``lean-lagged-1bwd``: lagged with ``partitioned: false``: one forward, one backward of ``retain + f * forget``.
* ``naive-finetune``: the engine's ``method: naive`` step (one forward on ``gamma x0 + sigma eps``, one backward):
  the floor every SISS step is compared with.
* ``lean-exact-bf16-ckpt`` (CUDA only): ``lean-exact`` with ``train.mixed_precision: bf16`` (autocast around the UNet,
  fp32 master weights) and ``train.gradient_checkpointing: true``.

Models: :mod:`engine_steps` (the engine's tiny SD with SD's latent geometry on the CPU; ``--sd-v1``: SD v1's
architecture, :mod:`sd_v1_model`).

Memory. CUDA: ``torch.cuda.max_memory_allocated`` during one step through the harness (absolute, so with every
provider's model resident it includes the others'); ``own MB`` in the note adds the provider's resident tensors
(weights, optimizer state, caches) to its transient peak. CPU: the transient peak of one step from the allocator
events of ``torch.profiler`` (``profile_memory=True``), in the ``extra MB`` column, and the number of extra
parameter-sized gradient buffers each provider holds (research: 3; lean exact: 0 with accumulation 1, else 1).

Targets (CPU, first case): lean-exact >= 1.5x research-loop and lean-lagged >= 1.8x research-loop (optimizer steps
per second); a lean-exact step <= 1.2x a naive-finetune step, a lean-lagged step <= 1.1x. On CUDA with ``--sd-v1``:
``lean-exact-bf16-ckpt`` must fit in 24 GB at batch 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
import torch  # noqa: E402
from engine_steps import Bench, LeanStep, ResearchStep, prepare  # noqa: E402

OP = "engine_step"
PROVIDERS = ("research-loop", "lean-exact", "lean-exact-2bwd", "lean-lagged", "lean-lagged-1bwd", "naive-finetune",
             "lean-exact-bf16-ckpt")
CUDA_ONLY = ("lean-exact-bf16-ckpt",)
MODES = ("step",)
GB24_MB = 24 * 1024.0

# (min ratio, provider, baseline): ratio = baseline median / provider median. "<= k x naive" is ">= 1/k".
TARGET_SPECS = (
    ("lean-exact", "research-loop", 1.5, "exact (partitioned) >= 1.5x research loop"),
    ("lean-lagged", "research-loop", 1.8, "lagged >= 1.8x research loop"),
    ("lean-exact", "naive-finetune", 1 / 1.2, "exact SISS step <= 1.2x a naive fine-tuning step"),
    ("lean-lagged", "naive-finetune", 1 / 1.1, "lagged SISS step <= 1.1x a naive fine-tuning step"),
)


# ------------------------------------------------------------------------------------------------------ memory


def cpu_step_memory_mb(fn: Callable[[], object]) -> Optional[float]:
    """Transient peak of one call on the CPU: the running sum of the allocator events that ``torch.profiler``
    records with ``profile_memory=True`` (bytes allocated minus freed since the call began), in MiB."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = prof.profiler.kineto_results.events()
    except Exception:  # noqa: BLE001 - a private profiler API; memory is a bonus
        return None
    current = peak = 0
    for ev in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        current += ev.nbytes()
        peak = max(peak, current)
    return peak / 2**20


# ------------------------------------------------------------------------------------------------------- cases


def build_case(bench: Bench, providers: Sequence[str]) -> Tuple[H.Case, Dict[str, Any]]:
    """The harness case of one (shape, accumulation) and the provider objects (for counts and memory)."""
    device = bench.device
    objs: Dict[str, Any] = {}
    skipped: Dict[str, str] = {}
    notes: Dict[str, str] = {}
    makers: Dict[str, Callable[[], Any]] = {
        "research-loop": lambda: ResearchStep(bench),
        "lean-exact": lambda: LeanStep(bench),
        "lean-exact-2bwd": lambda: LeanStep(bench, partitioned=False),
        "lean-lagged": lambda: LeanStep(bench, mode="lagged"),
        "lean-lagged-1bwd": lambda: LeanStep(bench, mode="lagged", partitioned=False),
        "naive-finetune": lambda: LeanStep(bench, method="naive"),
        "lean-exact-bf16-ckpt": lambda: LeanStep(bench, mixed_precision="bf16", checkpointing=True),
    }
    for prov in providers:
        if prov in CUDA_ONLY and device.type != "cuda":
            skipped[prov] = "not measured: GPU only (--device cuda --sd-v1, benchmarks/gpu_suite.sh)"
            continue
        try:
            objs[prov] = makers[prov]()
        except Exception as exc:  # noqa: BLE001 - the harness turns it into an error row
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            objs[prov] = _Raiser(msg)
    b, (c, h, w) = bench.batch, bench.latent
    case = H.Case(op=OP, shape=f"{b}x{c}x{h}x{w}", dtype="fp32", mode=step_mode(bench.acc),
                  logical_bytes=0, fns=dict(objs), skipped=skipped, notes=notes)
    return case, objs


def step_mode(acc: int) -> str:
    return f"step (acc {acc})"


class _Raiser:
    def __init__(self, msg: str):
        self.msg = msg

    def __call__(self):
        raise RuntimeError(self.msg)


def annotate(rows: List[H.BenchRow], objs: Dict[str, Any], bench: Bench, lag_every: int) -> None:
    """Notes per row: steps/s, mixed-sample counts, gradient buffers, memory; CPU memory from the profiler."""
    from siss_fast import methods

    device = bench.device
    by = {r.provider: r for r in rows}
    for prov, row in by.items():
        obj = objs.get(prov)
        if row.status == "skipped" and row.note.startswith("not measured"):
            row.status, row.note = "not measured", row.note[len("not measured: "):]
        if obj is None or isinstance(obj, _Raiser) or not row.timed:
            continue
        parts = [f"{1e3 / row.median_ms:.3g} steps/s"]
        if prov == "lean-exact-bf16-ckpt":
            parts.append("autocast bf16 + gradient checkpointing")
        counts = getattr(obj, "counts", None)
        if isinstance(obj, LeanStep) and obj.step.partitioned and counts:
            total = sum(counts.values())
            parts.append(f"split over {obj.steps} steps: retain {counts['retain']}, forget {counts['forget']}, "
                         f"mixed {counts['mixed']} of {total} samples")
        elif isinstance(obj, LeanStep) and methods.get_method(obj.cfg.method.name).partitioned:
            parts.append("unpartitioned: both backwards through every sample")
        if isinstance(obj, LeanStep) and obj.cfg.gradient.mode == "lagged":
            parts.append(f"paths {dict(sorted(obj.paths.items()))}")
        parts.append(obj.grad_buffers())
        if device.type == "cpu":
            row.extra_mem_mb = cpu_step_memory_mb(obj)
            if row.extra_mem_mb is not None:
                parts.append(f"step peak {row.extra_mem_mb:.0f} MiB (profiler) + resident "
                             f"{obj.resident_bytes() / 2**20:.0f} MiB")
        elif row.extra_mem_mb is not None:
            own = obj.resident_bytes() / 2**20 + row.extra_mem_mb
            parts.append(f"own MB {own:.0f} (resident {obj.resident_bytes() / 2**20:.0f} + step peak "
                         f"{row.extra_mem_mb:.0f})")
        row.note = "; ".join(parts + ([row.note] if row.note else []))
    lag, exact = by.get("lean-lagged"), by.get("lean-exact")
    if lag is not None and lag.timed and exact is not None and exact.timed:
        amort = ((lag_every - 1) * lag.median_ms + exact.median_ms) / lag_every
        lag.note += f"; amortised with 1 re-measure in {lag_every}: {amort:.4g} ms"


def evaluate_targets(rows: List[H.BenchRow], case_key: Tuple[str, str, str, str], device: str,
                     lag_every: int, sd_v1: bool) -> List[Dict[str, Any]]:
    op, shape, dtype, mode = case_key
    results = []
    by = {r.provider: r for r in rows if r.key == case_key}
    for prov, base, min_ratio, text in TARGET_SPECS:
        t = H.Target(op, shape, dtype, mode, prov, base, min_ratio, device=device,
                     threads=torch.get_num_threads() if device == "cpu" else None)
        res = H.check_target(rows, t)
        res["statement"] = text
        if res.get("ratio") is not None:
            mine, theirs = by[prov], by[base]
            if base == "naive-finetune":
                res["cost_vs_naive"] = 1.0 / res["ratio"]
                res["cost_vs_naive_of_minimums"] = mine.min_ms / theirs.min_ms
            if prov == "lean-lagged" and by.get("lean-exact") is not None and by["lean-exact"].timed:
                amort = ((lag_every - 1) * mine.median_ms + by["lean-exact"].median_ms) / lag_every
                res["ratio_amortised"] = theirs.median_ms / amort
                res["verdict_amortised"] = "target met" if res["ratio_amortised"] >= min_ratio else "MISSED"
        results.append(res)
    if sd_v1 and device == "cuda":
        row = by.get("lean-exact-bf16-ckpt")
        res: Dict[str, Any] = {"op": op, "shape": shape, "dtype": dtype, "mode": mode, "device": device,
                               "provider": "lean-exact-bf16-ckpt", "baseline": "24 GB", "min_ratio": 1.0,
                               "statement": "lean bf16 + checkpointing fits in 24 GB at batch 1"}
        own = _own_mb(row) if row is not None else None
        if own is None:
            res.update(ratio=None, verdict="not measured", why="no memory figure")
        else:
            res.update(ratio=GB24_MB / own, own_mb=own, verdict="target met" if own <= GB24_MB else "MISSED")
        results.append(res)
    return results


def _own_mb(row: H.BenchRow) -> Optional[float]:
    for part in row.note.split("; "):
        if part.startswith("own MB "):
            return float(part.split()[2])
    return None


def target_text(res: Dict[str, Any]) -> str:
    head = f"{res['statement']} [{res['shape']} {res['mode']}, {res['device']}]"
    if res.get("ratio") is None:
        return f"{head}: not measured ({res.get('why', '')})"
    if "own_mb" in res:
        return f"{head}: {res['own_mb']:.0f} MB -> {res['verdict']}"
    if "cost_vs_naive" in res:
        line = (f"{head}: {res['cost_vs_naive']:.2f}x a naive step (medians; minimums "
                f"{res['cost_vs_naive_of_minimums']:.2f}x) -> {res['verdict']}")
    else:
        rmin = res.get("ratio_of_minimums")
        line = (f"{head}: {res['ratio']:.2f}x (medians; minimums {rmin:.2f}x) -> {res['verdict']}"
                if rmin else f"{head}: {res['ratio']:.2f}x -> {res['verdict']}")
    if "ratio_amortised" in res:
        amort = res["ratio_amortised"]
        shown = 1 / amort if "cost_vs_naive" in res else amort
        line += f"; amortised over the re-measure steps {shown:.2f}x -> {res['verdict_amortised']}"
    return line


# -------------------------------------------------------------------------------------------------------- main


def parser():
    p = H.common_parser("SISS engine step benchmark")
    p.add_argument("--sd-v1", action="store_true",
                   help="a UNet/VAE/text encoder of Stable Diffusion v1's size (random weights; for --device cuda)")
    p.add_argument("--accumulation", default=None, help="comma-separated accumulation steps (default 1)")
    p.add_argument("--schedule", choices=("sd", "linear"), default="sd",
                   help="noise schedule: Stable Diffusion v1's scaled_linear (default) or the tiny builder's linear")
    p.add_argument("--work-dir", type=Path, default=None, help="where the built models go (default: a temp dir)")
    return p


def plan_shapes(args, device: torch.device) -> List[str]:
    if args.shapes:
        return H.split_list(args.shapes)
    if args.tiny:
        return ["2x4x16x16"]
    if args.sd_v1:
        return ["1x4x64x64"]
    return ["2x4x64x64"]


def main(argv=None) -> int:
    import tempfile

    args = parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = H.setup(H.resolve_device_arg(args), args.threads, value_checks=not args.no_value_checks)
    if args.sd_v1 and device.type != "cuda" and not args.tiny:
        print("note: --sd-v1 on the CPU takes minutes per step", flush=True)
    shapes = [H.parse_shape(s) for s in plan_shapes(args, device)]
    accs = [int(a) for a in (H.split_list(args.accumulation) or ["1"])]
    providers = H.split_list(args.providers) or list(PROVIDERS)
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        raise SystemExit(f"--providers: expected a subset of {list(PROVIDERS)}, got {bad}")
    if args.tiny:
        repeats, min_ms, warmup = 2, 1.0, 1
    elif args.quick:
        repeats, min_ms, warmup = 5, 0.0, 1
    else:
        repeats, min_ms, warmup = 9, 0.0, 1  # one step is far longer than a scheduler quantum: one call per sample
    repeats = args.repeats or repeats
    if args.min_sample_ms is not None:
        min_ms = args.min_sample_ms
    lag_every = 10

    command = "python " + " ".join([os.path.relpath(sys.argv[0], os.getcwd()) if sys.argv else "bench_engine.py",
                                    *(argv if argv is not None else sys.argv[1:])])
    header = H.machine_header(device)
    header.update({
        "models": ("Stable Diffusion v1 configs, random weights (UNet ~860M params), images 512x512" if args.sd_v1
                   else "engine tiny-sd builder (UNet channels 32/64, cross-attention at the latent resolution; "
                        "tiny VAE and CLIP text encoder), images 2x the latent side"),
        "noise_schedule": ("Stable Diffusion v1 (scaled_linear 0.00085-0.012)" if args.schedule == "sd"
                           else "linear 1e-4-0.02 (tiny builder)"),
        "latents": "VAE scaling_factor calibrated to unit-variance latents",
        "timed_call": "one optimizer step (accumulation x micro-batch of B retain + B forget samples)",
        "lag_every": lag_every,
        "memory_note": ("CPU: 'extra MB' = transient peak of one step from torch.profiler allocator events "
                        "(profile_memory=True), beyond the memory held before the step; notes give the resident "
                        "tensors and extra parameter-sized gradient buffers. CUDA: harness peak/extra MB "
                        "(max_memory_allocated), 'own MB' in the note = resident tensors of the provider + its "
                        "transient peak."),
        "repeats": repeats,
    })
    print(f"== engine step benchmark on {device.type}: {header['cpu_model']}, {header['torch_threads']} threads"
          + (f", {header['gpu']}" if header["gpu"] else "") + f"; torch {header['torch']}", flush=True)
    rows: List[H.BenchRow] = []
    targets: List[Dict[str, Any]] = []
    tmp = None
    work = args.work_dir
    if work is None:
        tmp = tempfile.TemporaryDirectory(prefix="siss-bench-engine-")
        work = Path(tmp.name)
    try:
        for shape in shapes:
            for acc in accs:
                torch.manual_seed(0)
                bench = prepare(shape, acc, device, sd_v1=args.sd_v1, schedule=args.schedule, work=work)
                case, objs = build_case(bench, providers)
                case_rows = H.run_cases([case], device, providers, repeats=repeats, warmup=warmup,
                                        min_sample_ms=min_ms)
                annotate(case_rows, objs, bench, lag_every)
                rows.extend(case_rows)
                if not targets:  # targets on the first case
                    key = (OP, case.shape, case.dtype, case.mode)
                    targets = evaluate_targets(rows, key, device.type, lag_every, args.sd_v1)
                header["unet_parameters"] = bench.unet_params
                header["load_average_at_end"] = H._load_average()
                if args.out is not None:
                    H.write_results(args.out, "SISS engine step benchmark", header, rows, targets, command)
                del case, objs, bench
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        if tmp is not None:
            tmp.cleanup()
    print()
    H.print_rows(rows)
    print()
    for t in targets:
        print(target_text(t))
    if args.out is not None:
        H.write_results(args.out, "SISS engine step benchmark", header, rows, targets, command)
        md = Path(args.out).with_suffix(".md")
        with open(md, "a") as fh:
            fh.write("\n## Targets, as stated\n\n" + "".join(f"- {target_text(t)}\n" for t in targets))
        print(f"\nwrote {args.out} and {md}")
    errors = [r for r in rows if r.status == "error"]
    if errors:
        for r in errors:
            print(f"  {r.op} {r.shape} {r.mode} {r.provider}: {r.note}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
