"""Engine benchmark: optimizer steps of the lean SISS engine against the research code's loop, side by side.

    python benchmarks/bench_engine.py [--device cpu|cuda] [--threads N] [--quick] [--tiny] [--sd-v1]
                                      [--accumulation 1,2] [--schedule sd|linear] [--out results/x.json]

One timed call = one optimizer step (``accumulation`` micro-batches of ``B`` samples, then ``optimizer.step()``).
The shape ``B x 4 x H x W`` is the micro-batch of latents; SISS draws ``B`` retain and ``B`` forget latents per
micro-batch. Providers (one row each):

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

Models. CPU (default): the engine's ``tiny-sd`` builder (``siss_fast.engine.models.build_tiny``; UNet2DConditionModel
with channels (32, 64), cross-attention at the 64x64 level, tiny CLIP text encoder, tiny VAE) at image size ``2 H``, so
the latents have Stable Diffusion's geometry ``4 x 64 x 64``; the VAE's ``scaling_factor`` is calibrated so that the
latents have unit variance (what 0.18215 does for SD's VAE) and the noise schedule is Stable Diffusion v1's
(``scaled_linear``, 0.00085-0.012), so the importance weights, hence the partitioned split, behave as in the real model.
The tiny VAE and text encoder are much cheaper relative to the UNet than SD's, which favours the research loop (it
runs them every micro-batch): the CPU ratios are conservative. ``--sd-v1``: a UNet, VAE and CLIP text encoder of
Stable Diffusion v1's configuration (written inline below, random weights; ~860M UNet parameters), images 512x512,
latents 64x64.

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

import copy
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
import torch  # noqa: E402

OP = "engine_step"
PROVIDERS = ("research-loop", "lean-exact", "lean-exact-2bwd", "lean-lagged", "lean-lagged-1bwd", "naive-finetune",
             "lean-exact-bf16-ckpt")
CUDA_ONLY = ("lean-exact-bf16-ckpt",)
MODES = ("step",)
LAMBD = 0.5
RESEARCH_SCALING_NORM = 1.0  # c of the research loop (its value does not change the work done)
RETAIN_IMAGES, FORGET_IMAGES = 8, 2
RETAIN_PROMPT, FORGET_PROMPT = "a photo of a dog on the grass", "a photo of the memorized image"
GB24_MB = 24 * 1024.0

# (min ratio, provider, baseline): ratio = baseline median / provider median. "<= k x naive" is ">= 1/k".
TARGET_SPECS = (
    ("lean-exact", "research-loop", 1.5, "exact (partitioned) >= 1.5x research loop"),
    ("lean-lagged", "research-loop", 1.8, "lagged >= 1.8x research loop"),
    ("lean-exact", "naive-finetune", 1 / 1.2, "exact SISS step <= 1.2x a naive fine-tuning step"),
    ("lean-lagged", "naive-finetune", 1 / 1.1, "lagged SISS step <= 1.1x a naive fine-tuning step"),
)


# ------------------------------------------------------------------------------------------------------ models


def sd_v1_scheduler():
    """Stable Diffusion v1's training noise schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_sd_v1(folder: Path, seed: int = 0):
    """Random-weight UNet, VAE and text encoder with Stable Diffusion v1's configurations, as a loadable folder."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from siss_fast.engine import models as engine_models

    torch.manual_seed(seed)
    engine_models.write_tiny_tokenizer(folder / "tokenizer", max_length=77)  # the builder's byte-level BPE, 77 tokens
    vocab = len(json.loads((folder / "tokenizer" / "vocab.json").read_text()))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                                        pad_token_id=vocab - 1))
    text.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
    del text
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
    vae.save_pretrained(str(folder / "vae"), safe_serialization=True)
    del vae
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, act_fn="silu", center_input_sample=False,
        downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, mid_block_scale_factor=1)
    unet.save_pretrained(str(folder / "unet"), safe_serialization=True)
    del unet
    sd_v1_scheduler().save_pretrained(str(folder / "scheduler"))
    (folder / "model_index.json").write_text(json.dumps(engine_models._sd_index(), indent=2))
    return folder


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
        raise SystemExit(f"shape: expected B x 4 x h x h latents, got {H.shape_name(shape)}")
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
