"""The unlearning loop: ``run(cfg)`` -- one optimizer step at a time, checkpoints, validation, stop rules.

One optimizer step is :class:`~siss_fast.engine.step.UnlearnStep` (objective, partitioned split, SPEC §6
combiner, optimizer); this module adds the metrics, the progress bar, validation, stop rules, checkpoints and outputs.

The sample streams depend only on the global micro-batch layout, so ``W`` processes with ``accumulation_steps = 1``
draw exactly what one process with ``accumulation_steps = W`` draws, and both take the same step.

Data parallel: the UNet is replicated (not DDP-wrapped: DDP forbids two backward passes through one forward,
pytorch#47260); the combiner all-reduces ``G_a`` before its norm is read and ``G`` at the end of the step, so every
norm and coefficient is global. Rank 0 validates, checkpoints and writes the outputs.

Determinism (``train.deterministic: true``): the run seeds python, numpy and torch (CPU and CUDA) from
``train.seed`` -- as every run does -- and in addition calls ``torch.use_deterministic_algorithms(True,
warn_only=False)``, sets ``cudnn.deterministic = True`` / ``cudnn.benchmark = False`` and, on CUDA,
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless already set; it must be set before cuBLAS starts, so set it in the
environment when the process has used CUDA before the run). All of it is restored when ``run`` returns.

* CPU: two runs with the same config, thread count and software are bit-identical (weights and ``metrics.jsonl``
  losses; tested), and so is a run resumed from a checkpoint (also without ``deterministic``).
* CUDA: the siss_fast kernels avoid floating-point atomics and the Triton forward reductions run in a fixed order,
  so they give the same bits every time. Not deterministic by default: cuDNN's convolution backward (algorithm
  choice and split-K reductions), and UNet ops that use ``atomicAdd`` in their backward (e.g. upsampling
  interpolation, index/scatter adds); ``deterministic: true`` forces deterministic algorithms for them, and any op
  that has none raises a ``RuntimeError`` naming it (no ``warn_only``). Bits still change across GPU models,
  CUDA/cuDNN/torch versions, ``mixed_precision`` settings, ``compile``, and world sizes (all-reduce order).
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from . import checkpoint
from . import data as engine_data
from . import lora
from . import models
from . import setup as run_setup
from . import run_record
from .config import EngineConfig, to_dict
from .step import UnlearnStep
from .validator import Validator, unet_state

__all__ = ["RunResult", "run"]


@dataclass
class RunResult:
    output_dir: Path
    stop_reason: str  # forget_target | quality_guard | steps | non_finite | interrupted
    steps_done: int
    best_step: Optional[int]
    final_dir: Optional[Path]
    kept_step: Optional[int] = None  # the step whose weights are the final model (best, last good or end)


def _log(msg: str, dist: run_setup.Dist) -> None:
    if dist.main:
        print(f"[siss-fast] {msg}", flush=True)


class _MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) plus optional tensorboard scalars."""

    def __init__(self, path: Path, resume_step: Optional[int], tensorboard_dir: Optional[Path]):
        self.path = path
        if resume_step is not None and path.is_file():  # drop records past the checkpoint we resume from
            # (and a closing record: a run killed while writing its outputs writes it again)
            keep = [ln for ln in path.read_text().splitlines() if (rec := _parse_record(ln)) is not None
                    and rec.get("step", 0) <= resume_step and "stop_reason" not in rec]
            tmp = path.with_name(path.name + ".tmp")  # a kill during the rewrite keeps the old file
            tmp.write_text("".join(k + "\n" for k in keep))
            tmp.replace(path)
        elif resume_step is None and path.is_file():
            path.unlink()
        self.writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=_jsonable) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None:
                    self.writer.add_scalar(key, value, record.get("step", 0))


def _parse_record(line: str) -> Optional[Dict[str, Any]]:
    """One metrics line, or None for a blank or torn one (a process killed mid-write leaves a partial last line)."""
    try:
        rec = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _jsonable(value: Any) -> Any:
    return str(value)


def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("siss_fast", "torch", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            if name == "siss_fast":
                from siss_fast import __version__

                out[name] = __version__
    return out


def run(cfg: EngineConfig, *, stop_after: Optional[int] = None) -> RunResult:
    """Run the configured unlearning; returns what happened. ``stop_after=K`` ends after step ``K`` (and its
    checkpoint) as if interrupted -- the tests' way of stopping a run to resume it."""
    threads = torch.get_num_threads()
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    if cfg.train.deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reproducibility (CUDA >= 10.2)
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        return _run(cfg, stop_after)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _finished(cfg: EngineConfig, out: Path, dist: run_setup.Dist) -> Optional[RunResult]:
    """The result of the finished run in ``out`` when this command retries it (``resume`` set): its final model is
    verified against the manifest and nothing is written. A new run into that folder is refused."""
    manifest = run_record.read_finished(out)
    if manifest is None:
        return None
    if not cfg.checkpoint.resume:
        run_record.refuse_new_run(out, manifest)
    run_record.verify_final(out, manifest)
    _log(f"{out} is a finished run: {run_record.describe_finished(manifest)}; nothing to do (files unchanged). To "
         f"continue past its stop, start a new run from its final model: model={out / 'final'} output_dir=NEW_DIR",
         dist)
    stop = manifest.get("stop") or {}
    return RunResult(out, stop.get("reason", manifest.get("stop_reason")), int(stop.get("step", 0)),
                     stop.get("best_step"), out / "final", stop.get("kept_step"))


def _run(cfg: EngineConfig, stop_after: Optional[int]) -> RunResult:
    started = datetime.now(timezone.utc).isoformat()
    dist = run_setup.init_distributed(cfg.train.device)
    device = run_setup.pick_device(cfg.train.device, dist)
    out = Path(cfg.output_dir)
    finished = _finished(cfg, out, dist)  # before anything loads or is written
    if finished is not None:
        return finished
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    torch.manual_seed(cfg.train.seed)  # CPU and every CUDA device

    model = run_setup.prepare_model(cfg, dist, out)
    run_data = run_setup.prepare_data(cfg, model, device)
    step_fn = UnlearnStep(cfg, model, run_data, device, dist=dist)  # fills the model kind's batch / lr defaults
    if dist.main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    unet, optimizer, lr_schedule, combiner, streams = (step_fn.unet, step_fn.optimizer, step_fn.lr_schedule,
                                                       step_fn.combiner, step_fn.streams)
    if dist.world > 1:  # replicas start identical
        for p in unet.parameters():
            torch.distributed.broadcast(p.data, src=0)
    acc, batch = cfg.train.accumulation_steps, cfg.train.batch_size
    validator = Validator(cfg, model, run_data, device, out) if (dist.main and cfg.validation.every) else None

    # ---------------------------------------------------------------- resume
    start, consecutive_skips = 0, 0
    stop: Optional[Dict[str, Any]] = None  # {"reason", "step"} once a stop rule fired (part of every checkpoint)
    ckpt_root = out / "checkpoints"
    resume_from = None
    if cfg.checkpoint.resume == "latest":
        resume_from = checkpoint.find_latest(ckpt_root)
        if resume_from is None:
            _log(f"resume=latest: no checkpoint yet in {ckpt_root}; starting from the beginning", dist)
    elif cfg.checkpoint.resume:
        resume_from = Path(cfg.checkpoint.resume)
    if resume_from is not None:
        state = checkpoint.load_checkpoint(resume_from, dist.rank)
        trainer = state["trainer"]
        try:
            lora.load_trainable_state(unet, state["unet"])  # the full UNet, or the adapter alone
            if step_fn.ema is not None:
                step_fn.ema.load_state_dict(trainer["ema"])
        except (ValueError, RuntimeError) as exc:
            raise checkpoint.CheckpointError(f"checkpoint {str(resume_from)!r} does not fit this run: {exc}") from None
        optimizer.load_state_dict(trainer["optimizer"])
        lr_schedule.load_state_dict(trainer["lr_schedule"])
        combiner.load_state_dict(trainer["combiner"])
        start, consecutive_skips = int(trainer["step"]), int(trainer["consecutive_skips"])
        stop = trainer.get("stop")
        if validator is not None and trainer.get("validation") is not None:
            validator.load_state_dict(trainer["validation"])
        checkpoint.restore_rng(state["rng"], streams)
        _log(f"resumed from {resume_from} at step {start}"
             + (f": the {stop['reason']} rule had stopped the run there; writing its outputs" if stop else ""), dist)
    log = _MetricsLog(out / "metrics.jsonl", start if resume_from is not None else None,
                      out / "tensorboard" if cfg.log.tensorboard else None) if dist.main else None

    def save_checkpoint(step: int) -> None:
        rng = checkpoint.capture_rng(streams)
        if dist.world > 1:
            gathered: List[Any] = [None] * dist.world
            torch.distributed.all_gather_object(gathered, rng)
            rng_states = dict(enumerate(gathered))
        else:
            rng_states = {0: rng}
        if dist.main:
            trainer_state = {"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                             "combiner": combiner.state_dict(), "step": step, "consecutive_skips": consecutive_skips,
                             "stop": stop, "validation": None if validator is None else validator.state_dict(),
                             "ema": None if step_fn.ema is None else step_fn.ema.state_dict()}
            weights = lora.trainable_state(unet, copy=False)  # with adapters: the adapter alone
            checkpoint.save_checkpoint(ckpt_root, step, weights, trainer_state, rng_states, cfg.checkpoint.keep_last)
        dist.barrier()

    def validate(step: int) -> Optional[str]:
        """Validate on rank 0; every rank learns the stop decision."""
        reason = None
        if validator is not None:
            started_at = time.perf_counter()
            verdict = validator(step_fn.eval_unet, step)
            reason = verdict["stop"]
            log.write({"step": step, "validation": verdict["scores"], "target_met": verdict["target_met"],
                       "guard_tripped": verdict["guard_tripped"], "is_best": verdict["is_best"],
                       "validation_s": time.perf_counter() - started_at})
            _log(f"validation @ step {step}: {verdict['scores']}"
                 + (f" -> stop ({reason})" if reason else ""), dist)
            if step == 0 and verdict["target_met"]:
                _log(f"note: the base model already meets the forget target ({cfg.validation.forget_metric} "
                     f"{verdict['scores'][cfg.validation.forget_metric]:.3g} vs target {verdict['target']:.3g}): "
                     "its samples do not show the forget items (raise validation.num_samples if they are rare); the "
                     "run stops at the first validation after validation.min_steps", dist)
        if dist.world > 1:
            codes = [None, "forget_target", "quality_guard"]
            flag = torch.tensor([codes.index(reason)], device=device if device.type == "cuda" else "cpu")
            torch.distributed.broadcast(flag, src=0)
            reason = codes[int(flag.item())]
        return reason

    # ---------------------------------------------------------------- steps
    if start == 0 and cfg.validation.every:
        validate(0)
    progress = None
    if dist.main and cfg.log.progress and stop is None:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start, desc=f"unlearn[{cfg.method.name}]", dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # resumed from the checkpoint of a stop: the outputs are all that is left
    for step in range(start + 1, cfg.train.steps + 1) if stop is None else ():
        result = step_fn()
        consecutive_skips = consecutive_skips + 1 if result.info.skipped else 0
        if dist.main:
            _log_step(log, progress, step, result, combiner, dist.world * acc * batch, device)
        reason = None
        if consecutive_skips >= cfg.gradient.max_consecutive_skips:
            reason = "non_finite"
            _log(f"stopping: {consecutive_skips} consecutive steps had a non-finite gradient (weights untouched); "
                 "lower train.lr, use train.mixed_precision: bf16 instead of fp16, or set method.weight_clip", dist)
        elif cfg.validation.every and (step % cfg.validation.every == 0 or step == cfg.train.steps):
            reason = validate(step)  # before the checkpoint, so that a resumed run knows this validation
        if reason is None and step == cfg.train.steps:
            reason = "steps"
        if reason is not None:
            stop = {"reason": reason, "step": step}  # recorded (in this step's checkpoint) before any output
        if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or stop is not None):
            save_checkpoint(step)
        if stop_after is not None and step >= stop_after:
            if progress is not None:
                progress.close()
            return RunResult(out, "interrupted", step, None, None)
        if stop is not None:
            break
    if progress is not None:
        progress.close()
    if stop is None:  # a budget of 0 steps, or a resume at the budget from a checkpoint of an older version
        stop = {"reason": "steps", "step": start}
    return _write_outputs(cfg, out, dist, model, run_data, validator, combiner, step_fn.eval_unet, log, stop, started)


def _log_step(log: _MetricsLog, progress: Any, step: int, result: Any, combiner: Any, images: int,
              device: torch.device) -> None:
    """One training step's record in ``metrics.jsonl`` (and TensorBoard) and the progress bar."""
    info, stats, mixed, elapsed = result.info, result.stats, result.counts["mixed"], result.seconds
    record: Dict[str, Any] = {"step": step, **stats, "norm_x": info.norm_x, "norm_a": info.norm_a,
                              "forget_coef": info.forget_coef, "forget_scale": abs(info.forget_coef),
                              "scaling_norm": info.scaling_norm, "total_norm": info.total_norm,
                              "clip_coef": info.clip_coef, "grad_path": info.path, "skipped": info.skipped,
                              "skipped_steps": combiner.skipped_steps,
                              "dropped_forget_steps": combiner.dropped_forget_steps,
                              "capped_steps": combiner.capped_steps, "mixed_samples": mixed, "lr": result.lr,
                              "step_time_s": elapsed, "images_per_s": images / max(elapsed, 1e-9)}
    if device.type == "cuda":
        record["peak_cuda_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if not math.isfinite(record["total_norm"]):
        record["total_norm"] = None
    log.write(record)
    if progress is not None:
        progress.update(1)
        progress.set_postfix({"L_x": f"{stats.get('loss_retain', float('nan')):.4f}",
                              "L_a": f"{stats.get('loss_forget', float('nan')):.4f}",
                              "|G_a|": "-" if info.norm_a is None else f"{info.norm_a:.3g}",
                              "f": f"{info.forget_coef:.3g}", "skip": combiner.skipped_steps,
                              "mixed": mixed}, refresh=False)


def _time_split(path: Path) -> Dict[str, float]:
    """Seconds spent in optimizer steps and in validation over the whole run (resumed parts included), from
    ``metrics.jsonl``, and validation's share of their sum."""
    train = check = 0.0
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = _parse_record(line) or {}
        train += float(rec.get("step_time_s") or 0.0)
        check += float(rec.get("validation_s") or 0.0)
    return {"train_s": round(train, 3), "validation_s": round(check, 3),
            "validation_share": round(check / (train + check), 4) if train + check > 0 else 0.0}


def _write_outputs(cfg: EngineConfig, out: Path, dist: run_setup.Dist, model: models.LoadedModel,
                   run_data: run_setup.RunData, validator: Optional[Validator], combiner: Any, unet: torch.nn.Module, log: Optional[_MetricsLog],
                   stop: Dict[str, Any], started: str) -> RunResult:
    """The end of a run (:mod:`.run_record`): closing record, ``final/``, then the manifest that marks it finished."""
    reason, step = stop["reason"], int(stop["step"])
    best_step = validator.rules.best_step if validator is not None else None
    final_dir = out / "final"
    kept_step = step
    if dist.main:
        final_state, final_from, kept = validator.final_state(reason) if validator is not None else (None, "end", None)
        if final_state is None:
            final_state, final_from = unet_state(unet), f"end@{step}"
        else:
            kept_step = kept
        log.write({"step": step, "stop_reason": reason, "final_from": final_from})
        adapter = None
        if lora.is_adapted(unet):  # final_adapter/ holds the kept adapter, final/ the base with it merged
            lora.load_trainable_state(unet, final_state)
            adapter = out / "final_adapter"
            lora.save_adapter(unet, cfg.train, adapter)
            final_state = lora.merged_state(unet)
        models.save_final(model, final_state, final_dir)
        manifest = {
            "method": cfg.method.name,
            "forget_items": engine_data.describe_set(run_data.forget_files),
            "retain_items": len(run_data.retain_files),
            "base_model": {"source": cfg.model.path or f"build:{cfg.model.build}",
                           "sha256": models.hash_model_folder(model.path)},
            "stop": {"reason": reason, "step": step, "kept_step": kept_step, "best_step": best_step},
            "stop_reason": reason,
            "steps_done": step,
            "final_model": {"path": str(final_dir), "from": final_from, "sha256": models.hash_model_folder(final_dir),
                            "files": run_record.final_files(final_dir)},
            "final_adapter": None if adapter is None else {
                "path": str(adapter), "sha256": models.hash_model_folder(adapter),
                "files": run_record.final_files(adapter)},
            "manifest_format": run_record.MANIFEST_FORMAT,
            "validation_seeds": run_record.validation_seeds(to_dict(cfg), len(run_data.forget_files)),
            "metrics_before": validator.scores_by_step.get(0) if validator else None,
            "metrics_after": validator.scores_by_step.get(kept_step) if validator else None,
            "scaling_norm": combiner.scaling_norm,
            "skipped_steps": combiner.skipped_steps,
            "time": _time_split(out / "metrics.jsonl"),
            "world_size": dist.world,
            "config": to_dict(cfg),
            "software": _versions(),
            "started": started,
            "finished": datetime.now(timezone.utc).isoformat(),
        }
        run_record.write_manifest(out, manifest)
        _log(f"done: {reason} after {step} steps; final model ({final_from}) in {final_dir}", dist)
    dist.barrier()
    return RunResult(out, reason, step, best_step, final_dir, kept_step)
