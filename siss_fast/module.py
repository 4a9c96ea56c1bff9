"""``SISSLoss``: the drop-in ``nn.Module`` for a diffusers training script."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from . import _checks as checks
from .functional import SISSTerms, mixture_noise, model_output, schedule_coefficients, siss_loss

__all__ = ["SISSLoss", "sample_timesteps", "select_per_sample"]


def sample_timesteps(
    batch: int,
    num_timesteps: int,
    t_range: Optional[Tuple[int, int]],
    device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``(B,)`` int64 timesteps uniform on ``[t_min, t_max]`` (inclusive; default the whole range ``[0, T-1]``)."""
    t_min, t_max = (0, num_timesteps - 1) if t_range is None else t_range
    if not (0 <= t_min <= t_max < num_timesteps):
        raise ValueError(f"t_range: expected 0 <= t_min <= t_max < {num_timesteps}, got {t_range!r}")
    gen_device = generator.device if generator is not None else device
    t = torch.randint(t_min, t_max + 1, (batch,), generator=generator, device=gen_device)
    return t.to(device)


def select_per_sample(mask: Tensor, when_true: Dict[str, Any], when_false: Dict[str, Any]) -> Dict[str, Any]:
    """Per-sample choice between two model-kwargs dicts: batch-dim tensors are selected by ``mask`` (``(B,)`` bool),
    anything else must be equal in both and is passed through."""
    out: Dict[str, Any] = {}
    batch = mask.shape[0]
    for key in when_true.keys() | when_false.keys():
        if key not in when_true or key not in when_false:
            raise ValueError(f"model_kwargs: key {key!r} is given for only one of the retain and forget samples")
        a, b = when_true[key], when_false[key]
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() >= 1 and a.shape[0] == batch:
            if a.shape != b.shape:
                raise ValueError(f"model_kwargs[{key!r}]: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
            out[key] = torch.where(mask.view(batch, *([1] * (a.dim() - 1))).to(a.device), a, b)
        else:
            out[key] = a
    return out


class SISSLoss(nn.Module):
    """SISS objective as a module: samples ``t``, ``eps`` and the mixture mask, runs the model once on the mixture
    sample and returns both importance-weighted terms.

    Args:
        alphas_cumprod: ``(T,)`` table of the noise scheduler (``scheduler.alphas_cumprod``); kept as an fp64 buffer.
        lambd: probability of the forget component in the defensive mixture, in [0, 1].
        weight_clip: optional upper bound on the importance weights (keeps lambd in {0, 1} usable).
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (see :func:`siss_fast.siss_loss`).

    ``forward(model, x0, a0, *, model_kwargs=None, forget_model_kwargs=None, timesteps=None, noise=None, mask=None,
    generator=None, t_range=None) -> SISSTerms``: ``x0``/``a0`` are ``(B, ...)`` retain/forget latents; the model
    is called as ``model(noisy, t, **kwargs)``. ``forget_model_kwargs`` (e.g. the forget prompt's embeddings) is used
    for samples drawn from the forget component. Anything not given is sampled (with ``generator`` if given).
    The training objective is usually ``terms.loss_x - c * terms.loss_a`` (see :mod:`siss_fast.gradients`).
    """

    def __init__(self, alphas_cumprod: Tensor, lambd: float = 0.5, *, weight_clip: Optional[float] = None,
                 reduction: str = "mean"):
        super().__init__()
        table = checks.check_tensor("alphas_cumprod", torch.as_tensor(alphas_cumprod))
        if table.dim() != 1 or table.shape[0] < 1:
            raise ValueError(f"alphas_cumprod: expected a 1-D table of length T >= 1, got shape {tuple(table.shape)}")
        self.register_buffer("alphas_cumprod", table.detach().to(torch.float64).clone(), persistent=False)
        self.lambd = checks.check_lambd(lambd)
        self.weight_clip = checks.check_weight_clip(weight_clip)
        self.reduction = checks.check_reduction(reduction)

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def forward(
        self,
        model: nn.Module,
        x0: Tensor,
        a0: Tensor,
        *,
        model_kwargs: Optional[Dict[str, Any]] = None,
        forget_model_kwargs: Optional[Dict[str, Any]] = None,
        timesteps: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        generator: Optional[torch.Generator] = None,
        t_range: Optional[Tuple[int, int]] = None,
    ) -> SISSTerms:
        x0 = checks.check_tensor("x0", x0)
        a0 = checks.check_tensor("a0", a0)
        checks.check_same_shape({"x0": x0, "a0": a0})
        batch, device = x0.shape[0], x0.device
        gen_device = generator.device if generator is not None else device
        if timesteps is None:
            timesteps = sample_timesteps(batch, self.num_timesteps, t_range, device, generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(device)
        if mask is None:
            mask = (torch.rand((batch,), generator=generator, device=gen_device) < self.lambd).to(device)
        gamma, sigma = schedule_coefficients(self.alphas_cumprod, timesteps)
        noisy = mixture_noise(x0, a0, noise, gamma, sigma, mask)
        kwargs = dict(model_kwargs or {})
        if forget_model_kwargs is not None:
            kwargs = select_per_sample(checks.check_mask("mask", mask, batch), dict(forget_model_kwargs), kwargs)
        pred = model_output(model(noisy, timesteps, **kwargs))
        return siss_loss(pred, noisy, x0, a0, gamma, sigma, self.lambd, weight_clip=self.weight_clip,
                         reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"T={self.num_timesteps}, lambd={self.lambd}, weight_clip={self.weight_clip}, reduction={self.reduction!r}"
