"""The one registry of ``siss_fast::`` ops: schemas, fake (meta) implementations and autograd.

Every backend plugs in beneath these three ops (see :mod:`siss_fast.backends`: the registered backend of the
tensors' device runs; there is no second registration per backend -- the compiled extension's ``*_ext`` operators
are that backend's implementation, and the Triton kernels are plain launchers); ``torch.compile(fullgraph=True)``
traces through them without graph breaks because they are registered ``torch.library`` custom ops.

* ``siss_fast::mixture_noise(x0, a0, noise, gamma, sigma, mask) -> noisy``
  differentiable w.r.t. x0, a0 and noise (gamma, sigma, mask are constants).
* ``siss_fast::siss_loss(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip) -> (ell_x, ell_a, w_x, w_a)``
  per-sample weighted losses and weights, ``(B,)`` in the accumulation dtype; differentiable w.r.t. pred only
  (SPEC §4: the weights and targets are constants), weights are non-differentiable outputs.
* ``siss_fast::siss_loss_backward(grad_ell_x, grad_ell_a, w_x, w_a, pred, noisy, x0, a0, gamma, sigma) -> grad_pred``

Inputs reach these ops normalised by :mod:`siss_fast.functional` (dtypes, contiguous per-sample vectors); the
ops themselves are public for ``torch.compile`` and ``opcheck`` but users call the functional API.

Eager fast path: a custom op's Python dispatch costs ~0.1 ms per call on the CPU (more than the kernel at Stable
Diffusion latent size). Outside ``torch.compile``, :func:`call_mixture_noise` and :func:`call_siss_loss` therefore run
the same backend functions through a :class:`torch.autograd.Function` with the *same* setup/backward rules as the
registered ops; under ``torch.compile`` they call the registered ops, which dynamo traces without graph breaks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends

__all__ = ["mixture_noise", "siss_loss", "siss_loss_backward", "call_mixture_noise", "call_siss_loss"]


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(v.shape[0], *([1] * (like.dim() - 1)))


# --------------------------------------------------------------------------------------------------- mixture_noise


@torch.library.custom_op("siss_fast::mixture_noise", mutates_args=())
def mixture_noise(x0: Tensor, a0: Tensor, noise: Tensor, gamma: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
    """``m = gamma*(a0 if mask else x0) + sigma*noise`` (SPEC §3), in x0's dtype, contiguous."""
    _, module = backends.resolve(x0.device)
    return module.mixture_noise(x0, a0, noise, gamma, sigma, mask)


@mixture_noise.register_fake
def _(x0, a0, noise, gamma, sigma, mask):
    return torch.empty(x0.shape, dtype=x0.dtype, device=x0.device)


def _mixture_noise_setup(ctx, inputs, output):
    _, _, _, gamma, sigma, mask = inputs
    ctx.save_for_backward(gamma, sigma, mask)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, inputs[2].dtype)


def _mixture_noise_backward(ctx, grad):
    gamma, sigma, mask = ctx.saved_tensors
    acc = gamma.dtype
    g = grad.to(acc)
    m = _bcast(mask, g)
    scale = _bcast(gamma, g)
    zero = torch.zeros((), dtype=acc, device=g.device)
    grad_x0 = torch.where(m, zero, g * scale).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
    grad_a0 = torch.where(m, g * scale, zero).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
    grad_noise = (g * _bcast(sigma, g)).to(ctx.dtypes[2]) if ctx.needs_input_grad[2] else None
    return grad_x0, grad_a0, grad_noise, None, None, None


mixture_noise.register_autograd(_mixture_noise_backward, setup_context=_mixture_noise_setup)


# ------------------------------------------------------------------------------------------------------ siss_loss


@torch.library.custom_op("siss_fast::siss_loss", mutates_args=())
def siss_loss(pred: Tensor, noisy: Tensor, x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor, lambd: float,
              weight_clip: Optional[float]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused SISS forward: ``(ell_x, ell_a, w_x, w_a)``, each ``(B,)`` in gamma's (accumulation) dtype."""
    _, module = backends.resolve(pred.device)
    return module.siss_loss_forward(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip)


@siss_loss.register_fake
def _(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip):
    out = lambda: torch.empty((pred.shape[0],), dtype=gamma.dtype, device=pred.device)  # noqa: E731
    return out(), out(), out(), out()


@torch.library.custom_op("siss_fast::siss_loss_backward", mutates_args=())
def siss_loss_backward(grad_ell_x: Tensor, grad_ell_a: Tensor, w_x: Tensor, w_a: Tensor, pred: Tensor, noisy: Tensor,
                       x0: Tensor, a0: Tensor, gamma: Tensor, sigma: Tensor) -> Tensor:
    """``d/dpred`` of ``sum_b g_x[b]*ell_x[b] + g_a[b]*ell_a[b]``, in pred's dtype and shape, contiguous."""
    _, module = backends.resolve(pred.device)
    return module.siss_loss_backward(grad_ell_x, grad_ell_a, w_x, w_a, pred, noisy, x0, a0, gamma, sigma)


@siss_loss_backward.register_fake
def _(grad_ell_x, grad_ell_a, w_x, w_a, pred, noisy, x0, a0, gamma, sigma):
    return torch.empty(pred.shape, dtype=pred.dtype, device=pred.device)


def _siss_loss_setup(ctx, inputs, output):
    pred, noisy, x0, a0, gamma, sigma, _, _ = inputs
    _, _, w_x, w_a = output
    ctx.save_for_backward(pred, noisy, x0, a0, gamma, sigma, w_x, w_a)
    ctx.mark_non_differentiable(w_x, w_a)


def _siss_loss_backward_rule(ctx, grad_ell_x, grad_ell_a, _grad_w_x, _grad_w_a, *, direct=False):
    """Gradient w.r.t. pred through the ``siss_fast::siss_loss_backward`` op, or straight to the backend when
    ``direct`` (the eager fast path; never under tracing, where tensors may be fake)."""
    pred, noisy, x0, a0, gamma, sigma, w_x, w_a = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return (None,) * 8
    if grad_ell_x is None:
        grad_ell_x = torch.zeros_like(w_x)
    if grad_ell_a is None:
        grad_ell_a = torch.zeros_like(w_a)
    grad_args = (grad_ell_x.to(w_x.dtype).contiguous(), grad_ell_a.to(w_a.dtype).contiguous(), w_x, w_a,
                 pred, noisy, x0, a0, gamma, sigma)
    if direct:
        grad_pred = backends.resolve(pred.device)[1].siss_loss_backward(*grad_args)
    else:
        grad_pred = siss_loss_backward(*grad_args)
    return grad_pred, None, None, None, None, None, None, None


siss_loss.register_autograd(_siss_loss_backward_rule, setup_context=_siss_loss_setup)


# ---------------------------------------------------------------------------------------------- eager fast path


class _MixtureNoiseFunction(torch.autograd.Function):
    """Eager twin of ``siss_fast::mixture_noise``: same backend call, same autograd rule."""

    @staticmethod
    def forward(x0, a0, noise, gamma, sigma, mask):
        return backends.resolve(x0.device)[1].mixture_noise(x0, a0, noise, gamma, sigma, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _mixture_noise_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad):
        return _mixture_noise_backward(ctx, grad)


class _SISSLossFunction(torch.autograd.Function):
    """Eager twin of ``siss_fast::siss_loss``: same backend call, same autograd rule."""

    @staticmethod
    def forward(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip):
        return backends.resolve(pred.device)[1].siss_loss_forward(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _siss_loss_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_ell_x, grad_ell_a, grad_w_x, grad_w_a):
        return _siss_loss_backward_rule(ctx, grad_ell_x, grad_ell_a, grad_w_x, grad_w_a, direct=True)


def call_mixture_noise(x0: Tensor, a0: Tensor, noise: Tensor, gamma: Tensor, sigma: Tensor, mask: Tensor) -> Tensor:
    """``siss_fast::mixture_noise`` under torch.compile, its autograd.Function twin in eager mode."""
    if torch.compiler.is_compiling():
        return mixture_noise(x0, a0, noise, gamma, sigma, mask)
    if torch.is_grad_enabled() and (x0.requires_grad or a0.requires_grad or noise.requires_grad):
        return _MixtureNoiseFunction.apply(x0, a0, noise, gamma, sigma, mask)
    return backends.resolve(x0.device)[1].mixture_noise(x0, a0, noise, gamma, sigma, mask)


def call_siss_loss(pred, noisy, x0, a0, gamma, sigma, lambd: float, weight_clip: Optional[float]):
    """``siss_fast::siss_loss`` under torch.compile, its autograd.Function twin in eager mode."""
    if torch.compiler.is_compiling():
        return siss_loss(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip)
    if torch.is_grad_enabled() and pred.requires_grad:
        return _SISSLossFunction.apply(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip)
    return backends.resolve(pred.device)[1].siss_loss_forward(pred, noisy, x0, a0, gamma, sigma, lambd, weight_clip)
