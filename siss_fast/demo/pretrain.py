"""Pretrain the demo's base model and its digits classifier (seeded, CPU, about 10-15 minutes on 2 cores).

    python -m siss_fast.demo.pretrain --out DIR --seed 0        (or: siss-fast demo --pretrain --out DIR)

writes ``DIR/digits_ddpm/`` (a diffusers ``DDPMPipeline`` folder: ``unet/`` + ``scheduler/``, safetensors) and
``DIR/digits_ddpm/classifier.safetensors``, plus ``DIR/digits_ddpm/pretrain.json`` (command, seed, config,
losses, wall time, content hashes). The shipped copy lives in ``siss_fast/assets/digits_ddpm/``.

Choices:

* UNet2DModel, 1 channel, 16x16, ``block_out_channels=(16, 32, 64)``, one ResNet layer per block, no attention
  (~0.4 M parameters, 1.6 MB): large enough for 16x16 digits, small enough that sampling 1,000 images for a
  metric takes seconds, not minutes, on a CPU.
* DDPMScheduler with the standard T = 1000 linear betas (1e-4 .. 0.02), the paper's / diffusers' default, so the
  importance weights of SISS behave as in the paper (they depend on gamma_t, sigma_t). T does not set the cost of
  sampling: evaluation uses 25 DDIM steps (:mod:`siss_fast.metrics.sampling`).
* Training: the plain DDPM loss on X = digits + 75 planted T-shirts (4 %), uniform over X, batch 64, AdamW
  (lr 2e-3, 100 warm-up steps, cosine decay), EMA of the weights (decay 0.998) which is what is shipped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..hashing import sha256_file
from .data import DemoData, demo_data, to_unit

__all__ = ["UNET_CONFIG", "build_unet", "build_scheduler", "train_classifier", "train_ddpm", "pretrain", "main"]

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
)
NUM_TRAIN_TIMESTEPS = 1000


def build_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(**UNET_CONFIG)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, clip_sample=True)


def _log(msg: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {msg}", flush=True)


def train_classifier(data: DemoData, seed: int = 0, steps: int = 800, batch_size: int = 128,
                     start: Optional[float] = None) -> tuple:
    """Train :class:`DigitClassifier` on the 16x16 digits (80 % train / 20 % held out; +-1 pixel shifts and
    pixel noise as augmentation). Returns ``(classifier, held_out_accuracy)``."""
    from siss_fast.metrics.classifier import DigitClassifier

    start = time.perf_counter() if start is None else start
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    x, y = to_unit(data.retain), data.retain_labels
    perm = torch.randperm(x.shape[0], generator=gen)
    n_train = int(0.8 * x.shape[0])
    tr, te = perm[:n_train], perm[n_train:]
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    for step in range(steps):
        idx = tr[torch.randint(0, n_train, (batch_size,), generator=gen)]
        xb = x[idx]
        shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
        xb = torch.roll(xb, shifts=shift, dims=(2, 3))
        xb = (xb + 0.05 * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(clf(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 200 == 0:
            _log(f"classifier step {step + 1}/{steps} loss {loss.item():.4f}", start)
    clf.eval()
    with torch.no_grad():
        acc = (clf(x[te]).argmax(1) == y[te]).float().mean().item()
    _log(f"classifier held-out accuracy {acc:.4f}", start)
    return clf, acc


def train_ddpm(data: DemoData, seed: int = 0, steps: int = 3000, batch_size: int = 64, lr: float = 2e-3,
               ema_decay: float = 0.998, warmup: int = 100, start: Optional[float] = None,
               checkpoint_dir: Optional[Path] = None) -> tuple:
    """Plain DDPM training on ``data.train``. Returns ``(ema_unet, scheduler, loss_log)``."""
    start = time.perf_counter() if start is None else start
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    unet, scheduler = build_unet(), build_scheduler()
    ema = build_unet()
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    abar = scheduler.alphas_cumprod.to(torch.float64)
    train = data.train
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    losses, running = [], 0.0
    unet.train()
    for step in range(steps):
        idx = torch.randint(0, train.shape[0], (batch_size,), generator=gen)
        x0 = train[idx]
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch_size,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        g = abar[t].sqrt().float()[:, None, None, None]
        s = (1 - abar[t]).sqrt().float()[:, None, None, None]
        loss = F.mse_loss(unet(g * x0 + s * eps, t).sample, eps)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
        running += loss.item()
        if (step + 1) % 100 == 0:
            losses.append({"step": step + 1, "loss": running / 100})
            _log(f"ddpm step {step + 1}/{steps} loss {running / 100:.4f} lr {lr_at(step):.2e}", start)
            running = 0.0
        if checkpoint_dir is not None and (step + 1) % 500 == 0 and step + 1 < steps:
            _save_pipeline(ema, scheduler, Path(checkpoint_dir) / f"step{step + 1}")
    for b_e, b in zip(ema.buffers(), unet.buffers()):
        b_e.copy_(b)
    ema.eval()
    return ema, scheduler, losses


def _save_pipeline(unet, scheduler, path: Path) -> None:
    from diffusers import DDPMPipeline

    path.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path), safe_serialization=True)


file_sha256 = sha256_file  # the name the pretraining records and benchmarks/planted.py use


def pretrain(out: Path, seed: int = 0, steps: int = 3000, classifier_steps: int = 800,
             check_samples: int = 1000, without_forget: bool = False) -> Dict:
    """Train both models, save them under ``out/digits_ddpm/`` and return the pretrain record.

    ``without_forget``: train on the digits alone (no planted T-shirt), same seed and schedule, into
    ``out/digits_ddpm_retrained/``: exact unlearning, the gold standard an unlearned model is compared with
    (``siss-fast verify --control``)."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    out = Path(out)
    folder = out / ("digits_ddpm_retrained" if without_forget else "digits_ddpm")
    data = demo_data(forget_copies=0) if without_forget else demo_data()
    _log(f"data: {data.retain.shape[0]} digits + {data.forget.shape[0]} planted T-shirts "
         f"({100 * data.forget.shape[0] / data.train.shape[0]:.1f} %), torch threads {torch.get_num_threads()}", start)
    clf, acc = train_classifier(data, seed=seed, steps=classifier_steps, start=start)
    unet, scheduler, losses = train_ddpm(data, seed=seed, steps=steps, start=start,
                                         checkpoint_dir=out / "checkpoints")
    _save_pipeline(unet, scheduler, folder)
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(folder / "classifier.safetensors"))
    record = {
        "command": f"python -m siss_fast.demo.pretrain --out {out} --seed {seed} --steps {steps}"
                   + (" --without-forget" if without_forget else ""),
        "without_forget": without_forget,
        "seed": seed,
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET_CONFIG.items()},
        "num_train_timesteps": NUM_TRAIN_TIMESTEPS,
        "ddpm_steps": steps,
        "classifier_steps": classifier_steps,
        "classifier_heldout_accuracy": acc,
        "losses": losses,
        "train_wall_s": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if check_samples:
        try:
            from siss_fast.metrics import evaluate_samples
            from siss_fast.metrics.sampling import ddim_sample

            samples = ddim_sample(unet, scheduler.alphas_cumprod, check_samples, (1, 16, 16), steps=25, seed=0)
            record["check"] = evaluate_samples(to_unit(samples), to_unit(data.forget_image), clf)
            _log(f"check on {check_samples} samples: {record['check']}", start)
        except Exception as exc:  # the weights are saved already; the check is informational
            record["check_error"] = repr(exc)
    record["wall_s"] = round(time.perf_counter() - start, 1)
    record["sha256"] = {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*.safetensors"))}
    (folder / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    _log(f"saved {folder}", start)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain the siss-fast demo's base DDPM and digits classifier.")
    parser.add_argument("--out", required=True, help="output folder (gets digits_ddpm/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3000, help="DDPM optimizer steps (batch 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--without-forget", action="store_true",
                        help="train on the digits alone (the retrained-from-scratch control) into digits_ddpm_retrained/")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pretrain(Path(args.out), seed=args.seed, steps=args.steps, without_forget=args.without_forget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
