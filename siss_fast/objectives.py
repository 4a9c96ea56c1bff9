"""The loss family of SPEC §5 behind one interface: every method yields a retain term and a forget term.

::

    objective = Objective("siss", scheduler.alphas_cumprod, lambd=0.5)
    terms = objective(unet, x0, a0, cond_x={"encoder_hidden_states": h_x}, cond_a={"encoder_hidden_states": h_a})
    # terms.retain: scalar whose gradient is G_x; terms.forget: scalar whose gradient is G_a (always a positive
    # loss); objective.rule_hint says how SPEC §6 combines them ("rescale": G = G_x - c/|G_a| * G_a, ...).

The methods and their terms are the records of :mod:`siss_fast.methods` (its docstring has the table of retain and
forget terms per method); this module samples, checks the parameters against the record and scales the terms.

For every method but `erasediff` the forget term is the score-matching loss of the forget set, which the rule
*subtracts*; for `erasediff` it is a loss towards uniform noise, which the EraseDiff rule *adds* (with a
non-negative coefficient). Scalars are batch means of the per-sample terms (``(1/B) sum_b``), which are also
returned for the engine's partitioned backward. `bernoulli` leaves out the ``1/lambd`` that would make its forget
term unbiased (as the research code does): the `rescale` rule normalises the forget gradient anyway.

Sampling, per call and in this order (so a seeded ``generator`` reproduces it): timesteps
``t ~ U{t_min..t_max}`` (B,), shared by the (x0[b], a0[b]) pair; noise ``eps ~ N(0, I)`` of x0's shape, shared by
the pair; for the methods that take ``lambd`` (`siss`, `bernoulli`) the mask ``rand(B) < lambd`` (True = forget
component); for `erasediff` the target ``u = rand(x0.shape)`` (fp32). Draws use ``generator`` (on its device) when
given, else the default generator of x0's device. This is the order :class:`siss_fast.SISSLoss` samples in.

Retain source: ``"complement"`` (x0 drawn from X \\ A, what the research code does; no scaling) or ``"full"``
(x0 drawn from all of X, as the paper writes it): from p_{X\\A} = n/(n-k) p_X - k/(n-k) p_A the retain term is
multiplied by n/(n-k) and the forget term by k/(n-k). `full` needs ``n`` and ``k`` and only applies to the methods
whose forget term is subtracted (``MethodSpec.full_retain``; not `naive`, which would then fine-tune on X, nor
`erasediff`).

Conditioning: ``cond_x`` / ``cond_a`` are model-kwargs dicts of the retain and forget samples (``cond_a`` defaults
to ``cond_x``). A forward pass on the mixture or Bernoulli sample gets, for every batch-dim tensor, the forget
sample's entry where the mask is True.

Only the public API of :mod:`siss_fast` is used here (layer 3 of STYLE.md).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from siss_fast.methods import MethodBatch, check_method_params
from siss_fast.module import sample_timesteps

__all__ = ["Objective", "ObjectiveTerms", "make_objective"]


@dataclass
class ObjectiveTerms:
    """What one objective call returns.

    Attributes:
        retain: scalar (fp32, fp64 for fp64 inputs) whose gradient is G_x; None if the method has no retain term.
        forget: scalar whose gradient is G_a, a positive loss (the rule subtracts or adds it, see ``rule_hint``);
            None if the method has no forget term.
        retain_per_sample, forget_per_sample: ``(B,)`` terms whose batch mean is ``retain`` / ``forget`` (same
            graph), for a backward partitioned by sample.
        timesteps: ``(B,)`` int64 timesteps used. mask: ``(B,)`` bool (True = forget component) for `siss` and
            `bernoulli`, else None. weight_x, weight_a: ``(B,)`` importance weights for `siss`, else None.
        stats: detached 0-d tensors for logging (no host synchronisation until read; see :meth:`float_stats`).
    """

    retain: Optional[Tensor]
    forget: Optional[Tensor]
    retain_per_sample: Optional[Tensor]
    forget_per_sample: Optional[Tensor]
    timesteps: Tensor
    mask: Optional[Tensor] = None
    weight_x: Optional[Tensor] = None
    weight_a: Optional[Tensor] = None
    stats: Dict[str, Tensor] = field(default_factory=dict)

    def float_stats(self) -> Dict[str, float]:
        """``stats`` as Python floats, read with one device-to-host copy."""
        if not self.stats:
            return {}
        names = list(self.stats)
        values = torch.stack([self.stats[k].detach().to(torch.float64).reshape(()) for k in names]).cpu().tolist()
        return dict(zip(names, values))


# ------------------------------------------------------------------------------------------------------- checks


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _check_alphas_cumprod(alphas_cumprod: object) -> Tensor:
    table = torch.as_tensor(alphas_cumprod) if not isinstance(alphas_cumprod, Tensor) else alphas_cumprod
    if not table.is_floating_point() or table.dim() != 1 or table.shape[0] < 1:
        raise ValueError(
            f"alphas_cumprod: expected a 1-D floating table of length T >= 1, "
            f"got a {table.dtype} tensor of shape {tuple(table.shape)}"
        )
    return table.detach().to(torch.float64).clone()


def _check_t_range(t_range: object, num_timesteps: int) -> Tuple[int, int]:
    if t_range is None:
        return 0, num_timesteps - 1
    if not isinstance(t_range, (tuple, list)) or len(t_range) != 2:
        raise ValueError(f"t_range: expected a pair (t_min, t_max), got {t_range!r}")
    t_min, t_max = _integer("t_range[0]", t_range[0]), _integer("t_range[1]", t_range[1])
    if not 0 <= t_min <= t_max <= num_timesteps - 1:
        raise ValueError(f"t_range: expected 0 <= t_min <= t_max <= {num_timesteps - 1} (T - 1), got {t_range!r}")
    return t_min, t_max


def _check_batch(x0: object, a0: object) -> None:
    for name, t in (("x0", x0), ("a0", a0)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = f"a {t.dtype} tensor" if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{name}: expected a floating-point tensor of shape (B, ...), got {got}")
    if x0.dim() < 1 or x0.shape[0] < 1:
        raise ValueError(f"x0: expected shape (B, ...) with B >= 1, got {tuple(x0.shape)}")
    if a0.shape != x0.shape:
        raise ValueError(f"a0: expected the shape of x0, {tuple(x0.shape)}, got {tuple(a0.shape)}")
    if a0.device != x0.device:
        raise ValueError(f"a0: expected a tensor on {x0.device} (the device of x0), got {a0.device}")


# ---------------------------------------------------------------------------------------------------- objective


class Objective:
    """One method of the loss family (see the module docstring and :mod:`siss_fast.methods`).

    Args:
        method: a registered method name (:func:`siss_fast.methods.method_names`).
        alphas_cumprod: ``(T,)`` table of the noise scheduler (kept in fp64).
        lambd: forget-component probability, for the methods whose record takes it (`siss`: [0, 1], `bernoulli`:
            (0, 1); default the record's ``lambd_default``, 0.5).
        weight_clip: for the methods whose record takes it (`siss`): None or > 0, upper bound on the importance
            weights.
        retain_source: ``"complement"`` (default) or ``"full"`` (needs ``n`` and ``k``).
        n, k: sizes of the training set X and of the forget set A (1 <= k < n).
        t_range: inclusive ``(t_min, t_max)``, default the whole range ``(0, T - 1)``.

    Calling it: ``objective(model, x0, a0, *, cond_x=None, cond_a=None, generator=None) -> ObjectiveTerms`` with
    ``x0``, ``a0`` ``(B, ...)`` paired retain and forget latents; the model is called as
    ``model(noisy, t, **cond)`` and may return a tensor, a diffusers output or a tuple.
    """

    def __init__(
        self,
        method: str,
        alphas_cumprod: Tensor,
        *,
        lambd: Optional[float] = None,
        weight_clip: Optional[float] = None,
        retain_source: str = "complement",
        n: Optional[int] = None,
        k: Optional[int] = None,
        t_range: Optional[Tuple[int, int]] = None,
    ):
        spec = check_method_params(method, lambd=None if lambd is None else _real("lambd", lambd),
                                   weight_clip=weight_clip, retain_source=retain_source)
        self.method, self.spec = method, spec
        self.alphas_cumprod = _check_alphas_cumprod(alphas_cumprod)
        self.t_range = _check_t_range(t_range, self.num_timesteps)
        self.lambd: Optional[float] = None
        if spec.lambd is not None:
            self.lambd = spec.lambd_default if lambd is None else float(lambd)

        if weight_clip is not None:
            value = _real("weight_clip", weight_clip)
            if not value > 0.0:
                raise ValueError(f"weight_clip: expected None or a number > 0, got {value!r}")
            weight_clip = None if math.isinf(value) else value
        self.weight_clip = weight_clip

        self.retain_source = retain_source
        self.n = None if n is None else _integer("n", n)
        self.k = None if k is None else _integer("k", k)
        if self.k is not None and self.k < 1:
            raise ValueError(f"k: expected the forget-set size k >= 1, got {self.k}")
        if self.n is not None and self.k is not None and not self.n > self.k:
            raise ValueError(f"n: expected the training-set size n > k = {self.k}, got {self.n}")
        self.retain_scale, self.forget_scale = 1.0, 1.0
        if retain_source == "full":
            if self.n is None or self.k is None:
                raise ValueError(f"n, k: retain_source='full' needs both set sizes, got n={n!r}, k={k!r}")
            self.retain_scale = self.n / (self.n - self.k)
            self.forget_scale = self.k / (self.n - self.k)
        self.state = spec.build(self) if spec.build is not None else None

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def rule_hint(self) -> Optional[str]:
        """The gradient-combination rule of SPEC §6 this method expects (None when it has no forget term)."""
        return self.spec.rule

    def __repr__(self) -> str:
        return (f"Objective({self.method!r}, T={self.num_timesteps}, lambd={self.lambd}, "
                f"weight_clip={self.weight_clip}, retain_source={self.retain_source!r}, t_range={self.t_range})")

    def __call__(
        self,
        model: Callable[..., Any],
        x0: Tensor,
        a0: Tensor,
        *,
        cond_x: Optional[Mapping[str, Any]] = None,
        cond_a: Optional[Mapping[str, Any]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> ObjectiveTerms:
        _check_batch(x0, a0)
        cond_x = dict(cond_x or {})
        cond_a = dict(cond_a) if cond_a is not None else cond_x
        batch, device = x0.shape[0], x0.device
        if self.alphas_cumprod.device != device:  # keep the small table where the latents are
            self.alphas_cumprod = self.alphas_cumprod.to(device)
            if hasattr(self.state, "to"):
                self.state.to(device)
        draw_device = generator.device if generator is not None else device

        timesteps = sample_timesteps(batch, self.num_timesteps, self.t_range, device, generator)
        noise = torch.randn(x0.shape, generator=generator, device=draw_device, dtype=x0.dtype).to(device)
        mask = None
        if self.spec.lambd is not None:
            mask = (torch.rand((batch,), generator=generator, device=draw_device) < self.lambd).to(device)

        retain_ps, forget_ps, weight_x, weight_a = self.spec.forward(MethodBatch(
            self, model, x0, a0, noise, timesteps, mask, cond_x, cond_a, generator, draw_device))

        if retain_ps is not None and self.retain_scale != 1.0:
            retain_ps = retain_ps * self.retain_scale
        if forget_ps is not None and self.forget_scale != 1.0:
            forget_ps = forget_ps * self.forget_scale

        stats: Dict[str, Tensor] = {"timestep_mean": timesteps.detach().to(torch.float32).mean()}
        if retain_ps is not None:
            stats["loss_retain"] = retain_ps.detach().mean()
        if forget_ps is not None:
            stats["loss_forget"] = forget_ps.detach().mean()
        if mask is not None:
            stats["mask_fraction"] = mask.to(torch.float32).mean()
        for name, w in (("weight_x", weight_x), ("weight_a", weight_a)):
            if w is not None:
                stats[f"{name}_mean"], stats[f"{name}_min"], stats[f"{name}_max"] = w.mean(), w.min(), w.max()

        return ObjectiveTerms(
            retain=None if retain_ps is None else retain_ps.mean(),
            forget=None if forget_ps is None else forget_ps.mean(),
            retain_per_sample=retain_ps,
            forget_per_sample=forget_ps,
            timesteps=timesteps,
            mask=mask,
            weight_x=weight_x,
            weight_a=weight_a,
            stats=stats,
        )


def make_objective(method: str, alphas_cumprod: Tensor, **params: Any) -> Objective:
    """``Objective(method, alphas_cumprod, **params)``; the functional spelling."""
    return Objective(method, alphas_cumprod, **params)
