"""The tensor work of :class:`siss_fast.gradients.GradientCombiner`: running terms, norms, dots, rank averaging.

* Terms: a term given to :meth:`~siss_fast.gradients.GradientCombiner.backward` is a scalar floating loss tensor
  or a callable ``term(weight)`` (see the extension point in :mod:`siss_fast.gradients`); :func:`check_term`
  validates one, :func:`run_term` accumulates ``weight * d(term)/d(params)`` into the parameters' ``.grad``.
* :func:`global_norm` / :func:`global_dot`: ``||G||`` and ``<x, y>`` over all of a model's gradient tensors,
  accumulated in fp32 (fp64 if any tensor is fp64), returned as Python floats (one host synchronisation each);
  with ``distributed=True`` the squared norm / dot is summed over the ranks of ``group`` first (sharded
  parameters, each rank holding a disjoint slice).
* :func:`average_over_ranks`: averages replicated gradients over ``group`` in place (no-op without an
  initialised process group).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = ["Term", "check_term", "run_term", "scaled", "global_norm", "global_dot", "all_reduce_sum",
           "average_over_ranks"]

# A term of GradientCombiner.backward: a scalar loss, or a callable that accumulates weight * its gradient itself.
Term = Union[Tensor, Callable[[float], None]]


def scaled(loss: Tensor, weight: float) -> Tensor:
    """``weight * loss`` (``loss`` itself for weight 1: no extra node in the graph)."""
    return loss if weight == 1.0 else loss * weight


def check_term(name: str, term: Any) -> None:
    """Raise unless ``term`` is a scalar floating tensor or a callable (``name`` goes into the message)."""
    if isinstance(term, Tensor):
        if term.numel() != 1:
            raise ValueError(f"{name}: expected a scalar tensor, got shape {tuple(term.shape)}")
        if not term.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {term.dtype}")
    elif not callable(term):
        raise TypeError(f"{name}: expected a scalar Tensor or a callable(weight), got {type(term).__name__}")


def run_term(term: Term, weight: float, retain_graph: bool) -> None:
    """Accumulate ``weight * d(term)/d(params)`` into ``.grad``. A loss that does not require grad adds nothing."""
    if isinstance(term, Tensor):
        if term.requires_grad:
            scaled(term, weight).backward(retain_graph=retain_graph)
    else:
        term(weight)


def _accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _sum_of_squares(tensors: List[Tensor], acc: torch.dtype) -> Tensor:
    """``sum_p ||t_p||^2`` in dtype ``acc`` for tensors sharing one device and dtype (one fused launch if possible)."""
    try:
        norms = torch._foreach_norm(tensors, 2.0, dtype=acc)
    except (AttributeError, TypeError, RuntimeError):  # older torch: no fused norm with a dtype argument
        norms = [torch.linalg.vector_norm(t, dtype=acc) for t in tensors]
    return torch.stack(norms).square().sum()


def all_reduce_sum(value: Tensor, group: Any = None) -> Tensor:
    """Sum ``value`` over the ranks of ``group`` in place (unchanged without an initialised process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM, group=group)
    return value


def global_norm(tensors: Sequence[Tensor], device: torch.device, *, distributed: bool = False,
                group: Any = None) -> float:
    """``sqrt(sum_p ||t_p||^2)`` accumulated in fp32 (fp64 if any tensor is fp64), over ranks if ``distributed``.

    ``device``: where the zero of an empty list lives (the tensors may span devices and dtypes: one fused norm per
    (device, dtype) group, summed on the first tensor's device).
    """
    if not tensors:
        sq = torch.zeros((), dtype=torch.float64, device=device)
    else:
        acc = _accumulation_dtype(tensors)
        groups: Dict[Any, List[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.device, t.dtype), []).append(t)
        first = tensors[0].device
        parts = [_sum_of_squares(members, acc).to(first) for members in groups.values()]
        sq = torch.stack(parts).sum()
    if distributed:
        sq = all_reduce_sum(sq, group)
    return math.sqrt(sq.item())


def global_dot(xs: Sequence[Optional[Tensor]], ys: Sequence[Tensor], *, distributed: bool = False,
               group: Any = None) -> float:
    """``<x, y> = sum_p sum_i x_p,i * y_p,i`` (a missing ``x_p`` counts as zero), over ranks if ``distributed``."""
    acc = _accumulation_dtype(ys)
    total = torch.zeros((), dtype=acc, device=ys[0].device if ys else None)
    for x, y in zip(xs, ys):
        if x is not None:
            total += torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)).to(total.device)
    if distributed:
        total = all_reduce_sum(total, group)
    return total.item()


def average_over_ranks(params: Sequence[Tensor], slots: Optional[List[Optional[Tensor]]], group: Any = None) -> None:
    """Average ``slots`` (a buffer, one slot per parameter) or, for ``None``, every ``p.grad`` over ``group`` in place.

    A missing gradient becomes zeros first: every rank must enter the same all-reduces.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    dist = torch.distributed
    world = dist.get_world_size(group)
    tensors = []
    for i, p in enumerate(params):
        if slots is None:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            tensors.append(p.grad)
        else:
            if slots[i] is None:
                slots[i] = torch.zeros_like(p)
            tensors.append(slots[i])
    works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True) for t in tensors]
    for work in works:
        work.wait()
    torch._foreach_div_(tensors, float(world))
