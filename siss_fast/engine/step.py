"""One optimizer step of the engine, as a public object: :class:`UnlearnStep`.

``loop.run`` drives it (and adds metrics, validation, checkpoints); benchmarks and users who write their own loop
call it directly::

    from siss_fast.engine.step import UnlearnStep

    step = UnlearnStep(cfg, model, run_data, device)   # builds objective, optimizer, LR schedule, combiner, streams
    result = step()                                     # one optimizer step; StepResult (info, stats, counts, lr)

One call, per process::

    for each of accumulation_steps micro-batches (stream j = rank * accumulation_steps + m):
        x0, a0, conditioning <- the stream's generators (with replacement)
        terms <- Objective(method)(unet, x0, a0, ...)                  # SPEC §5; autocast only around the UNet
        combiner.backward(retain / acc, forget / acc)                  # SPEC §6 (siss: partitioned callables)
    info <- combiner.finish_step()                                     # combine, all-reduce (DDP), clip
    optimizer.step() unless info.skipped (non-finite G: weights untouched, counted)
    lr_schedule.step()

With ``gradient.partitioned: true`` and a method whose record allows it (``MethodSpec.partitioned``: `siss`) the
forward goes through
:class:`~siss_fast.engine.partition.PartitionedForward` (the exact gradient at about one backward pass).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from siss_fast.methods import get_method

from . import data as engine_data
from . import lora
from . import models
from . import setup as run_setup
from .config import EngineConfig, apply_kind_defaults
from .ema import WeightEMA
from .partition import PartitionedForward

__all__ = ["UnlearnStep", "StepResult"]


@dataclass
class StepResult:
    """What one optimizer step did: the combiner's :class:`~siss_fast.gradients.StepInfo`, the objective's
    statistics averaged over the micro-batches (``loss_retain``, ``loss_forget``, weight statistics), the
    partition counts summed over micro-batches, the learning rate the step used and its wall time."""

    info: Any
    stats: Dict[str, float]
    counts: Dict[str, int] = field(default_factory=lambda: {"retain": 0, "forget": 0, "mixed": 0})
    lr: float = 0.0
    seconds: float = 0.0


def _scaled(term: Optional[Any], acc: int) -> Optional[Any]:
    if term is None:
        return None
    return term if acc == 1 else term / acc


class UnlearnStep:
    """The engine's optimizer step for ``cfg`` on ``unet`` (default ``model.unet``, moved to ``device``, put in
    train mode with every parameter trainable; with ``train.lora_rank`` > 0 only the LoRA adapters injected into it,
    :mod:`.lora`).

    ``train.batch_size`` / ``train.lr`` left null get the model kind's defaults (written into ``cfg``). Builds what
    ``cfg`` asks for: gradient checkpointing, ``torch.compile``, autocast (``train.mixed_precision``),
    the SPEC §5 objective, AdamW (fused on CUDA), the LR schedule, the SPEC §6 combiner (DDP-aware through
    ``dist``) and one seeded :class:`~siss_fast.engine.data.SampleStream` per micro-batch of this rank.
    Attributes ``unet``, ``optimizer``, ``lr_schedule``, ``combiner``, ``streams`` and ``ema`` (the weights' moving
    average, :class:`~.ema.WeightEMA`, or None) are what checkpoints save; ``eval_unet`` is what a run validates.
    """

    def __init__(self, cfg: EngineConfig, model: Any, run_data: Any, device: torch.device, *,
                 dist: Optional[run_setup.Dist] = None, unet: Optional[torch.nn.Module] = None):
        prompts = len(set(getattr(run_data, "forget_prompts", None) or [""]))  # SD: a check samples each prompt
        apply_kind_defaults(cfg, model.kind, prompts)  # train.batch_size / train.lr / validation.every left null
        self.cfg, self.model, self.run_data, self.device = cfg, model, run_data, device
        self.dist = dist or run_setup.Dist()
        self.unet = unet if unet is not None else model.unet
        self.amp = run_setup.autocast_dtype(cfg.train.mixed_precision)
        if cfg.train.lora_rank:  # adapters only (engine/lora.py): the base weights are frozen
            lora.attach(self.unet, cfg.train)
            if self.amp is not None and models.unet_safetensors(model.path):  # final/ merges into the file's fp32
                lora.store_frozen_in(self.unet, self.amp)
        else:
            self.unet.requires_grad_(True)
        self.unet = self.unet.to(device)
        self.unet.train()
        if cfg.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet_fn = torch.compile(self.unet) if cfg.train.compile else self.unet
        self.objective = run_setup.make_objective(cfg, model, run_data)
        self.params: List[torch.Tensor] = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = run_setup.make_optimizer(cfg, self.params, device)
        self.lr_schedule = run_setup.make_lr_schedule(cfg, self.optimizer)
        self.combiner = run_setup.make_combiner(cfg, self.params, self.dist)
        acc = cfg.train.accumulation_steps
        self.streams = [engine_data.SampleStream(cfg.train.seed, self.dist.rank * acc + m, device) for m in range(acc)]
        self.partitioned = cfg.gradient.partitioned and get_method(cfg.method.name).partitioned
        self.ema = WeightEMA(self.unet, float(cfg.train.ema_decay)) if cfg.train.ema_decay else None

    @property
    def eval_unet(self) -> torch.nn.Module:
        """What the run validates and keeps: the weights' moving average (``train.ema_decay``), else the UNet."""
        return self.unet if self.ema is None else self.ema.module

    def unet_call(self, noisy: torch.Tensor, timesteps: torch.Tensor, **cond: Any) -> Any:
        """The UNet under the run's autocast (fp32 master weights; bf16/fp16 compute when asked)."""
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            return self.unet_fn(noisy, timesteps, **cond)

    def __call__(self) -> StepResult:
        tic = time.perf_counter()
        acc, batch = self.cfg.train.accumulation_steps, self.cfg.train.batch_size
        objective, combiner = self.objective, self.combiner
        stats: Dict[str, float] = {}
        counts = {"retain": 0, "forget": 0, "mixed": 0}
        for stream in self.streams:
            x0, a0, cond_x, cond_a = self.run_data.draw(stream, batch, self.device)
            wrapper = PartitionedForward(self.unet_call, objective, x0, a0) if self.partitioned else None
            model = wrapper if wrapper is not None else self.unet_call
            terms = objective(model, x0, a0, cond_x=cond_x, cond_a=cond_a, generator=stream.noise_gen)
            retain, forget = _scaled(terms.retain, acc), _scaled(terms.forget, acc)
            if wrapper is not None:
                retain, forget = wrapper.terms(retain, forget)
                for key, value in wrapper.counts.items():
                    counts[key] += value
            combiner.backward(retain, forget)
            for key, value in terms.float_stats().items():
                stats[key] = stats.get(key, 0.0) + value / acc
        info = combiner.finish_step()
        if not info.skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.unet)
        lr = self.optimizer.param_groups[0]["lr"]
        with warnings.catch_warnings():  # a skipped step still advances the schedule (it counts steps, not updates)
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.lr_schedule.step()
        return StepResult(info, stats, counts, lr, time.perf_counter() - tic)
