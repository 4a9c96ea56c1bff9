"""siss_fast: fused kernels and a lean engine for SISS data unlearning in diffusion models.

Public interface (SPEC §7)::

    import siss_fast as sf
    gamma, sigma = sf.schedule_coefficients(alphas_cumprod, timesteps)
    noisy = sf.mixture_noise(x0, a0, noise, gamma, sigma, mask)
    w_x, w_a = sf.importance_weights(noisy, x0, a0, gamma, sigma, lambd)
    terms = sf.siss_loss(pred, noisy, x0, a0, gamma, sigma, lambd)   # SISSTerms(loss_x, loss_a, weight_x, weight_a)
    loss_fn = sf.SISSLoss(alphas_cumprod, lambd=0.5)
    sf.set_backend("auto"); sf.get_backend(); print(sf.env_report())

Importing siss_fast never touches CUDA, never imports Triton and never fails because the compiled extension is
missing (``sf.env_report()`` says why it is).
"""

from ._version import __version__
from .backends import BackendUnavailableError, get_backend, set_backend
from .env import env_report
from .functional import (
    SISSTerms,
    importance_weights,
    mixture_noise,
    model_output,
    schedule_coefficients,
    siss_loss,
)
from .module import SISSLoss

__all__ = [
    "__version__",
    "BackendUnavailableError",
    "SISSLoss",
    "SISSTerms",
    "compat",
    "env_report",
    "get_backend",
    "importance_weights",
    "mixture_noise",
    "model_output",
    "schedule_coefficients",
    "set_backend",
    "siss_loss",
]


def __getattr__(name):
    # ``sf.compat`` and the heavier layers load on first use.
    if name in ("compat", "objectives", "gradients"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
