"""The engine benchmark's providers: the models, the data caches and one optimizer step of each way of doing it.

:func:`prepare` builds a case (model, pixel data, the engine's ``RunData`` caches); :class:`LeanStep` is the
engine's own step (:class:`siss_fast.engine.step.UnlearnStep`) and :class:`ResearchStep` the re-implementation of
the research code's SISS step (``bench_engine.py``'s docstring describes both). Used by ``bench_engine.py``,
``test_bench_engine.py`` and ``sd_v1_unlearn.py`` (the research loop at SD-v1 size).

Models. CPU (default): the engine's ``tiny-sd`` builder (``siss_fast.engine.models.build_tiny``; UNet2DConditionModel
with channels (32, 64), cross-attention at the 64x64 level, tiny CLIP text encoder, tiny VAE) at image size ``2 H``, so
the latents have Stable Diffusion's geometry ``4 x 64 x 64``; the VAE's ``scaling_factor`` is calibrated so that the
latents have unit variance (what 0.18215 does for SD's VAE) and the noise schedule is Stable Diffusion v1's
(``scaled_linear``, 0.00085-0.012), so the importance weights, hence the partitioned split, behave as in the real model.
The tiny VAE and text encoder are much cheaper relative to the UNet than SD's, which favours the research loop (it
runs them every micro-batch): the CPU ratios are conservative. ``--sd-v1``: a UNet, VAE and CLIP text encoder of
Stable Diffusion v1's configuration (:mod:`sd_v1_model`, random weights; ~860M UNet parameters), images 512x512,
latents 64x64.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from sd_v1_model import build_sd_v1, sd_v1_scheduler

__all__ = ["Bench", "prepare", "LeanStep", "ResearchStep", "tiny_unet", "load_bench_model"]

LAMBD = 0.5
RESEARCH_SCALING_NORM = 1.0  # c of the research loop (its value does not change the work done)
RETAIN_IMAGES, FORGET_IMAGES = 8, 2
RETAIN_PROMPT, FORGET_PROMPT = "a photo of a dog on the grass", "a photo of the memorized image"


# ------------------------------------------------------------------------------------------------------ models


def tiny_unet(latent_hw: int, cross_attention_dim: int, seed: int = 0):
    """The builder's tiny UNet with its cross-attention block moved one level down (32x32 tokens for 64x64
    latents instead of 64x64): the 4096-token self-attention made a CPU step take ~10 s at one thread."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=latent_hw, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


@dataclasses.dataclass
class Bench:
    """Everything the providers of one case share: the loaded model, the pixel data, the engine's data caches."""

    model: Any  # siss_fast.engine.models.LoadedModel
    run_data: Any  # siss_fast.engine.setup.RunData
    device: torch.device
    batch: int
    acc: int
    latent: Tuple[int, int, int]
    unet_params: int


_MODEL_CACHE: Dict[Tuple, Any] = {}


def load_bench_model(latent_hw: int, sd_v1: bool, schedule: str, work: Path):
    """Build (once per process) and load the model through the engine's offline loader."""
    from siss_fast.engine import models as engine_models

    key = (latent_hw, sd_v1, schedule)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    folder = work / (f"sd-v1-{latent_hw}" if sd_v1 else f"tiny-sd-{latent_hw}")
    if not (folder / "model_index.json").is_file():
        if sd_v1:
            build_sd_v1(folder)
        else:
            engine_models.build_tiny("tiny-sd", folder, channels=3, image_size=2 * latent_hw, seed=0)
    model = engine_models.load_model(str(folder))
    if not sd_v1:
        model.unet = tiny_unet(latent_hw, model.unet.config.cross_attention_dim)
    if schedule == "sd":
        model.scheduler = sd_v1_scheduler()
    _MODEL_CACHE[key] = model
    return model


def prepare(shape: Tuple[int, ...], acc: int, device: torch.device, *, sd_v1: bool, schedule: str,
            work: Path) -> Bench:
    """Model, images and the engine's caches (``RunData``) for micro-batches of ``shape = (B, 4, h, w)``."""
    from siss_fast.engine import data as engine_data
    from siss_fast.engine.setup import RunData

    batch, channels, h, w = shape
    if channels != 4 or h != w:
        raise SystemExit(f"shape: expected B x 4 x h x h latents, got {'x'.join(map(str, shape))}")
    model = load_bench_model(h, sd_v1, schedule, work)
    scale = model.vae_scale
    gen = torch.Generator().manual_seed(1234)
    retain_img = torch.rand((RETAIN_IMAGES, 3, h * scale, w * scale), generator=gen) * 2 - 1
    forget_img = torch.rand((FORGET_IMAGES, 3, h * scale, w * scale), generator=gen) * 2 - 1
    for part in (model.vae, model.text_encoder):
        part.requires_grad_(False)
        part.eval()
        part.to(device)
    # Unit-variance latents, as SD's scaling_factor 0.18215 gives for its own VAE: calibrate on these images.
    model.vae.register_to_config(scaling_factor=1.0)
    probe = engine_data.LatentCache(model.vae, torch.cat([retain_img, forget_img]), device, torch.float32)
    std = float(((probe.mean + probe.std * torch.randn(probe.mean.shape, generator=gen).to(device))).std())
    model.vae.register_to_config(scaling_factor=1.0 / std)
    run = RunData([Path(f"r{i}.png") for i in range(RETAIN_IMAGES)], [Path(f"f{i}.png") for i in range(FORGET_IMAGES)],
                  (retain_img + 1) / 2, (forget_img + 1) / 2)
    run.retain_latents = engine_data.LatentCache(model.vae, retain_img, device, torch.float32)
    run.forget_latents = engine_data.LatentCache(model.vae, forget_img, device, torch.float32)
    prompts = [RETAIN_PROMPT] * RETAIN_IMAGES + [FORGET_PROMPT] * FORGET_IMAGES
    emb, idx = engine_data.encode_prompts(model.tokenizer, model.text_encoder, prompts, device, torch.float32)
    run.embeddings = emb
    run.retain_prompt_idx = torch.tensor(idx[:RETAIN_IMAGES], dtype=torch.long)
    run.forget_prompt_idx = torch.tensor(idx[RETAIN_IMAGES:], dtype=torch.long)
    run.forget_prompts = [FORGET_PROMPT] * FORGET_IMAGES
    n_params = sum(p.numel() for p in model.unet.parameters())
    return Bench(model, run, device, batch, acc, (channels, h, w), n_params)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(state.values()) for state in optimizer.state.values())


# -------------------------------------------------------------------------------------------- the engine's step


class LeanStep:
    """One optimizer step of the lean engine: :class:`siss_fast.engine.step.UnlearnStep`, the object
    ``loop.run`` calls every step (less the metrics file, progress bar, validation and checkpoints, none of which
    runs on a plain step), on a private copy of the bench model's UNet."""

    def __init__(self, bench: Bench, *, method: str = "siss", mode: str = "exact", partitioned: bool = True,
                 mixed_precision: str = "no", checkpointing: bool = False, seed: int = 0):
        from siss_fast.engine.config import EngineConfig
        from siss_fast.engine.step import UnlearnStep

        cfg = EngineConfig()
        cfg.method.name = method
        cfg.gradient.mode = mode
        cfg.gradient.partitioned = partitioned
        cfg.train.batch_size = bench.batch
        cfg.train.accumulation_steps = bench.acc
        cfg.train.mixed_precision = mixed_precision
        cfg.train.gradient_checkpointing = checkpointing
        cfg.train.steps = 10**6
        cfg.train.seed = seed
        self.cfg, self.bench = cfg, bench
        self.step = UnlearnStep(cfg, bench.model, bench.run_data, bench.device,
                                unet=copy.deepcopy(bench.model.unet))
        self.unet, self.optimizer = self.step.unet, self.step.optimizer
        self.counts = {"retain": 0, "forget": 0, "mixed": 0}
        self.steps = 0
        self.extra_buffers: List[int] = []
        self.paths: Dict[str, int] = {}

    def __call__(self) -> None:
        result = self.step()
        for key, value in result.counts.items():
            self.counts[key] += value
        self.steps += 1
        self.extra_buffers.append(result.info.extra_buffers)
        self.paths[result.info.path] = self.paths.get(result.info.path, 0) + 1

    def resident_bytes(self) -> int:
        """Tensors this provider keeps between steps: UNet weights, optimizer state, frozen VAE + text encoder
        (the engine keeps them for validation), latent caches and embeddings."""
        rd, m = self.bench.run_data, self.bench.model
        caches = [rd.retain_latents.mean, rd.retain_latents.std, rd.forget_latents.mean, rd.forget_latents.std,
                  rd.embeddings]
        return (_tensor_bytes(self.unet.parameters()) + _optimizer_bytes(self.optimizer)
                + _tensor_bytes(m.vae.parameters()) + _tensor_bytes(m.text_encoder.parameters())
                + _tensor_bytes(caches))

    def grad_buffers(self) -> str:
        steady = self.extra_buffers[1:] or self.extra_buffers  # step 1 of scaling_norm=auto measures c (1 buffer)
        first = self.extra_buffers[0] if self.extra_buffers else 0
        return f"{max(steady, default=0)} extra grad buffers (first step, scaling_norm=auto: {first})"


# ------------------------------------------------------------------------------------------- the research loop


class ResearchStep:
    """One optimizer step of the research code's SISS loop (fp32), re-implemented from its description (module
    docstring): VAE + text encoder every micro-batch, two backward passes, full gradient clones."""

    def __init__(self, bench: Bench, seed: int = 0):
        from siss_fast.engine import setup as run_setup
        from siss_fast.engine.config import EngineConfig, apply_kind_defaults

        self.bench = bench
        device = bench.device
        m = bench.model
        self.unet = copy.deepcopy(m.unet).to(device)
        self.unet.train()
        self.unet.requires_grad_(True)
        self.vae, self.text_encoder, self.tokenizer, self.scheduler = m.vae, m.text_encoder, m.tokenizer, m.scheduler
        cfg = apply_kind_defaults(EngineConfig(), m.kind)  # the engine's AdamW settings and constant LR schedule
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                           eps=cfg.train.eps, weight_decay=cfg.train.weight_decay)
        cfg.train.steps = 10**6
        self.lr_schedule = run_setup.make_lr_schedule(cfg, self.optimizer)
        acp = self.scheduler.alphas_cumprod.to(device)
        self.gamma_table, self.sigma_table = acp.sqrt(), (1 - acp).sqrt()
        self.gen = torch.Generator().manual_seed(seed)
        self.named = [(n, p) for n, p in self.unet.named_parameters()]
        self.peak_copies = 0
        self.counts = {"retain": 0, "forget": 0, "mixed": 0}  # not partitioned: every sample gets both backwards

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(images).latent_dist
        return dist.sample() * self.vae.config.scaling_factor

    def __call__(self) -> None:
        bench, device = self.bench, self.bench.device
        batch, acc = bench.batch, bench.acc
        rd = bench.run_data
        accum_a: Dict[str, torch.Tensor] = {}
        snapshot_x: Dict[str, torch.Tensor] = {}
        for micro in range(acc):
            ri = torch.randint(0, rd.n_retain, (batch,), generator=self.gen)
            fi = torch.randint(0, rd.n_forget, (batch,), generator=self.gen)
            images_x = (rd.retain_pixels[ri] * 2 - 1).to(device)
            images_a = (rd.forget_pixels[fi] * 2 - 1).to(device)
            lat_x = self._latents(images_x)
            lat_a = self._latents(images_a)
            noise = torch.randn_like(lat_x)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), device=device)
            noisy_x = self.scheduler.add_noise(lat_x, noise, t)
            noisy_a = self.scheduler.add_noise(lat_a, noise, t)
            ids = self.tokenizer([RETAIN_PROMPT] * batch, max_length=self.tokenizer.model_max_length,
                                 padding="max_length", truncation=True, return_tensors="pt").input_ids.to(device)
            hidden = self.text_encoder(ids, return_dict=False)[0]

            # the mixture sample and both importance-weighted losses, as the research loss computes them
            g = self.gamma_table[t].view(-1, 1, 1, 1)
            s = self.sigma_table[t].view(-1, 1, 1, 1)
            keep_x = torch.rand(batch) > LAMBD
            mixed = torch.empty_like(noisy_x)
            mixed[keep_x] = noisy_x[keep_x]
            mixed[~keep_x] = noisy_a[~keep_x]
            pred = self.unet(mixed, t, encoder_hidden_states=hidden, return_dict=False)[0]
            eps_x = (mixed - g * lat_x) / s
            eps_a = (mixed - g * lat_a) / s
            loss_x = (pred - eps_x) ** 2
            loss_a = (pred - eps_a) ** 2
            dims = list(range(1, mixed.dim()))
            d_x = ((mixed - g * lat_x) ** 2).sum(dim=dims) / (2 * s.flatten() ** 2)
            d_a = ((mixed - g * lat_a) ** 2).sum(dim=dims) / (2 * s.flatten() ** 2)
            w_x = 1 / ((1 - LAMBD) + LAMBD * torch.exp(d_x - d_a))
            w_a = 1 / ((1 - LAMBD) * torch.exp(d_a - d_x) + LAMBD)
            weighted_x = w_x.view(-1, 1, 1, 1) * loss_x
            weighted_a = w_a.view(-1, 1, 1, 1) * loss_a
            for v in (loss_x, loss_a):  # its per-micro-batch statistics (host syncs)
                per = v.mean(dim=dims)
                [x.item() for x in (v.mean(), per.max(), per.min(), per.std())]
            for v in (w_x, w_a):
                [x.item() for x in (v.mean(), v.max(), v.min(), v.std())]

            (weighted_x.sum() / batch).backward(retain_graph=True)
            snapshot_x = {n: p.grad.clone() for n, p in self.named}  # copy 1
            (weighted_a.sum() / batch).backward()
            for n, p in self.named:
                part = p.grad.clone() - snapshot_x[n]
                if n in accum_a:
                    accum_a[n] += part
                else:
                    accum_a[n] = part  # copy 2
            del pred, mixed, weighted_x, weighted_a, loss_x, loss_a
        accum_x = {n: p.grad.clone() - accum_a[n] for n, p in self.named}  # copy 3
        self.peak_copies = max(self.peak_copies, sum(1 for d in (snapshot_x, accum_a, accum_x) if d))
        norm_x = torch.sqrt(sum(torch.norm(v, p=2) ** 2 for v in accum_x.values()))
        norm_a = torch.sqrt(sum(torch.norm(v, p=2) ** 2 for v in accum_a.values()))
        scale = RESEARCH_SCALING_NORM / norm_a
        float(norm_x), float(norm_a)  # logged there
        for n, p in self.named:
            p.grad = accum_x[n] - scale * accum_a[n]
        del accum_x, accum_a, snapshot_x
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad()

    def resident_bytes(self) -> int:
        return (_tensor_bytes(self.unet.parameters()) + _optimizer_bytes(self.optimizer)
                + _tensor_bytes(self.vae.parameters()) + _tensor_bytes(self.text_encoder.parameters()))

    def grad_buffers(self) -> str:
        return f"{self.peak_copies} extra grad buffers (clones: G_x snapshot, G_a, G_x)"
