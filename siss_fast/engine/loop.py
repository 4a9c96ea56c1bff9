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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from . import checkpoint as CK
from . import data as D
from . import models as M
from . import setup as S
from . import validation as V
from .config import EngineConfig, to_dict
from .step import UnlearnStep
from .stop_rules import StopRules

__all__ = ["RunResult", "run"]


@dataclass
class RunResult:
    output_dir: Path
    stop_reason: str  # forget_target | quality_guard | steps | non_finite | interrupted
    steps_done: int
    best_step: Optional[int]
    final_dir: Optional[Path]
    kept_step: Optional[int] = None  # the step whose weights are the final model (best, last good or end)


def _log(msg: str, dist: S.Dist) -> None:
    if dist.main:
        print(f"[siss-fast] {msg}", flush=True)


class _MetricsLog:
    """``metrics.jsonl`` (one JSON object per line) plus optional tensorboard scalars."""

    def __init__(self, path: Path, resume_step: Optional[int], tensorboard_dir: Optional[Path]):
        self.path = path
        if resume_step is not None and path.is_file():  # drop records past the checkpoint we resume from
            keep = [ln for ln in path.read_text().splitlines() if (rec := _parse_record(ln)) is not None
                    and rec.get("step", 0) <= resume_step]
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


def _unet_state(unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}


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


class _Validator:
    """Rank 0's sampler + metrics + stop rules + sample grids + the best model on disk."""

    def __init__(self, cfg: EngineConfig, model: M.LoadedModel, run: S.RunData, device: torch.device, out: Path):
        v = cfg.validation
        self.cfg, self.model, self.device, self.out = cfg, model, device, out
        ctx = V.MetricContext(run.retain_pixels, run.forget_pixels, {}, model.kind, device, model, model.unet)
        self.metrics = V.build_metrics(v.metrics, ctx, v.metric_options)
        self.rules = StopRules(v.forget_metric, v.forget_target, v.quality_metric, v.quality_tolerance,
                                 v.stop_on_target, v.stop_on_guard, v.min_steps, v.forget_target_ratio,
                                 v.target_patience)
        self.cond = self.uncond = None
        if model.kind == "sd":
            prompt = v.prompt or run.forget_prompts[0]
            frozen = S.autocast_dtype(cfg.train.mixed_precision) or torch.float32
            emb, _ = D.encode_prompts(model.tokenizer, model.text_encoder, [prompt, ""], device, frozen)
            self.cond, self.uncond = emb[:1], emb[1:]
        self.scores_by_step: Dict[int, Dict[str, float]] = {}
        self.last_good_step: Optional[int] = None

    def __call__(self, unet: torch.nn.Module, step: int) -> Dict[str, Any]:
        v = self.cfg.validation
        samples = V.sample_images(self.model, unet, num_samples=v.num_samples, steps=v.sampler_steps, seed=v.seed,
                                  batch_size=v.batch_size, device=self.device,
                                  autocast_dtype=S.autocast_dtype(self.cfg.train.mixed_precision),
                                  encoder_hidden_states=self.cond, uncond_hidden_states=self.uncond,
                                  guidance_scale=v.guidance_scale)
        scores = {name: float(fn(samples)) for name, fn in self.metrics.items()}
        self.scores_by_step[step] = scores
        if v.grids:
            (self.out / "samples").mkdir(exist_ok=True)
            V.save_grid(samples, self.out / "samples" / f"step-{step:06d}.png")
        verdict = self.rules.update(step, scores)
        if verdict["is_best"]:
            self._save_state(unet, step, "best")
        elif self.rules.best_step is None and not verdict["guard_tripped"]:
            # until the target is met, keep the last state within the quality guard: if the guard trips first,
            # that state (not the tripped one) is the final model
            self._save_state(unet, step, "last_good")
            self.last_good_step = step
        return {"scores": scores, **verdict}

    def _save_state(self, unet: torch.nn.Module, step: int, name: str) -> None:
        import os

        from safetensors.torch import save_file

        tmp = self.out / f".{name}.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in _unet_state(unet).items()}, str(tmp))
        os.replace(tmp, self.out / f"{name}.safetensors")
        (self.out / f"{name}.json").write_text(json.dumps({"step": step, "scores": self.scores_by_step[step]}))

    def state_dict(self) -> Dict[str, Any]:
        return {"rules": self.rules.state_dict(), "last_good_step": self.last_good_step,
                "scores": {str(k): v for k, v in self.scores_by_step.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rules.load_state_dict(state["rules"])
        self.scores_by_step = {int(k): dict(v) for k, v in state["scores"].items()}
        self.last_good_step = state.get("last_good_step")


def run(cfg: EngineConfig, *, stop_after: Optional[int] = None, _fail_checkpoint_after: Optional[str] = None
        ) -> RunResult:
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
        return _run(cfg, stop_after, _fail_checkpoint_after)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _run(cfg: EngineConfig, stop_after: Optional[int], _fail_checkpoint_after: Optional[str]) -> RunResult:
    started = datetime.now(timezone.utc).isoformat()
    dist = S.init_distributed(cfg.train.device)
    device = S.pick_device(cfg.train.device, dist)
    out = Path(cfg.output_dir)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    torch.manual_seed(cfg.train.seed)  # CPU and every CUDA device

    model = S.prepare_model(cfg, dist, out)
    run_data = S.prepare_data(cfg, model, device)
    step_fn = UnlearnStep(cfg, model, run_data, device, dist=dist)  # fills the model kind's batch / lr defaults
    if dist.main:
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    unet, optimizer, lr_schedule, combiner, streams = (step_fn.unet, step_fn.optimizer, step_fn.lr_schedule,
                                                       step_fn.combiner, step_fn.streams)
    if dist.world > 1:  # replicas start identical
        for p in unet.parameters():
            torch.distributed.broadcast(p.data, src=0)
    acc, batch = cfg.train.accumulation_steps, cfg.train.batch_size
    validator = _Validator(cfg, model, run_data, device, out) if (dist.main and cfg.validation.every) else None

    # ---------------------------------------------------------------- resume
    start, consecutive_skips = 0, 0
    ckpt_root = out / "checkpoints"
    resume_from = None
    if cfg.checkpoint.resume == "latest":
        resume_from = CK.find_latest(ckpt_root)
        if resume_from is None:
            _log(f"resume=latest: no checkpoint yet in {ckpt_root}; starting from the beginning", dist)
    elif cfg.checkpoint.resume:
        resume_from = Path(cfg.checkpoint.resume)
    if resume_from is not None:
        state = CK.load_checkpoint(resume_from, dist.rank)
        unet.load_state_dict(state["unet"])
        trainer = state["trainer"]
        optimizer.load_state_dict(trainer["optimizer"])
        lr_schedule.load_state_dict(trainer["lr_schedule"])
        combiner.load_state_dict(trainer["combiner"])
        start, consecutive_skips = int(trainer["step"]), int(trainer["consecutive_skips"])
        if validator is not None and trainer.get("validation") is not None:
            validator.load_state_dict(trainer["validation"])
        CK.restore_rng(state["rng"], streams)
        _log(f"resumed from {resume_from} at step {start}", dist)
    log = _MetricsLog(out / "metrics.jsonl", start if resume_from is not None else None,
                      out / "tensorboard" if cfg.log.tensorboard else None) if dist.main else None

    def save_checkpoint(step: int) -> None:
        rng = CK.capture_rng(streams)
        if dist.world > 1:
            gathered: List[Any] = [None] * dist.world
            torch.distributed.all_gather_object(gathered, rng)
            rng_states = dict(enumerate(gathered))
        else:
            rng_states = {0: rng}
        if dist.main:
            trainer_state = {"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                             "combiner": combiner.state_dict(), "step": step, "consecutive_skips": consecutive_skips,
                             "validation": None if validator is None else validator.state_dict()}
            CK.save_checkpoint(ckpt_root, step, unet.state_dict(), trainer_state, rng_states,
                               cfg.checkpoint.keep_last, _fail_after=_fail_checkpoint_after)
        dist.barrier()

    def validate(step: int) -> Optional[str]:
        """Validate on rank 0; every rank learns the stop decision."""
        reason = None
        if validator is not None:
            verdict = validator(unet, step)
            reason = verdict["stop"]
            log.write({"step": step, "validation": verdict["scores"], "target_met": verdict["target_met"],
                       "guard_tripped": verdict["guard_tripped"], "is_best": verdict["is_best"]})
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
    stop_reason = "steps"
    if start == 0 and cfg.validation.every:
        validate(0)
    progress = None
    if dist.main and cfg.log.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.train.steps, initial=start, desc=f"unlearn[{cfg.method.name}]", dynamic_ncols=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = start
    for step in range(start + 1, cfg.train.steps + 1):
        result = step_fn()
        info, stats, mixed, lr, elapsed = result.info, result.stats, result.counts["mixed"], result.lr, result.seconds
        if info.skipped:
            consecutive_skips += 1
        else:
            consecutive_skips = 0

        if dist.main:
            record: Dict[str, Any] = {"step": step, **stats, "norm_x": info.norm_x, "norm_a": info.norm_a,
                                      "forget_coef": info.forget_coef, "forget_scale": abs(info.forget_coef),
                                      "scaling_norm": info.scaling_norm, "total_norm": info.total_norm,
                                      "clip_coef": info.clip_coef, "grad_path": info.path, "skipped": info.skipped,
                                      "skipped_steps": combiner.skipped_steps,
                                      "dropped_forget_steps": combiner.dropped_forget_steps,
                                      "capped_steps": combiner.capped_steps, "mixed_samples": mixed, "lr": lr,
                                      "step_time_s": elapsed,
                                      "images_per_s": dist.world * acc * batch / max(elapsed, 1e-9)}
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
        if consecutive_skips >= cfg.gradient.max_consecutive_skips:
            stop_reason = "non_finite"
            _log(f"stopping: {consecutive_skips} consecutive steps had a non-finite gradient (weights untouched); "
                 "lower train.lr, use train.mixed_precision: bf16 instead of fp16, or set method.weight_clip", dist)
            break
        reason = None
        if cfg.validation.every and (step % cfg.validation.every == 0 or step == cfg.train.steps):
            reason = validate(step)  # before the checkpoint, so that a resumed run knows this validation
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            save_checkpoint(step)
        if stop_after is not None and step >= stop_after:
            if progress is not None:
                progress.close()
            return RunResult(out, "interrupted", step, None, None)
        if reason is not None:
            stop_reason = reason
            break
    if progress is not None:
        progress.close()

    # ---------------------------------------------------------------- outputs
    best_step = validator.rules.best_step if validator is not None else None
    final_dir = out / "final"
    kept_step = step
    if dist.main:
        from safetensors.torch import load_file

        last_good = validator.last_good_step if validator is not None else None
        if best_step is not None and (out / "best.safetensors").is_file():
            final_state, final_from = load_file(str(out / "best.safetensors")), f"best@{best_step}"
            kept_step = best_step
        elif stop_reason == "quality_guard" and last_good is not None and (out / "last_good.safetensors").is_file():
            # the target was never met and quality fell too far: keep the last state within the guard
            final_state, final_from = load_file(str(out / "last_good.safetensors")), f"last_good@{last_good}"
            kept_step = last_good
        else:
            final_state, final_from = _unet_state(unet), f"end@{step}"
        M.save_final(model, final_state, final_dir)
        manifest = {
            "method": cfg.method.name,
            "forget_items": D.describe_set(run_data.forget_files),
            "retain_items": len(run_data.retain_files),
            "base_model": {"source": cfg.model.path or f"build:{cfg.model.build}",
                           "sha256": M.hash_model_folder(model.path)},
            "stop_reason": stop_reason,
            "steps_done": step,
            "final_model": {"path": str(final_dir), "from": final_from, "sha256": M.hash_model_folder(final_dir)},
            "metrics_before": validator.scores_by_step.get(0) if validator else None,
            "metrics_after": validator.scores_by_step.get(kept_step) if validator else None,
            "scaling_norm": combiner.scaling_norm,
            "skipped_steps": combiner.skipped_steps,
            "world_size": dist.world,
            "config": to_dict(cfg),
            "software": _versions(),
            "started": started,
            "finished": datetime.now(timezone.utc).isoformat(),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=_jsonable))
        log.write({"step": step, "stop_reason": stop_reason, "final_from": final_from})
        _log(f"done: {stop_reason} after {step} steps; final model ({final_from}) in {final_dir}", dist)
    dist.barrier()
    return RunResult(out, stop_reason, step, best_step, final_dir, kept_step)
