"""The partitioned split: SISS's exact two-term gradient at about the cost of one backward pass.

The parameter gradient is linear in the per-sample cotangents ``dL/dpred_b``. For a mixture sample the importance
weights are almost always binary: drawn around x0, ``w_a ~ e^(-|Delta|)`` with ``|Delta|`` growing like
``gamma_t^2 / sigma_t^2 * ||x0 - a0||^2``. So a micro-batch splits, *before* the UNet runs, into

* pure retain: ``w_a < tol * w_x`` -- the forget cotangent is negligible (relative ``tol = 1e-12``): one backward
  with the retain cotangent;
* pure forget: ``w_x < tol * w_a`` -- one backward with the forget cotangent;
* mixed: the rest -- backward with both (graph retained between the two).

Each group gets its own forward (so its own graph); the objective's losses are computed on a detached copy of the
concatenated prediction, their cotangents taken with :func:`torch.autograd.grad` (elementwise work only), and
routed group by group into the UNet through the :class:`~siss_fast.gradients.GradientCombiner`'s callable terms:
``retain_term(weight)`` and ``forget_term(weight)`` each accumulate ``weight * cotangent`` backward into ``.grad``.
The combiner decides where each lands (``.grad`` or its buffer) and with which coefficient, exactly as for tensors.

Dropped contributions are below ``tol`` relative to the kept ones of the same sample, so the result equals the
plain two-backward gradient to fp32 precision (tested). Cost: ``B`` sample-backwards plus one per mixed sample,
instead of ``2B``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

import siss_fast as sf

__all__ = ["PartitionedForward", "PURITY_TOL"]

PURITY_TOL = 1e-12


@dataclass
class _Group:
    kind: str  # "retain" | "forget" | "mixed"
    index: Tensor
    pred: Tensor  # graph to the UNet parameters
    uses_left: int  # backward passes still to run through this group's graph


def _slice_kwargs(kwargs: Dict[str, Any], index: Tensor, batch: int) -> Dict[str, Any]:
    return {k: (v[index] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch else v)
            for k, v in kwargs.items()}


class PartitionedForward:
    """A model wrapper for one ``Objective('siss')`` call on one micro-batch.

    ``wrapper = PartitionedForward(unet_call, objective, x0, a0)``; ``terms = objective(wrapper, x0, a0, ...)``;
    then ``retain_term, forget_term = wrapper.terms(terms.retain * s, terms.forget * s)`` are callables for
    ``combiner.backward``. ``counts`` gives the group sizes (for the metrics).
    """

    def __init__(self, unet_call: Callable[..., Tensor], objective: Any, x0: Tensor, a0: Tensor,
                 tol: float = PURITY_TOL):
        self.unet_call, self.objective, self.x0, self.a0, self.tol = unet_call, objective, x0, a0, tol
        self.groups: List[_Group] = []
        self.leaf: Optional[Tensor] = None
        self.counts = {"retain": 0, "forget": 0, "mixed": 0}

    def classify(self, noisy: Tensor, timesteps: Tensor) -> Dict[str, Tensor]:
        obj = self.objective
        gamma, sigma = sf.schedule_coefficients(obj.alphas_cumprod, timesteps)
        with torch.no_grad():
            w_x, w_a = sf.importance_weights(noisy.detach(), self.x0, self.a0, gamma, sigma, obj.lambd,
                                             weight_clip=obj.weight_clip)
        pure_retain = w_a < self.tol * w_x
        pure_forget = w_x < self.tol * w_a
        mixed = ~(pure_retain | pure_forget)  # includes NaN weights: both cotangents, nothing dropped
        return {"retain": pure_retain, "forget": pure_forget, "mixed": mixed}

    def __call__(self, noisy: Tensor, timesteps: Tensor, **kwargs: Any) -> Tensor:
        if self.groups:
            raise RuntimeError("PartitionedForward: one model call per micro-batch (the siss objective)")
        batch = noisy.shape[0]
        preds: Dict[str, Tensor] = {}
        for kind, select in self.classify(noisy, timesteps).items():
            index = select.nonzero().flatten()
            self.counts[kind] = int(index.numel())
            if index.numel() == 0:
                continue
            pred = sf.model_output(self.unet_call(noisy[index], timesteps[index],
                                                  **_slice_kwargs(kwargs, index, batch)))
            uses = 2 if kind == "mixed" else 1
            self.groups.append(_Group(kind, index, pred, uses))
            preds[kind] = pred
        first = next(iter(preds.values()))
        full = torch.empty((batch, *first.shape[1:]), dtype=first.dtype, device=first.device)
        for g in self.groups:
            full[g.index] = g.pred.detach()
        self.leaf = full.requires_grad_(True)
        return self.leaf

    def terms(self, retain: Tensor, forget: Tensor):
        """Cotangents of the two scalar losses w.r.t. the prediction, as two combiner terms."""
        cot_x, cot_a = torch.autograd.grad([retain], [self.leaf], retain_graph=True, allow_unused=True)[0], None
        cot_a = torch.autograd.grad([forget], [self.leaf], allow_unused=True)[0]
        zeros = torch.zeros_like(self.leaf)
        cot_x = zeros if cot_x is None else cot_x
        cot_a = zeros if cot_a is None else cot_a
        self.leaf = None

        def make(cotangent: Tensor, kinds: tuple) -> Callable[[float], None]:
            def term(weight: float) -> None:
                for g in self.groups:
                    if g.kind not in kinds:
                        continue
                    g.uses_left -= 1
                    grad = cotangent[g.index]
                    if weight != 1.0:
                        grad = grad * weight
                    torch.autograd.backward(g.pred, grad_tensors=grad.to(g.pred.dtype),
                                            retain_graph=g.uses_left > 0)
            return term

        return make(cot_x, ("retain", "mixed")), make(cot_a, ("forget", "mixed"))
