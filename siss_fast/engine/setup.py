"""Building a run's pieces from its config: device, processes, model, data caches, objective, optimizer, combiner.

Everything here happens once per run; :mod:`siss_fast.engine.loop` drives the steps.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from . import data as engine_data
from . import models
from .config import EngineConfig

__all__ = ["Dist", "init_distributed", "pick_device", "autocast_dtype", "RunData", "prepare_model", "prepare_data",
           "make_objective", "make_optimizer", "make_lr_schedule", "make_combiner"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device_pref: str) -> Dist:
    """Join the process group launched by ``torchrun`` (env ``WORLD_SIZE`` > 1) or already initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    use_cuda = device_pref != "cpu" and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(pref: str, dist: Dist) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda" and dist.world > 1:
        pref = f"cuda:{dist.local_rank}"
    device = torch.device(pref)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device: {pref!r} asked for, but torch sees no CUDA device")
        torch.cuda.set_device(device)
    return device


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def prepare_model(cfg: EngineConfig, dist: Dist, out: Path) -> models.LoadedModel:
    """Load the configured model; a ``build`` recipe is written to ``OUTPUT_DIR/base_model`` first and loaded from
    there through the same offline code as any user model."""
    if cfg.model.build is None:
        return models.load_model(cfg.model.path, allow_pickle=cfg.model.allow_pickle)
    folder = out / "base_model"
    if dist.main and not (folder / "model_index.json").is_file():
        tmp = out / ".tmp-base_model"
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        models.build_tiny(cfg.model.build, tmp, channels=cfg.model.channels, image_size=cfg.model.image_size,
                     seed=cfg.model.seed)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    dist.barrier()
    return models.load_model(str(folder))


@dataclass
class RunData:
    """The training sets on the device: pixels (DDPM) or latent caches + embeddings (SD)."""

    retain_files: List[Path]
    forget_files: List[Path]
    retain_pixels: Tensor  # (N, C, H, W) in [0, 1], CPU (for metrics)
    forget_pixels: Tensor
    retain_x: Optional[Tensor] = None  # DDPM: (N, C, H, W) in [-1, 1] on the device
    forget_x: Optional[Tensor] = None
    retain_latents: Optional[engine_data.LatentCache] = None  # SD
    forget_latents: Optional[engine_data.LatentCache] = None
    embeddings: Optional[Tensor] = None  # (P, L, D): one per distinct prompt
    retain_prompt_idx: Optional[Tensor] = None  # (N,) index into embeddings
    forget_prompt_idx: Optional[Tensor] = None
    forget_prompts: Optional[List[str]] = None

    @property
    def n_retain(self) -> int:
        return len(self.retain_files)

    @property
    def n_forget(self) -> int:
        return len(self.forget_files)

    def draw(self, stream: engine_data.SampleStream, batch: int, device: torch.device):
        """One micro-batch ``(x0, a0, cond_x, cond_a)`` with replacement from ``stream``'s generators."""
        ri = stream.indices(self.n_retain, batch)
        fi = stream.indices(self.n_forget, batch)
        if self.retain_latents is None:
            return self.retain_x[ri.to(device)], self.forget_x[fi.to(device)], None, None
        x0 = self.retain_latents.draw(ri.to(device), stream.data_gen)
        a0 = self.forget_latents.draw(fi.to(device), stream.data_gen)
        cond_x = {"encoder_hidden_states": self.embeddings[self.retain_prompt_idx[ri].to(device)]}
        cond_a = {"encoder_hidden_states": self.embeddings[self.forget_prompt_idx[fi].to(device)]}
        return x0, a0, cond_x, cond_a


def prepare_data(cfg: EngineConfig, model: models.LoadedModel, device: torch.device) -> RunData:
    retain = engine_data.scan_folder(cfg.data.retain_dir, "data.retain_dir")
    forget = engine_data.scan_folder(cfg.data.forget_dir, "data.forget_dir")
    channels = model.image_channels
    retain_img = engine_data.load_images(retain.files, channels)
    forget_img = engine_data.load_images(forget.files, channels)
    run = RunData(retain.files, forget.files, (retain_img + 1) / 2, (forget_img + 1) / 2)
    if model.kind == "ddpm":
        run.retain_x, run.forget_x = retain_img.to(device), forget_img.to(device)
        return run
    frozen = autocast_dtype(cfg.train.mixed_precision) or torch.float32
    for part in (model.vae, model.text_encoder):
        part.requires_grad_(False)
        part.eval()
        part.to(device) if frozen == torch.float32 else part.to(device=device, dtype=frozen)  # low precision
    run.retain_latents = engine_data.LatentCache(model.vae, retain_img, device, frozen)
    run.forget_latents = engine_data.LatentCache(model.vae, forget_img, device, frozen)
    retain_prompts, forget_prompts = engine_data.resolve_prompts(cfg.data, retain.files, forget.files)
    emb, idx = engine_data.encode_prompts(model.tokenizer, model.text_encoder, retain_prompts + forget_prompts, device,
                                          frozen)
    run.embeddings = emb
    run.retain_prompt_idx = torch.tensor(idx[:len(retain_prompts)], dtype=torch.long)
    run.forget_prompt_idx = torch.tensor(idx[len(retain_prompts):], dtype=torch.long)
    run.forget_prompts = forget_prompts
    return run


def make_objective(cfg: EngineConfig, model: models.LoadedModel, run: RunData):
    from siss_fast.objectives import Objective

    m = cfg.method
    n = cfg.data.train_size or (run.n_retain + run.n_forget)
    return Objective(m.name, model.scheduler.alphas_cumprod, lambd=m.lambd, weight_clip=m.weight_clip,
                     retain_source=m.retain_source, n=n, k=run.n_forget,
                     t_range=None if m.t_range is None else tuple(m.t_range))


def make_optimizer(cfg: EngineConfig, params: List[Tensor], device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    kwargs: Dict[str, Any] = dict(lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(params, **kwargs)


def make_lr_schedule(cfg: EngineConfig, optimizer: torch.optim.Optimizer):
    t = cfg.train
    warm, total = t.warmup_steps, t.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if t.lr_schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if t.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_combiner(cfg: EngineConfig, params: List[Tensor], dist: Dist):
    from siss_fast.gradients import GradientCombiner
    from siss_fast.methods import get_method

    g = cfg.gradient
    rule = g.rule or get_method(cfg.method.name).rule or "rescale"
    return GradientCombiner(params, rule, scaling_norm=g.scaling_norm, max_forget_scale=g.max_forget_scale,
                            max_grad_norm=g.max_grad_norm, mode=g.mode, lag_every=g.lag_every, eta=g.eta,
                            accumulation_steps=cfg.train.accumulation_steps, auto_steps=g.auto_steps,
                            average_grads=dist.world > 1)
