"""Rank 0's validator: samples, metrics, stop rules, sample grids, and the kept states on disk.

It owns which weights become the final model (:meth:`Validator.final_state`):

* the target was met (``target_patience`` checks in a row within the guard): the best such state, ``best@N``;
* otherwise, when the quality guard stopped the run: the last validated state within the guard, ``last_good@N``;
* otherwise (budget, non-finite stop, no validation): the end state, ``end@N``.

Kept states live in ``OUTPUT_DIR/best.safetensors`` and ``OUTPUT_DIR/last_good.safetensors`` (each written to a
temp file and renamed); their step and sha256 are part of :meth:`state_dict`, hence of every checkpoint, and
:meth:`final_state` refuses a file whose hash differs from the record (:class:`~.checkpoint.CheckpointError`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ..hashing import sha256_file
from . import lora
from . import setup as run_setup
from . import validation
from .checkpoint import CheckpointError
from .config import EngineConfig
from .stop_rules import StopRules

__all__ = ["Validator", "unet_state"]


def unet_state(unet: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A detached CPU copy of the UNet's trained weights: all of them, or with LoRA adapters (:mod:`.lora`) the
    adapter tensors alone (kept states are then small; the final write merges them)."""
    return lora.trainable_state(unet)


class Validator:
    """Validate the UNet on fixed-seed samples; judge the stop rules; keep the candidate states on disk."""

    def __init__(self, cfg: EngineConfig, model: Any, run: run_setup.RunData, device: torch.device, out: Path):
        v = cfg.validation
        self.cfg, self.model, self.device, self.out = cfg, model, device, Path(out)
        ctx = validation.MetricContext(run.retain_pixels, run.forget_pixels, {}, model.kind, device, model, model.unet)
        self.metrics = validation.build_metrics(v.metrics, ctx, v.metric_options)
        self.rules = StopRules(v.forget_metric, v.forget_target, v.quality_metric, v.quality_tolerance,
                               v.stop_on_target, v.stop_on_guard, v.min_steps, v.forget_target_ratio,
                               v.target_patience)
        # SD: every distinct forget prompt (or validation.prompt), each item scored on its own prompt's samples
        frozen = run_setup.autocast_dtype(cfg.train.mixed_precision) or torch.float32
        self.groups = validation.prompt_groups(model, run.forget_prompts, run.n_forget, v.prompt, device, frozen)
        self.scores_by_step: Dict[int, Dict[str, float]] = {}
        self.last_good_step: Optional[int] = None
        self.kept: Dict[str, Dict[str, Any]] = {}  # name -> {"step", "sha256"} of the kept-state files

    def __call__(self, unet: torch.nn.Module, step: int) -> Dict[str, Any]:
        v = self.cfg.validation
        per_prompt = validation.sample_groups(
            self.model, unet, self.groups, num_samples=v.num_samples, steps=v.sampler_steps, seed=v.seed,
            batch_size=v.batch_size, device=self.device,
            autocast_dtype=run_setup.autocast_dtype(self.cfg.train.mixed_precision), guidance_scale=v.guidance_scale)
        samples = torch.cat(per_prompt)
        scores = validation.score_groups(self.metrics, per_prompt, self.groups.item_group, unet)
        self.scores_by_step[step] = scores
        if v.grids:
            (self.out / "samples").mkdir(exist_ok=True)
            validation.save_grid(samples, self.out / "samples" / f"step-{step:06d}.png")
        verdict = self.rules.update(step, scores)
        if verdict["is_best"]:
            self._save_state(unet, step, "best")
        elif self.rules.best_step is None and not verdict["guard_tripped"]:
            # until the target is met, keep the last state within the quality guard (step 0: the base model): if
            # the guard trips first, that state (not the tripped one) is the final model
            self._save_state(unet, step, "last_good")
            self.last_good_step = step
        return {"scores": scores, **verdict}

    def score(self, samples: torch.Tensor, unet: torch.nn.Module) -> Dict[str, float]:
        """Every metric's reading on one set of samples (:func:`.validation.score_groups`: ``"name[k]"`` per forget
        item for metrics with ``per_item``; each item must meet the target)."""
        return validation.score_groups(self.metrics, [samples], self.groups.item_group, unet)

    def _save_state(self, unet: torch.nn.Module, step: int, name: str) -> None:
        from safetensors.torch import save_file

        tmp, path = self.out / f".{name}.safetensors.tmp", self.out / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in unet_state(unet).items()}, str(tmp))
        digest = sha256_file(tmp)
        os.replace(tmp, path)
        self.kept[name] = {"step": step, "sha256": digest}
        (self.out / f"{name}.json").write_text(json.dumps({"step": step, "sha256": digest,
                                                           "scores": self.scores_by_step[step]}))

    def _load_kept(self, name: str) -> Dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path, record = self.out / f"{name}.safetensors", self.kept.get(name)
        if record is None or not path.is_file() or sha256_file(path) != record["sha256"]:
            raise CheckpointError(f"{str(path)!r} is missing or is not the state this run kept at step "
                                  f"{None if record is None else record['step']} (sha256 mismatch): it was changed "
                                  "outside this run; resume from an earlier checkpoint or rerun")
        return load_file(str(path))

    def final_state(self, stop_reason: str) -> Tuple[Optional[Dict[str, torch.Tensor]], str, Optional[int]]:
        """``(weights or None for the end state, "best@N" | "last_good@N" | "end", kept step or None)``."""
        best = self.rules.best_step
        if best is not None:
            return self._load_kept("best"), f"best@{best}", best
        if stop_reason == "quality_guard" and self.last_good_step is not None:
            # the target was never met and quality fell too far: keep the last state within the guard
            return self._load_kept("last_good"), f"last_good@{self.last_good_step}", self.last_good_step
        return None, "end", None

    def state_dict(self) -> Dict[str, Any]:
        return {"rules": self.rules.state_dict(), "last_good_step": self.last_good_step,
                "scores": {str(k): v for k, v in self.scores_by_step.items()},
                "kept": {k: dict(v) for k, v in self.kept.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.rules.load_state_dict(state["rules"])
        self.scores_by_step = {int(k): dict(v) for k, v in state["scores"].items()}
        self.last_good_step = state.get("last_good_step")
        self.kept = {k: dict(v) for k, v in state.get("kept", {}).items()}
