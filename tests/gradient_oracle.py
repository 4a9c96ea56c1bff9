"""The naive oracle of the GradientCombiner tests (``test_gradients.py``, ``test_gradients_state.py``).

The oracle takes G_x and G_a with two separate ``torch.autograd.grad`` calls per micro-batch, combines them with plain
tensor math and clips like ``torch.nn.utils.clip_grad_norm_``. Everything runs in float64 on a tiny network whose
retain and forget losses share one forward graph (as SISS's do) and which has a parameter only the retain term
reaches, one only the forget term reaches, and a frozen one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DTYPE = torch.float64
B = 4


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(6, 8)
        self.lin2 = nn.Linear(8, 3)
        self.retain_only = nn.Parameter(torch.randn(4))
        self.forget_only = nn.Parameter(torch.randn(5))
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)

    def forward(self, inp):
        return self.lin2(torch.tanh(self.lin1(inp))) + self.frozen


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().to(DTYPE)


def micro_batch(step: int, micro: int):
    g = torch.Generator().manual_seed(1000 * step + micro)
    x, a = torch.randn(B, 6, generator=g, dtype=DTYPE), torch.randn(B, 6, generator=g, dtype=DTYPE) + 1.0
    y, z = torch.randn(B, 3, generator=g, dtype=DTYPE), torch.randn(B, 3, generator=g, dtype=DTYPE)
    return x, y, a, z


def losses(model: TinyNet, mb):
    """(retain, forget) from ONE forward pass, so the first backward must keep the graph."""
    x, y, a, z = mb
    out = model(torch.cat([x, a]))
    retain = ((out[:B] - y) ** 2).mean() + 0.1 * (model.retain_only**2).sum()
    forget = ((out[B:] - z) ** 2).mean() + 0.3 * torch.sin(model.forget_only).sum()
    return retain, forget


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


# ---------------------------------------------------------------------------------------------- naive oracle


class NaiveCombiner:
    """Reference: clone every gradient, combine with plain tensor math (three extra copies of the parameters)."""

    def __init__(self, rule, scaling_norm=1.0, max_forget_scale=1e4, max_grad_norm=1.0, mode="exact",
                 lag_every=10, eta=0.1):
        self.rule, self.mode, self.lag_every, self.eta = rule, mode, lag_every, eta
        self.auto = scaling_norm == "auto"
        self.c = None if self.auto else scaling_norm
        self.cap, self.max_grad_norm = max_forget_scale, max_grad_norm
        self.lagged_coef, self.since = None, 0

    def coefficient(self, gx, ga):
        norm_a = flat(ga).norm().item()
        if not (math.isfinite(norm_a) and norm_a > 0):
            return 0.0
        if self.rule == "erasediff":
            s = max(self.eta - torch.dot(flat(gx), flat(ga)).item() / norm_a**2, 0.0)
        elif self.rule == "rescale":
            s = self.c / norm_a
        else:
            s = min(1.0, self.c / norm_a)
        if self.cap is not None:
            s = min(s, self.cap)
        return s if self.rule == "erasediff" else -s

    def step_grads(self, model, mbs, terms=("retain", "forget")):
        params = trainable(model)
        gx = [torch.zeros_like(p) for p in params]
        ga = [torch.zeros_like(p) for p in params]
        for mb in mbs:
            retain, forget = losses(model, mb)
            for name, loss, acc in (("retain", retain, gx), ("forget", forget, ga)):
                if name in terms:
                    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                    for buf, g in zip(acc, grads):
                        if g is not None:
                            buf += g
        measure = self.mode == "exact" or self.lagged_coef is None or self.since >= self.lag_every
        if measure:
            if self.auto and self.c is None:
                self.c = 0.1 * flat(gx).norm().item()
            coef = self.coefficient(gx, ga) if "forget" in terms else 0.0
            self.lagged_coef, self.since = coef, 1
        else:
            coef = self.lagged_coef
            self.since += 1
        total = [x + coef * a for x, a in zip(gx, ga)]
        norm = flat(total).norm().item()
        if self.max_grad_norm is not None:
            clip = min(1.0, self.max_grad_norm / (norm + 1e-6))
            total = [t * clip for t in total]
        return total, coef


def run_engine(model, combiner, steps, accumulation, terms=("retain", "forget"), lr=0.02):
    """Engine-style loop; returns per-step (grads as dense tensors, StepInfo)."""
    opt = torch.optim.SGD(trainable(model), lr=lr, momentum=0.5)
    history = []
    for step in range(steps):
        for micro in range(accumulation):
            retain, forget = losses(model, micro_batch(step, micro))
            combiner.backward(retain if "retain" in terms else None, forget if "forget" in terms else None)
        info = combiner.finish_step()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in trainable(model)]
        history.append((grads, info))
        if not info.skipped:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return history


def run_naive(model, naive, steps, accumulation, terms=("retain", "forget"), lr=0.02):
    opt = torch.optim.SGD(trainable(model), lr=lr, momentum=0.5)
    history = []
    for step in range(steps):
        grads, coef = naive.step_grads(model, [micro_batch(step, m) for m in range(accumulation)], terms)
        history.append((grads, coef))
        for p, g in zip(trainable(model), grads):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return history


def assert_same(actual, expected):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------- exactness
