"""The method table: one :class:`MethodSpec` record per loss method of SPEC §5, and its forward function.

Everything that depends on the method reads this table: :class:`siss_fast.objectives.Objective` (parameters,
sampling, the forward), the engine's config validation (``method.*``, ``gradient.scaling_norm``), the engine's step
(partitioned backward), the combiner's default rule and the demos. Adding a method is one record and one forward
function, here or in the user's own module::

    from siss_fast.methods import MethodSpec, MethodTerms, register_method

    def my_forward(batch):                     # batch: MethodBatch (model, x0, a0, noise, timesteps, mask, ...)
        x_t = batch.noised(forget=False)      # gamma*x0 + sigma*eps
        return MethodTerms(retain=plain_loss(batch.predict(x_t, batch.cond_x), batch.noise), forget=None)

    register_method(MethodSpec("my_method", my_forward, rule=None, summary=("L(eps_theta(x_t), eps)", "none", 1)))

Per sample, with ``L(pred, target) = mean_i (pred - target)^2`` (:func:`plain_loss`), ``x_t = gamma x0 + sigma eps``,
``a_t`` likewise and ``m`` the mixture sample (SPEC §3), the built-in records are:

| method      | retain term (G_x)                          | forget term (G_a)                 | passes | rule        |
|-------------|--------------------------------------------|-----------------------------------|--------|-------------|
| `siss`      | w_x L(eps_theta(m), eps_x)                 | w_a L(eps_theta(m), eps_a)        | 1      | `rescale`   |
| `siss_nois` | L(eps_theta(x_t), eps)                     | L(eps_theta(a_t), eps)            | 2      | `rescale`   |
| `naive`     | L(eps_theta(x_t), eps)                     | none                              | 1      | None        |
| `neggrad`   | none                                       | L(eps_theta(a_t), eps)            | 1      | `rescale`   |
| `erasediff` | L(eps_theta(x_t), eps)                     | L(eps_theta(a_t), u), u ~ U[0, 1) | 2      | `erasediff` |
| `bernoulli` | 1{not mask}/(1-lambd) L(eps_theta(m), eps) | 1{mask} L(eps_theta(m), eps)      | 1      | `rescale`   |

(:func:`methods_markdown` writes this table from the records; a test keeps it and the README in step.)

A forward function gets a :class:`MethodBatch` (timesteps, noise and, for methods that take ``lambd``, the mask
already drawn in the order SPEC §5 fixes) and returns :class:`MethodTerms` of ``(B,)`` per-sample terms; any further
random draw must use ``batch.generator`` on ``batch.draw_device`` after the model calls, as `erasediff` does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

import siss_fast as sf
from siss_fast.module import select_per_sample

__all__ = [
    "RETAIN_SOURCES",
    "Interval",
    "MethodBatch",
    "MethodSpec",
    "MethodTerms",
    "check_method_params",
    "get_method",
    "method_names",
    "methods_markdown",
    "plain_loss",
    "register_method",
    "unregister_method",
]

RETAIN_SOURCES = ("complement", "full")


@dataclass(frozen=True)
class Interval:
    """A range of real values with open or closed ends, e.g. ``Interval(0, 1)`` is ``0 <= x <= 1``."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self, name: str) -> str:
        """``"0 <= lambd <= 1"``-style text for error messages."""
        return f"{self.low:g} {'<' if self.low_open else '<='} {name} {'<' if self.high_open else '<='} {self.high:g}"


class MethodTerms(NamedTuple):
    """What a forward function returns: ``(B,)`` per-sample terms (None where the method has none), and for
    importance-weighted methods the ``(B,)`` weights (logged as statistics)."""

    retain: Optional[Tensor]
    forget: Optional[Tensor]
    weight_x: Optional[Tensor] = None
    weight_a: Optional[Tensor] = None


@dataclass
class MethodBatch:
    """One call's inputs, as a forward function sees them.

    Attributes:
        objective: the :class:`~siss_fast.objectives.Objective` (``alphas_cumprod`` ``(T,)`` fp64, ``lambd``,
            ``weight_clip``, ``state``: what the record's ``build`` returned).
        model: called as ``model(noisy, timesteps, **cond)``.
        x0, a0: ``(B, ...)`` paired retain and forget latents. noise: ``(B, ...)`` eps, x0's dtype.
        timesteps: ``(B,)`` int64. mask: ``(B,)`` bool (True = forget component) for methods that take ``lambd``,
            else None. cond_x, cond_a: model-kwargs dicts (``cond_a is cond_x`` when no forget conditioning given).
        generator, draw_device: where further random draws come from.
    """

    objective: Any
    model: Callable[..., Any]
    x0: Tensor
    a0: Tensor
    noise: Tensor
    timesteps: Tensor
    mask: Optional[Tensor]
    cond_x: Dict[str, Any]
    cond_a: Dict[str, Any]
    generator: Optional[torch.Generator]
    draw_device: torch.device

    def predict(self, noisy: Tensor, cond: Mapping[str, Any]) -> Tensor:
        """The model's epsilon prediction for ``noisy`` at the batch's timesteps."""
        return sf.model_output(self.model(noisy, self.timesteps, **cond))

    def coefficients(self) -> Tuple[Tensor, Tensor]:
        """``(gamma, sigma)``, ``(B,)`` fp32, of the batch's timesteps."""
        return sf.schedule_coefficients(self.objective.alphas_cumprod, self.timesteps)

    def noised(self, forget: bool) -> Tensor:
        """``gamma*a0 + sigma*eps`` (``forget``) or ``gamma*x0 + sigma*eps``, through ``sf.mixture_noise``."""
        gamma, sigma = self.coefficients()
        which = torch.full((self.x0.shape[0],), forget, dtype=torch.bool, device=self.x0.device)
        return sf.mixture_noise(self.x0, self.a0, self.noise, gamma, sigma, which)


@dataclass(frozen=True)
class MethodSpec:
    """One loss method.

    Attributes:
        name: the config's ``method.name``.
        forward: ``MethodBatch -> MethodTerms``.
        rule: the SPEC §6 combination rule it runs with (``"rescale"``, ``"clip"``, ``"erasediff"``; None: it has
            no forget term).
        lambd: the range of ``lambd`` if the method takes it (it then also draws the mask), else None.
        lambd_default: ``lambd`` when not given.
        weight_clip: whether it takes ``weight_clip`` (an upper bound on importance weights).
        full_retain: whether ``retain_source="full"`` applies (the forget term is subtracted from a retain term).
        has_retain: whether it has a retain term (``scaling_norm="auto"`` measures its gradient).
        partitioned: whether the engine's partitioned backward (:mod:`siss_fast.engine.partition`) applies.
        build: ``Objective -> state`` made once per objective (moved with ``.to(device)`` if it has one).
        summary: ``(retain term, forget term, passes)`` for the docs' table.
    """

    name: str
    forward: Callable[[MethodBatch], MethodTerms]
    rule: Optional[str]
    lambd: Optional[Interval] = None
    lambd_default: float = 0.5
    weight_clip: bool = False
    full_retain: bool = False
    has_retain: bool = True
    partitioned: bool = False
    build: Optional[Callable[[Any], Any]] = None
    summary: Tuple[str, str, int] = ("", "", 1)


# ----------------------------------------------------------------------------------------------- the forwards


def plain_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``(B,)`` mean_i (pred - target)^2, accumulated in fp32 (fp64 if either is fp64)."""
    acc = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    return (pred.to(acc) - target.to(acc)).square().reshape(pred.shape[0], -1).mean(dim=1)


def _build_siss(objective: Any) -> sf.SISSLoss:
    return sf.SISSLoss(objective.alphas_cumprod, objective.lambd, weight_clip=objective.weight_clip,
                       reduction="none")


def _siss(b: MethodBatch) -> MethodTerms:
    """One pass on the mixture sample through the fused ``sf.siss_loss`` (SPEC §4)."""
    terms = b.objective.state(b.model, b.x0, b.a0, model_kwargs=b.cond_x,
                              forget_model_kwargs=None if b.cond_a is b.cond_x else b.cond_a,
                              timesteps=b.timesteps, noise=b.noise, mask=b.mask)
    return MethodTerms(*terms)


def _bernoulli(b: MethodBatch) -> MethodTerms:
    """One pass on the mixture sample; the mask routes the plain loss to the retain or the forget term."""
    gamma, sigma = b.coefficients()
    noisy = sf.mixture_noise(b.x0, b.a0, b.noise, gamma, sigma, b.mask)
    cond = b.cond_x if b.cond_a is b.cond_x else select_per_sample(b.mask, b.cond_a, b.cond_x)
    loss = plain_loss(b.predict(noisy, cond), b.noise)
    zero = torch.zeros_like(loss)
    return MethodTerms(torch.where(b.mask, zero, loss / (1.0 - b.objective.lambd)), torch.where(b.mask, loss, zero))


def _retain_loss(b: MethodBatch) -> Tensor:
    return plain_loss(b.predict(b.noised(forget=False), b.cond_x), b.noise)


def _forget_loss(b: MethodBatch) -> Tensor:
    return plain_loss(b.predict(b.noised(forget=True), b.cond_a), b.noise)


def _siss_nois(b: MethodBatch) -> MethodTerms:
    retain = _retain_loss(b)
    return MethodTerms(retain, _forget_loss(b))


def _naive(b: MethodBatch) -> MethodTerms:
    return MethodTerms(_retain_loss(b), None)


def _neggrad(b: MethodBatch) -> MethodTerms:
    return MethodTerms(None, _forget_loss(b))


def _erasediff(b: MethodBatch) -> MethodTerms:
    """The forget term is the loss towards uniform noise ``u = rand(x0.shape)`` (fp32), drawn after the passes."""
    retain = _retain_loss(b)
    pred_a = b.predict(b.noised(forget=True), b.cond_a)
    target = torch.rand(b.x0.shape, generator=b.generator, device=b.draw_device).to(b.x0.device)
    return MethodTerms(retain, plain_loss(pred_a, target))


# ------------------------------------------------------------------------------------------------ the registry

_lock = threading.Lock()
_METHODS: Dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Add ``spec`` to the table (ValueError if its name is taken, unless ``replace``); returns it."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"spec: expected a MethodSpec, got {type(spec).__name__}")
    with _lock:
        if spec.name in _METHODS and not replace:
            raise ValueError(f"method {spec.name!r} is already registered (pass replace=True to replace it)")
        _METHODS[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method from the table (KeyError if it is not there)."""
    with _lock:
        del _METHODS[name]


def method_names() -> Tuple[str, ...]:
    """Every registered method name, in registration order (the built-ins first)."""
    return tuple(_METHODS)


def get_method(name: str) -> MethodSpec:
    """The record of ``name``; ValueError naming the known methods otherwise."""
    spec = _METHODS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"method: expected one of {method_names()}, got {name!r}")
    return spec


def _join(names: Tuple[str, ...]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def check_method_params(name: str, *, lambd: Optional[float], weight_clip: Optional[float],
                        retain_source: str) -> MethodSpec:
    """Which parameters ``name`` takes and their ranges: ValueError ``"<param>: <what is valid>"`` otherwise.

    ``lambd`` must be a real number already (or None); the value checks of ``weight_clip`` are the caller's.
    """
    spec = get_method(name)
    if lambd is not None:
        if spec.lambd is None:
            takers = tuple(n for n, s in _METHODS.items() if s.lambd is not None)
            raise ValueError(f"lambd: only {_join(takers)} take it, not {name!r}")
        if lambd not in spec.lambd:
            raise ValueError(f"lambd: expected {spec.lambd.describe('lambd')} for method {name!r}, got {lambd!r}")
    if weight_clip is not None and not spec.weight_clip:
        takers = tuple(n for n, s in _METHODS.items() if s.weight_clip)
        raise ValueError(f"weight_clip: only {_join(takers)} takes it, not {name!r}")
    if retain_source not in RETAIN_SOURCES:
        raise ValueError(f"retain_source: expected one of {RETAIN_SOURCES}, got {retain_source!r}")
    if retain_source == "full" and not spec.full_retain:
        takers = tuple(n for n, s in _METHODS.items() if s.full_retain)
        raise ValueError(f"retain_source: 'full' applies to {', '.join(takers)}, not {name!r} (use 'complement')")
    return spec


def methods_markdown() -> str:
    """The table of the module docstring, written from the records (one row per registered method)."""
    rows = [("method", "retain term (G_x)", "forget term (G_a)", "passes", "rule")]
    for spec in _METHODS.values():
        retain, forget, passes = spec.summary
        rows.append((f"`{spec.name}`", retain, forget, str(passes), f"`{spec.rule}`" if spec.rule else "None"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


_LAMBD_CLOSED = Interval(0.0, 1.0)
_LAMBD_OPEN = Interval(0.0, 1.0, low_open=True, high_open=True)

for _spec in (
    MethodSpec("siss", _siss, "rescale", lambd=_LAMBD_CLOSED, weight_clip=True, full_retain=True, partitioned=True,
               build=_build_siss, summary=("w_x L(eps_theta(m), eps_x)", "w_a L(eps_theta(m), eps_a)", 1)),
    MethodSpec("siss_nois", _siss_nois, "rescale", full_retain=True,
               summary=("L(eps_theta(x_t), eps)", "L(eps_theta(a_t), eps)", 2)),
    MethodSpec("naive", _naive, None, summary=("L(eps_theta(x_t), eps)", "none", 1)),
    MethodSpec("neggrad", _neggrad, "rescale", full_retain=True, has_retain=False,
               summary=("none", "L(eps_theta(a_t), eps)", 1)),
    MethodSpec("erasediff", _erasediff, "erasediff",
               summary=("L(eps_theta(x_t), eps)", "L(eps_theta(a_t), u), u ~ U[0, 1)", 2)),
    MethodSpec("bernoulli", _bernoulli, "rescale", lambd=_LAMBD_OPEN, full_retain=True,
               summary=("1{not mask}/(1-lambd) L(eps_theta(m), eps)", "1{mask} L(eps_theta(m), eps)", 1)),
):
    register_method(_spec)
del _spec
