"""The relearning probe: fine-tune a copy of a model on retain data only, and watch whether the forget items return.

Published attacks bring "erased" content back with a short fine-tune on unrelated data. The probe is the engine's
``naive`` method (SPEC §5: the plain denoising loss on retain images, no forget term) in a plain loop, on a deep
copy (the model given is never changed)::

    x0 ~ retain (with replacement), t ~ U{0..T-1}, eps ~ N(0, I)       (one Generator: the relearn seed)
    loss = mean (eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c) - eps)^2
    AdamW(lr, betas, eps, weight_decay of the run; lr default: the engine's for the kind, 1e-4 pixel / 1e-5 SD),
    batch (default the engine's: 64 pixel / 8 SD), gradient norm clipped to 1.0 (the engine's max_grad_norm), raw
    weights (no EMA: an attacker keeps none)

A latent model (Stable Diffusion) trains as the engine does: ``x0`` a fresh draw from the retain image's VAE
posterior (:class:`siss_fast.engine.data.LatentCache`: ``(mean + std n) * scaling_factor``, ``n`` from the same
Generator, drawn after the indices), ``c`` the retain image's own caption's text states (pixel models: no ``c``).

Every ``every`` steps (and at step 0) ``measure(unet)`` is called on the current weights (eval mode); the curve is
``[{"step": s, **measure(unet)}]``. Cost: ``steps`` forward+backward passes of ``batch`` images plus the measurements.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from ..metrics.sampling import model_eps

__all__ = ["relearn_curve", "returned_at"]


def relearn_curve(unet: Any, alphas_cumprod: Tensor, retain_pixels: Tensor, measure: Callable[[Any], Dict[str, Any]],
                  *, steps: int, every: int, lr: float, batch_size: int, seed: int, betas=(0.9, 0.999),
                  adam_eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                  device: torch.device = torch.device("cpu"), latents: Any = None,
                  cond: Optional[Tensor] = None) -> List[Dict[str, Any]]:
    """The curve of the module doc; ``retain_pixels`` ``(M, C, H, W)`` in ``[0, 1]``. Latent models: ``latents`` the
    retain images' :class:`~siss_fast.engine.data.LatentCache` (on the CPU), ``cond`` ``(M, L, D)`` their prompts'
    text states."""
    if steps < 0 or every < 1:
        raise ValueError(f"relearn: expected steps >= 0 and every >= 1, got steps={steps}, every={every}")
    model = copy.deepcopy(unet).to(device)
    model.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=adam_eps, weight_decay=weight_decay)
    abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    x_all = retain_pixels.float() * 2 - 1
    gen = torch.Generator().manual_seed(seed)
    curve = [{"step": 0, **_measure(model, measure)}]
    for step in range(1, steps + 1):
        idx = torch.randint(0, x_all.shape[0], (batch_size,), generator=gen)
        x0 = x_all[idx] if latents is None else latents.draw(idx, gen).float()
        t = torch.randint(0, abar.shape[0], (batch_size,), generator=gen)
        eps = torch.randn((batch_size, *x0.shape[1:]), generator=gen)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        x_t = (abar[t].sqrt().view(shape) * x0 + (1 - abar[t]).sqrt().view(shape) * eps).float()
        model.train()
        kwargs = {} if cond is None else {"encoder_hidden_states": cond[idx].to(device)}
        pred = model_eps(model, x_t.to(device), t.to(device), **kwargs).float()
        loss = (pred - eps.to(device)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if step % every == 0 or step == steps:
            curve.append({"step": step, "loss": float(loss.detach()), **_measure(model, measure)})
    return curve


def _measure(model: Any, measure: Callable[[Any], Dict[str, Any]]) -> Dict[str, Any]:
    model.eval()
    with torch.no_grad():
        return measure(model)


def returned_at(curve: List[Dict[str, Any]], k: int, level: float) -> Any:
    """The first step of ``curve`` at which item ``k``'s rate (``point["rates"][k]``) reaches ``level`` (> 0), or
    None when it never does (or ``level`` is 0: the base model never produced the item, nothing to return to)."""
    if level <= 0:
        return None
    return next((p["step"] for p in curve if p["rates"][k] >= level), None)
