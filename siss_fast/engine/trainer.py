"""What one unlearning run holds between its steps (:class:`Trainer`), and its metrics file.

:func:`siss_fast.engine.loop.run` reads as the run's outline; the parts it calls live here: building the run
(model, data, :class:`~.step.UnlearnStep`, validator), resuming from a checkpoint, one optimizer step with its
record and stop rules, one validation check, one checkpoint. The end of the run (final model, manifest) is
``loop._write_outputs``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import checkpoint
from . import lora
from . import models
from . import setup as run_setup
from .config import EngineConfig, to_dict
from .step import UnlearnStep
from .validator import Validator


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


class Trainer:
    """The state of one run: the step (:class:`UnlearnStep`: UNet, optimizer, LR schedule, combiner, sample
    streams), rank 0's validator and metrics log, the step to start from, the count of consecutive skipped steps
    and the stop decision (``{"reason", "step"}`` once a stop rule fired; part of every checkpoint)."""

    def __init__(self, cfg: EngineConfig, dist: run_setup.Dist, device: torch.device, out: Path):
        self.cfg, self.dist, self.device, self.out = cfg, dist, device, out
        self.model = run_setup.prepare_model(cfg, dist, out)
        self.run_data = run_setup.prepare_data(cfg, self.model, device)
        if self.model.kind == "sd" and cfg.validation.every == 0:  # 0: off (null is the kind's default, resolved
            models.release_frozen(self.model)  # by the step); latents and embeddings are cached: free the VAE and
            # text encoder before the step is built (a LoRA run casts the UNet then: its moment of two copies)
        self.step_fn = UnlearnStep(cfg, self.model, self.run_data, device, dist=dist)  # the model kind's defaults
        self.images_per_step = dist.world * cfg.train.accumulation_steps * cfg.train.batch_size
        if dist.main:
            (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        if dist.world > 1:  # replicas start identical
            for p in self.step_fn.unet.parameters():
                torch.distributed.broadcast(p.data, src=0)
        self.validator = (Validator(cfg, self.model, self.run_data, device, out)
                          if (dist.main and cfg.validation.every) else None)
        self.start, self.consecutive_skips = 0, 0
        self.stop: Optional[Dict[str, Any]] = None
        self.ckpt_root = out / "checkpoints"
        self.log: Optional[_MetricsLog] = None
        self.progress: Any = None

    # ------------------------------------------------------------------------------------------------ resume

    def resume(self) -> bool:
        """Restore the checkpoint that ``checkpoint.resume`` names, if any; whether one was restored."""
        cfg, dist, step_fn = self.cfg, self.dist, self.step_fn
        resume_from = None
        if cfg.checkpoint.resume == "latest":
            resume_from = checkpoint.find_latest(self.ckpt_root)
            if resume_from is None:
                _log(f"resume=latest: no checkpoint yet in {self.ckpt_root}; starting from the beginning", dist)
        elif cfg.checkpoint.resume:
            resume_from = Path(cfg.checkpoint.resume)
        if resume_from is not None:
            state = checkpoint.load_checkpoint(resume_from, dist.rank)
            trainer = state["trainer"]
            try:
                lora.load_trainable_state(step_fn.unet, state["unet"])  # the full UNet, or the adapter alone
                if step_fn.ema is not None:
                    step_fn.ema.load_state_dict(trainer["ema"])
            except (ValueError, RuntimeError) as exc:
                raise checkpoint.CheckpointError(
                    f"checkpoint {str(resume_from)!r} does not fit this run: {exc}") from None
            step_fn.optimizer.load_state_dict(trainer["optimizer"])
            step_fn.lr_schedule.load_state_dict(trainer["lr_schedule"])
            step_fn.combiner.load_state_dict(trainer["combiner"])
            self.start, self.consecutive_skips = int(trainer["step"]), int(trainer["consecutive_skips"])
            self.stop = stop = trainer.get("stop")
            if self.validator is not None and trainer.get("validation") is not None:
                self.validator.load_state_dict(trainer["validation"])
            checkpoint.restore_rng(state["rng"], step_fn.streams)
            _log(f"resumed from {resume_from} at step {self.start}"
                 + (f": the {stop['reason']} rule had stopped the run there; writing its outputs" if stop else ""),
                 dist)
        return resume_from is not None

    def open_log(self, resumed: bool) -> None:
        """``metrics.jsonl`` on rank 0: a resumed run keeps the records up to its checkpoint, a new one starts
        empty."""
        if self.dist.main:
            self.log = _MetricsLog(self.out / "metrics.jsonl", self.start if resumed else None,
                                   self.out / "tensorboard" if self.cfg.log.tensorboard else None)

    # ------------------------------------------------------------------------------------------------- steps

    def open_progress(self) -> None:
        """The progress bar (rank 0, ``log.progress``; none when resumed at a stop: only the outputs are left)."""
        cfg = self.cfg
        if self.dist.main and cfg.log.progress and self.stop is None:
            from tqdm.auto import tqdm

            self.progress = tqdm(total=cfg.train.steps, initial=self.start, desc=f"unlearn[{cfg.method.name}]",
                                 dynamic_ncols=True)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()

    def step(self, step: int) -> None:
        """Optimizer step ``step``: its record, the stop rules (too many skipped steps, validation, the budget) and
        its checkpoint. A rule that fires sets :attr:`stop` before the checkpoint, so that a resumed run knows it."""
        cfg, dist = self.cfg, self.dist
        result = self.step_fn()
        self.consecutive_skips = self.consecutive_skips + 1 if result.info.skipped else 0
        if dist.main:
            _log_step(self.log, self.progress, step, result, self.step_fn.combiner, self.images_per_step,
                      self.device)
        reason = None
        if self.consecutive_skips >= cfg.gradient.max_consecutive_skips:
            reason = "non_finite"
            _log(f"stopping: {self.consecutive_skips} consecutive steps had a non-finite gradient (weights "
                 "untouched); lower train.lr, use train.mixed_precision: bf16 instead of fp16, or set "
                 "method.weight_clip", dist)
        elif cfg.validation.every and (step % cfg.validation.every == 0 or step == cfg.train.steps):
            reason = self.validate(step)  # before the checkpoint, so that a resumed run knows this validation
        if reason is None and step == cfg.train.steps:
            reason = "steps"
        if reason is not None:
            self.stop = {"reason": reason, "step": step}  # recorded (in this step's checkpoint) before any output
        if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or self.stop is not None):
            self.save_checkpoint(step)

    # ------------------------------------------------------------------------------------- validation, checkpoint

    def validate(self, step: int) -> Optional[str]:
        """Validate on rank 0; every rank learns the stop decision (None, "forget_target" or "quality_guard")."""
        cfg, dist, validator = self.cfg, self.dist, self.validator
        reason = None
        if validator is not None:
            started_at = time.perf_counter()
            verdict = validator(self.step_fn.eval_unet, step)
            reason = verdict["stop"]
            self.log.write({"step": step, "validation": verdict["scores"], "target_met": verdict["target_met"],
                            "guard_tripped": verdict["guard_tripped"], "is_best": verdict["is_best"],
                            "validation_s": time.perf_counter() - started_at})
            _log(f"validation @ step {step}: {verdict['scores']}"
                 + (f" -> stop ({reason})" if reason else ""), dist)
            if step == 0 and verdict["target_met"]:
                _log(f"note: the base model already meets the forget target ({cfg.validation.forget_metric} "
                     f"{verdict['scores'][cfg.validation.forget_metric]:.3g} vs target {verdict['target']:.3g}): "
                     "its samples do not show the forget items (raise validation.num_samples if they are rare); "
                     "the run stops at the first validation after validation.min_steps", dist)
        if dist.world > 1:
            codes = [None, "forget_target", "quality_guard"]
            device = self.device
            flag = torch.tensor([codes.index(reason)], device=device if device.type == "cuda" else "cpu")
            torch.distributed.broadcast(flag, src=0)
            reason = codes[int(flag.item())]
        return reason

    def save_checkpoint(self, step: int) -> None:
        """Checkpoint after ``step``: weights (the adapter alone with LoRA), trainer state, every rank's RNG."""
        dist, step_fn = self.dist, self.step_fn
        rng = checkpoint.capture_rng(step_fn.streams)
        if dist.world > 1:
            gathered: List[Any] = [None] * dist.world
            torch.distributed.all_gather_object(gathered, rng)
            rng_states = dict(enumerate(gathered))
        else:
            rng_states = {0: rng}
        if dist.main:
            trainer_state = {"optimizer": step_fn.optimizer.state_dict(),
                             "lr_schedule": step_fn.lr_schedule.state_dict(),
                             "combiner": step_fn.combiner.state_dict(), "step": step,
                             "consecutive_skips": self.consecutive_skips, "stop": self.stop,
                             "validation": None if self.validator is None else self.validator.state_dict(),
                             "ema": None if step_fn.ema is None else step_fn.ema.state_dict()}
            weights = lora.trainable_state(step_fn.unet, copy=False)  # with adapters: the adapter alone
            checkpoint.save_checkpoint(self.ckpt_root, step, weights, trainer_state, rng_states,
                                       self.cfg.checkpoint.keep_last)
        dist.barrier()


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
