"""Quickstart: a diffusion model forgets a cluster of its training data, in about a minute on a laptop CPU.

A small MLP denoiser is trained (DDPM) on 2-D points: four retained clusters at (+-2, +-2) and a planted forget
cluster at the origin (5 % of the data). Then SISS (lambda = 0.5, forget gradient rescaled to a fixed norm) unlearns
the forget cluster. Before and after, 4,000 samples from the ancestral sampler are scored:

* forget rate: share of samples within 0.5 of the planted cluster (it should drop to ~0),
* retain coverage: share of samples within 1.0 of a retained cluster, and the smallest cluster's share of those
  (quality: samples stay on the retained data, all four clusters kept).

Run:  python examples/quickstart.py  [--steps 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import siss_fast as sf
from siss_fast.gradients import GradientCombiner
from siss_fast.objectives import Objective

T = 100
CORNERS = torch.tensor([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]])


class Denoiser(nn.Module):
    """eps_theta(x, t) for 2-D points: an MLP on the point and a sinusoidal embedding of t."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t):
        freqs = torch.exp(torch.arange(8, dtype=torch.float32) * (-math.log(1000.0) / 8))
        angles = t.float()[:, None] * freqs[None]
        return self.net(torch.cat([x, angles.sin(), angles.cos()], dim=1))


def retain_points(n, gen):
    idx = torch.randint(0, 4, (n,), generator=gen)
    return CORNERS[idx] + 0.3 * torch.randn(n, 2, generator=gen)


def forget_points(n, gen):
    return 0.1 * torch.randn(n, 2, generator=gen)


@torch.no_grad()
def sample(model, alphas_cumprod, n, seed):
    """DDPM ancestral sampling from pure noise, fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    abar = alphas_cumprod
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    for t in reversed(range(T)):
        eps = model(x.float(), torch.full((n,), t)).double()
        a, ab = alphas[t], abar[t]
        x = (x - (1 - a) / (1 - ab).sqrt() * eps) / a.sqrt()
        if t > 0:
            var = (1 - a) * (1 - abar[t - 1]) / (1 - ab)
            x = x + var.sqrt() * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return x.float()


def scores(model, alphas_cumprod, seed=1234, n=4000):
    x = sample(model, alphas_cumprod, n, seed)
    forget = (x.norm(dim=1) < 0.5).float().mean().item()
    dist = torch.cdist(x, CORNERS)
    near = dist.min(dim=1).values < 1.0
    counts = torch.bincount(dist.argmin(dim=1)[near], minlength=4).float()
    return {"forget_rate": forget, "retain_coverage": near.float().mean().item(),
            "smallest_cluster_share": (counts.min() / counts.sum().clamp(min=1)).item()}


def denoising_loss(model, points, alphas_cumprod, seed=99):
    """Plain DDPM loss at fixed (t, eps): the membership signal."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (points.shape[0],), generator=gen)
    eps = torch.randn(points.shape, generator=gen)
    gamma, sigma = sf.schedule_coefficients(alphas_cumprod, t)
    x_t = gamma[:, None] * points + sigma[:, None] * eps
    with torch.no_grad():
        return (model(x_t, t) - eps).square().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=300, help="unlearning steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    betas = torch.linspace(1e-3, 0.1, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, dim=0)
    print(f"siss_fast {sf.__version__}: backend {sf.get_backend()!r}")

    start = time.perf_counter()
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(args.pretrain_steps):  # plain DDPM training on retain + 5 % planted forget points
        n_forget = 26
        x0 = torch.cat([retain_points(512 - n_forget, gen), forget_points(n_forget, gen)])
        t = torch.randint(0, T, (512,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        gamma, sigma = sf.schedule_coefficients(abar, t)
        loss = (model(gamma[:, None] * x0 + sigma[:, None] * eps, t) - eps).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"pretrained in {time.perf_counter() - start:.1f} s")

    probe_retain, probe_forget = retain_points(2048, gen), forget_points(2048, gen)
    before = scores(model, abar)
    before.update(retain_loss=denoising_loss(model, probe_retain, abar),
                  forget_loss=denoising_loss(model, probe_forget, abar))

    start = time.perf_counter()
    siss = Objective("siss", abar, lambd=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    combiner = GradientCombiner(list(model.parameters()), rule="rescale", scaling_norm="auto", max_grad_norm=1.0)
    for step in range(args.steps):
        terms = siss(model, retain_points(256, gen), forget_points(256, gen), generator=gen)
        combiner.backward(terms.retain, terms.forget)
        info = combiner.finish_step()
        if not info.skipped:
            opt.step()
        opt.zero_grad(set_to_none=True)
    print(f"unlearned with SISS in {time.perf_counter() - start:.1f} s "
          f"(scaling_norm auto = {combiner.scaling_norm:.3g}, skipped steps {combiner.skipped_steps})")

    after = scores(model, abar)
    after.update(retain_loss=denoising_loss(model, probe_retain, abar),
                 forget_loss=denoising_loss(model, probe_forget, abar))
    print()
    print("| metric                 | before | after  |")
    print("|------------------------|--------|--------|")
    for key in before:
        print(f"| {key:22s} | {before[key]:.4f} | {after[key]:.4f} |")


if __name__ == "__main__":
    main()
