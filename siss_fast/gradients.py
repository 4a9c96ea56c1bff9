"""Combining the retain and forget gradients once per optimizer step (SPEC §6): :class:`GradientCombiner`.

Every method of SPEC §5 yields a *retain* term (gradient ``G_x``) and a *positive* forget term (gradient ``G_a``),
each summed over the micro-batches of one optimizer step (and over data-parallel ranks). The step direction is
``G = G_x + f * G_a`` with the signed *forget coefficient* ``f`` of the rule (``rescale``, ``clip`` or
``erasediff``; ``c`` is ``scaling_norm``), then ``G`` is clipped to ``max_grad_norm`` exactly as
:func:`torch.nn.utils.clip_grad_norm_` does. The formulas and their stabilisation (the ``max_forget_scale`` cap,
the forget part dropped when ``||G_a||`` is zero or non-finite, ``scaling_norm="auto"``) are stated in
:mod:`siss_fast.gradient_rules`, which computes them; capped and dropped steps are counted (``capped_steps``,
``dropped_forget_steps``), ``auto``'s ``c`` is :attr:`GradientCombiner.scaling_norm`, saved by
:meth:`GradientCombiner.state_dict`.

``||G||`` non-finite: the step is *skipped*: every ``.grad`` is set to ``None`` (nothing can reach the weights even
if the caller steps anyway), :attr:`StepInfo.skipped` is True so the caller skips ``optimizer.step()``, counted in
``skipped_steps``.

Modes and memory (a "buffer" is one extra parameter-sized set of tensors, beyond ``.grad`` itself):

* ``exact``, ``accumulation_steps == 1``, rule rescale/clip, ``c`` known: **no buffer**. Backward the forget term
  into ``.grad``, read ``||G_a||``, scale ``.grad`` in place by ``f``, backward the retain term on top (autograd
  accumulates). ``||G_x||`` is never materialised, so :attr:`StepInfo.norm_x` is ``None``; the total norm is logged.
* ``exact`` otherwise (accumulation > 1, ``erasediff`` which needs ``<G_x, G_a>``, or the first step of ``auto``):
  **one buffer**. During each forget backward every ``p.grad`` is swapped with its buffer slot (swapping references
  is free), so ``G_a`` accumulates in the buffer and ``G_x`` in ``.grad``; :meth:`GradientCombiner.finish_step`
  combines in place (``p.grad += f * buffer``) and frees the buffer. ``norm_x`` and ``norm_a`` are both logged.
* ``lagged`` (an **approximation**): one backward per micro-batch of ``retain + f_last * forget`` with the
  coefficient of the last exact step; a step is exact (re-measured) on the first step, every ``lag_every`` steps,
  and after a step whose measurement dropped the forget part or was skipped. On lagged steps ``norm_a`` is ``None``
  and a NaN forget loss skips the step (the two terms cannot be told apart). With ``lag_every=1`` it is ``exact``.

Host synchronisations: one per step (the total norm), plus one between the two backward passes on the no-buffer
path (``||G_a||`` decides the in-place scale).

Distributed: the rules need the gradients *summed over ranks* (SPEC §6), so they must be global when read.

* ``DistributedDataParallel``: DDP all-reduces ``.grad`` during each backward (linear, so re-averaging already
  identical accumulated values changes nothing) and local norms are global: keep the defaults. Caveat: DDP does not
  support two backward passes through one forward (pytorch/pytorch#47260, "mark a variable ready only once"), which
  the exact mode does when both terms come from one forward (``siss``); use separate forwards per term, the
  ``lagged`` mode (one backward), or the next option.
* ``average_grads=True``: the model is replicated but *not* DDP-wrapped; the combiner averages gradients over
  ``process_group`` itself: ``G_a`` (or the buffer) before ``||G_a||`` is read, and ``.grad`` at the end of the step.
  Averaging ``f * G_a + g_x,local`` is exact because ``f * G_a`` is already identical on every rank. Cost: one
  parameter-sized all-reduce per term per optimizer step (not per micro-batch), not overlapped with backward.
* ``distributed_norm=True``: parameters are *sharded* (each rank holds a disjoint slice, ZeRO/FSDP-style, gradients
  already reduced): squared norms and dot products are all-reduced (SUM) over ``process_group``.

Only a world of one process is exercised by the test suite.

Extension point: each term given to :meth:`GradientCombiner.backward` is either a scalar loss tensor or a callable
``term(weight: float) -> None`` that must accumulate ``weight * d(term)/d(params)`` into the parameters' ``.grad``
with its own backward pass (e.g. ``torch.autograd.backward(pred, grad_tensors=weight * cotangent)``). The combiner
only decides where that gradient lands and with which weight, so a partitioned backward (per-sample cotangents)
plugs in without changing this module.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .gradient_rules import RULES, auto_scaling_norm, clip_factor, forget_coef, positive_finite
from .gradient_tensors import Term, average_over_ranks, check_term, global_dot, global_norm, run_term, scaled

__all__ = ["RULES", "MODES", "StepInfo", "GradientCombiner"]

MODES = ("exact", "lagged")


@dataclass
class StepInfo:
    """What :meth:`GradientCombiner.finish_step` did, as plain Python values for logging.

    ``forget_coef`` is the signed ``f`` in ``G = G_x + f * G_a`` (0.0 when dropped or without a forget term).
    ``norm_x`` / ``norm_a`` are ``None`` where that path does not measure them (see the module docstring).
    ``total_norm`` is ``||G||`` before clipping (non-finite when ``skipped``); ``clip_coef`` the factor applied.
    ``extra_buffers`` is the number of parameter-sized buffers this step held (0 or 1).
    """

    step: int
    path: str  # "direct" (no buffer), "buffered" (one buffer) or "lagged"
    norm_x: Optional[float]
    norm_a: Optional[float]
    forget_coef: float
    scaling_norm: Optional[float]
    total_norm: float
    clip_coef: float
    capped: bool
    dropped_forget: bool
    skipped: bool
    extra_buffers: int

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class GradientCombiner:
    """Combine retain and forget gradients per SPEC §6; see the module docstring for modes and memory.

    Usage, once per optimizer step::

        for micro_batch in range(accumulation_steps):
            combiner.backward(retain_loss, forget_loss)   # either may be None (naive: no forget; neggrad: no retain)
        info = combiner.finish_step()                     # combine, clip; .grad now holds G
        if not info.skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)             # optional: frees G early

    The combiner owns ``.grad`` from the first :meth:`backward` of a step to :meth:`finish_step`: any gradient
    present when a step begins is discarded (set to ``None``). The forget loss is *positive* (the quantity whose
    gradient is ``G_a``); the rule supplies the sign.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        rule: str = "rescale",
        *,
        scaling_norm: Union[float, str, None] = 1.0,
        max_forget_scale: Optional[float] = 1e4,
        max_grad_norm: Optional[float] = 1.0,
        mode: str = "exact",
        lag_every: int = 10,
        eta: float = 0.1,
        accumulation_steps: int = 1,
        auto_steps: int = 1,
        average_grads: bool = False,
        distributed_norm: bool = False,
        process_group: Any = None,
    ) -> None:
        self.params: List[Tensor] = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("params: expected at least one tensor with requires_grad=True, got none")
        if rule not in RULES:
            raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if rule != "erasediff":
            if scaling_norm != "auto" and not positive_finite(scaling_norm):
                raise ValueError(f"scaling_norm: expected a finite float > 0 or 'auto', got {scaling_norm!r}")
        for name, value in (("max_forget_scale", max_forget_scale), ("max_grad_norm", max_grad_norm)):
            if value is not None and not positive_finite(value):
                raise ValueError(f"{name}: expected a finite float > 0 or None, got {value!r}")
        for name, value in (("lag_every", lag_every), ("accumulation_steps", accumulation_steps),
                            ("auto_steps", auto_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta: expected a finite float >= 0, got {eta!r}")

        self.rule = rule
        self.mode = mode
        self.auto_scaling = rule != "erasediff" and scaling_norm == "auto"
        self._c: Optional[float] = None if (rule == "erasediff" or self.auto_scaling) else float(scaling_norm)
        self.auto_steps = auto_steps
        self._auto_norms: List[float] = []  # ||G_x|| of the steps auto has measured so far
        self.max_forget_scale = None if max_forget_scale is None else float(max_forget_scale)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.lag_every = lag_every
        self.eta = float(eta)
        self.accumulation_steps = accumulation_steps
        if average_grads and distributed_norm:
            raise ValueError("average_grads, distributed_norm: expected at most one (replicated or sharded), got both")
        self.average_grads = bool(average_grads)
        self.distributed_norm = bool(distributed_norm)
        self.process_group = process_group

        # Counters (saved by state_dict).
        self.step = 0
        self.skipped_steps = 0
        self.dropped_forget_steps = 0
        self.capped_steps = 0
        self.peak_extra_buffers = 0
        # Lagged mode: last measured coefficient (None = measure on the next step) and its age in steps.
        self._lagged_coef: Optional[float] = None
        self._steps_since_measure = 0

        self._reset_step_state()

    # ------------------------------------------------------------------ public API

    @property
    def _auto_measuring(self) -> bool:
        """``auto`` still collecting ``||G_x||`` (the step takes the buffered path, which measures it)."""
        return self.auto_scaling and len(self._auto_norms) < self.auto_steps

    @property
    def scaling_norm(self) -> Optional[float]:
        """``c`` in use (``None`` for erasediff, or while ``auto`` has not measured it yet)."""
        return self._c

    @property
    def extra_buffers(self) -> int:
        """Parameter-sized buffers held right now (0 or 1)."""
        return int(self._buffer is not None and any(b is not None for b in self._buffer))

    def backward(self, retain_loss: Optional[Term] = None, forget_loss: Optional[Term] = None) -> None:
        """Run the backward pass(es) of one micro-batch, routing each gradient where the step's path needs it.

        ``retain_loss``: scalar tensor (or callable, see the module docstring) whose gradient is ``G_x``.
        ``forget_loss``: the *positive* forget term, gradient ``G_a``. A tensor that does not require grad
        contributes a zero gradient. Which terms are present must not change within a step.
        """
        has_retain, has_forget = retain_loss is not None, forget_loss is not None
        if not (has_retain or has_forget):
            raise ValueError("backward: expected retain_loss, forget_loss or both, got neither")
        for name, term in (("retain_loss", retain_loss), ("forget_loss", forget_loss)):
            if term is not None:
                check_term(name, term)
        if self._micro == 0:
            self._begin_step(has_retain, has_forget)
        elif (has_retain, has_forget) != (self._has_retain, self._has_forget):
            raise ValueError(
                "backward: the terms present must not change within a step: expected "
                f"(retain, forget) = {(self._has_retain, self._has_forget)}, got {(has_retain, has_forget)}"
            )
        if self._micro >= self.accumulation_steps:
            raise RuntimeError(
                f"backward: called more than accumulation_steps={self.accumulation_steps} times in one step; "
                "call finish_step() first"
            )
        self._micro += 1
        if self._path == "lagged":
            self._backward_lagged(retain_loss, forget_loss)
        elif self._path == "direct":
            self._backward_direct(retain_loss, forget_loss)
        else:
            self._backward_buffered(retain_loss, forget_loss)

    def finish_step(self) -> StepInfo:
        """Combine ``G = G_x + f * G_a`` into ``.grad``, check finiteness, clip; return what happened."""
        if self._micro == 0:
            raise RuntimeError("finish_step: no backward() since the last step")
        path = self._path
        extra = self.extra_buffers
        if self.average_grads:
            if self._buffer is not None:
                self._average_over_ranks(self._buffer)
            self._average_over_ranks(None)
        if path == "buffered":
            self._combine_buffered()
        elif path == "lagged":
            self._coef = self._lagged_coef if self._has_forget else 0.0

        total = self._global_norm([p.grad for p in self.params if p.grad is not None])
        skipped = not math.isfinite(total)
        clip_coef = 1.0
        if skipped:
            self._clear_grads()
            self.skipped_steps += 1
        elif self.max_grad_norm is not None:
            clip_coef = clip_factor(self.max_grad_norm, total)
            if clip_coef < 1.0:
                grads = [p.grad for p in self.params if p.grad is not None]
                torch._foreach_mul_(grads, clip_coef)

        if self._dropped:
            self.dropped_forget_steps += 1
        if self._capped:
            self.capped_steps += 1
        if self.mode == "lagged":
            if path == "lagged":
                self._steps_since_measure += 1
            elif skipped or self._dropped or not self._has_forget:
                self._lagged_coef = None  # measure again on the next step
            else:
                self._lagged_coef = self._coef
                self._steps_since_measure = 1

        info = StepInfo(
            step=self.step,
            path=path,
            norm_x=self._norm_x,
            norm_a=self._norm_a,
            forget_coef=float(self._coef),
            scaling_norm=self._c,
            total_norm=total,
            clip_coef=clip_coef,
            capped=self._capped,
            dropped_forget=self._dropped,
            skipped=skipped,
            extra_buffers=extra,
        )
        self.step += 1
        self._reset_step_state()
        return info

    def state_dict(self) -> Dict[str, Any]:
        """Everything that must survive a checkpoint: ``auto``'s ``c``, the lagged coefficient, counters."""
        if self._micro != 0:
            raise RuntimeError("state_dict: a step is in progress; call finish_step() first")
        return {
            "rule": self.rule,
            "scaling_norm": self._c,
            "auto_norms": list(self._auto_norms),
            "lagged_coef": self._lagged_coef,
            "steps_since_measure": self._steps_since_measure,
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "dropped_forget_steps": self.dropped_forget_steps,
            "capped_steps": self.capped_steps,
            "peak_extra_buffers": self.peak_extra_buffers,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The rule must match (the coefficient's meaning depends on it)."""
        if state.get("rule") != self.rule:
            raise ValueError(f"state: expected rule {self.rule!r}, got {state.get('rule')!r}")
        self._c = None if state["scaling_norm"] is None else float(state["scaling_norm"])
        old = [] if self._c is None else [10 * self._c] * self.auto_steps  # a state from before auto_steps: c fixed
        self._auto_norms = [float(v) for v in state.get("auto_norms", old)]
        self._lagged_coef = None if state["lagged_coef"] is None else float(state["lagged_coef"])
        self._steps_since_measure = int(state["steps_since_measure"])
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.dropped_forget_steps = int(state["dropped_forget_steps"])
        self.capped_steps = int(state["capped_steps"])
        self.peak_extra_buffers = int(state["peak_extra_buffers"])
        self._reset_step_state()

    # ------------------------------------------------------------------ per-step state

    def _reset_step_state(self) -> None:
        self._micro = 0
        self._path = ""
        self._has_retain = self._has_forget = False
        self._buffer: Optional[List[Optional[Tensor]]] = None
        self._norm_x: Optional[float] = None
        self._norm_a: Optional[float] = None
        self._coef = 0.0
        self._capped = False
        self._dropped = False

    def _begin_step(self, has_retain: bool, has_forget: bool) -> None:
        if self.auto_scaling and self._c is None and not has_retain:
            raise ValueError("scaling_norm='auto' needs a retain term on its first step (c = 0.1 * ||G_x||)")
        self._has_retain, self._has_forget = has_retain, has_forget
        self._clear_grads()
        lagged = (
            self.mode == "lagged"
            and self._lagged_coef is not None
            and self._steps_since_measure < self.lag_every
            and not self._auto_measuring
        )
        if lagged:
            self._path = "lagged"
        elif self.accumulation_steps == 1 and self.rule != "erasediff" and self._c is not None \
                and not self._auto_measuring:
            self._path = "direct"
        else:
            self._path = "buffered"
            # Swap only when both terms are present; a lone term accumulates straight into .grad.
            if has_retain and has_forget:
                self._buffer = [None] * len(self.params)

    # ------------------------------------------------------------------ the three paths

    def _backward_direct(self, retain: Optional[Term], forget: Optional[Term]) -> None:
        """No buffer: G_a into .grad, scale in place by f, G_x accumulated on top (accumulation_steps == 1)."""
        if forget is not None:
            run_term(forget, 1.0, retain_graph=retain is not None)
            if self.average_grads:
                self._average_over_ranks(None)
            norm_a = self._global_norm([p.grad for p in self.params if p.grad is not None])
            self._norm_a = norm_a
            self._coef, self._capped, self._dropped = self._forget_coef(norm_a, None)
            grads = [p.grad for p in self.params if p.grad is not None]
            if self._dropped:
                self._clear_grads()  # G_a may hold inf/NaN: 0 * NaN is NaN, so drop the tensors instead
            elif grads:
                torch._foreach_mul_(grads, self._coef)
        if retain is not None:
            run_term(retain, 1.0, retain_graph=False)

    def _backward_buffered(self, retain: Optional[Term], forget: Optional[Term]) -> None:
        """One buffer: the forget backward accumulates into the buffer (swapped into .grad), G_x into .grad."""
        if forget is not None:
            if self._buffer is None:
                run_term(forget, 1.0, retain_graph=retain is not None)
            else:
                self._swap_buffer()
                try:
                    run_term(forget, 1.0, retain_graph=retain is not None)
                finally:
                    self._swap_buffer()
                self.peak_extra_buffers = max(self.peak_extra_buffers, self.extra_buffers)
        if retain is not None:
            run_term(retain, 1.0, retain_graph=False)

    def _backward_lagged(self, retain: Optional[Term], forget: Optional[Term]) -> None:
        """Approximation: one backward of ``retain + f_last * forget`` (two if a term is a callable)."""
        f = self._lagged_coef
        if isinstance(retain, Tensor) and isinstance(forget, Tensor):
            total = scaled(retain, 1.0) + scaled(forget, f)
            if total.requires_grad:
                total.backward()
            return
        if forget is not None:
            run_term(forget, f, retain_graph=retain is not None)
        if retain is not None:
            run_term(retain, 1.0, retain_graph=False)

    def _combine_buffered(self) -> None:
        """Buffered path at the end of the step: measure, set ``c`` if auto, ``.grad += f * G_a``."""
        swapped = self._buffer is not None
        if self._has_retain:
            self._norm_x = self._global_norm([p.grad for p in self.params if p.grad is not None])
            if self._auto_measuring and math.isfinite(self._norm_x) and self._norm_x > 0:
                self._auto_norms.append(self._norm_x)
                self._c = auto_scaling_norm(self._auto_norms)
        if not self._has_forget:
            return
        if swapped:
            pairs = [(p, b) for p, b in zip(self.params, self._buffer) if b is not None]
        else:  # forget-only step: G_a is in .grad, G_x = 0
            pairs = [(p, p.grad) for p in self.params if p.grad is not None]
        forget_grads = [b for _, b in pairs]
        self._norm_a = self._global_norm(forget_grads)
        dot = None
        if self.rule == "erasediff" and self._has_retain and positive_finite(self._norm_a):
            dot = self._global_dot([p.grad for p, _ in pairs], forget_grads)
        self._coef, self._capped, self._dropped = self._forget_coef(self._norm_a, dot)
        if swapped:
            if not self._dropped:
                for p, b in pairs:
                    if p.grad is None:
                        p.grad = b.mul_(self._coef)
                    else:
                        p.grad.add_(b, alpha=self._coef)
            self._buffer = None
        elif self._dropped:
            self._clear_grads()
        elif forget_grads:
            torch._foreach_mul_(forget_grads, self._coef)

    # ------------------------------------------------------------------ formulas and reductions (delegated)

    def _forget_coef(self, norm_a: float, dot: Optional[float]):
        """Signed f of ``G = G_x + f * G_a``, and (capped, dropped): :func:`~siss_fast.gradient_rules.forget_coef`."""
        return forget_coef(self.rule, norm_a, dot, scaling_norm=self._c, eta=self.eta,
                           max_forget_scale=self.max_forget_scale)

    def _global_norm(self, tensors: Sequence[Tensor]) -> float:
        return global_norm(tensors, self.params[0].device, distributed=self.distributed_norm,
                           group=self.process_group)

    def _global_dot(self, xs: Sequence[Optional[Tensor]], ys: Sequence[Tensor]) -> float:
        return global_dot(xs, ys, distributed=self.distributed_norm, group=self.process_group)

    def _average_over_ranks(self, slots: Optional[List[Optional[Tensor]]]) -> None:
        average_over_ranks(self.params, slots, self.process_group)

    def _swap_buffer(self) -> None:
        buffer = self._buffer
        for i, p in enumerate(self.params):
            buffer[i], p.grad = p.grad, buffer[i]

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None
