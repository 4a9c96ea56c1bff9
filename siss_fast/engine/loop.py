"""The unlearning loop: ``run(cfg)`` -- one optimizer step at a time, checkpoints, validation, stop rules.

One optimizer step is :class:`~siss_fast.engine.step.UnlearnStep` (objective, partitioned split, SPEC §6
combiner, optimizer). :class:`~siss_fast.engine.trainer.Trainer` holds the run between its steps (resume, one step
with its metrics record and stop rules, validation, checkpoints); this module is the run's outline (``_run``) and its
end (final model and manifest, :func:`_write_outputs`).

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

import platform
import random
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from . import data as engine_data
from . import lora
from . import models
from . import setup as run_setup
from . import run_record
from .config import EngineConfig, to_dict
from .trainer import Trainer, _log, _MetricsLog, _parse_record
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
    """The run's outline; its parts are :class:`~.trainer.Trainer`'s methods and :func:`_write_outputs`."""
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
    _seed(cfg.train.seed)
    trainer = Trainer(cfg, dist, device, out)  # model, data, the step, the validator; writes config.json
    trainer.open_log(resumed=trainer.resume())
    if trainer.start == 0 and cfg.validation.every:
        trainer.validate(0)
    trainer.open_progress()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # resumed from the checkpoint of a stop: the outputs are all that is left
    for step in range(trainer.start + 1, cfg.train.steps + 1) if trainer.stop is None else ():
        trainer.step(step)  # the optimizer step, its record, the stop rules, its checkpoint
        if stop_after is not None and step >= stop_after:
            trainer.close_progress()
            return RunResult(out, "interrupted", step, None, None)
        if trainer.stop is not None:
            break
    trainer.close_progress()
    # no stop yet: a budget of 0 steps, or a resume at the budget from a checkpoint of an older version
    stop = trainer.stop if trainer.stop is not None else {"reason": "steps", "step": trainer.start}
    step_fn = trainer.step_fn
    return _write_outputs(cfg, out, dist, trainer.model, trainer.run_data, trainer.validator, step_fn.combiner,
                          step_fn.eval_unet, trainer.log, stop, started)


def _seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from ``train.seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
                   run_data: run_setup.RunData, validator: Optional[Validator], combiner: Any, unet: torch.nn.Module,
                   log: Optional[_MetricsLog], stop: Dict[str, Any], started: str) -> RunResult:
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
            final_state = lora.merged_state(unet, base_folder=models.unet_folder(model.path))
        models.save_final(model, final_state, final_dir, frozen_from=model.path)  # frozen parts: the base's bytes
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
