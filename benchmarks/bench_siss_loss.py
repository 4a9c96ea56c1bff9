"""Benchmark of the fused SISS loss (SPEC §4): forward, backward and forward+backward, every provider side by side.

    python benchmarks/bench_siss_loss.py [--device cpu|cuda] [--quick] [--full] [--tiny] [--out results/x.json]

Providers (one row each; unavailable ones are listed with the reason):

* ``research-eager``: :func:`siss_fast.testing.research_siss_loss`, the research code's eager formulation, in the
  inputs' dtype (diffusers casts the schedule to the sample dtype); the loss is ``loss_x - 0.5 * loss_a``.
* ``compiled-ref``: ``torch.compile`` of :func:`plain_reference_loss`, the reference math
  (:func:`siss_fast.reference.siss_loss_forward`) in plain torch ops with plain autograd. The public API goes through
  ``siss_fast::`` custom ops, which inductor cannot fuse into, so the compiled baseline calls the reference directly.
* every registered backend (``siss_fast.backends.backend_names()``: ``torch``, ``cpp``, ``triton``, ``cuda``): the
  public API ``sf.siss_loss`` with ``sf.set_backend(name)``.

Logical bytes: forward reads pred, noisy, x0, a0; backward reads the same four and writes grad; forward+backward is
the sum of the two passes. Speed target (CPU, 2 threads, 16x4x64x64 fp32, forward+backward): ``cpp`` at least 4x
faster than research-eager and 1.2x faster than compiled-ref.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
import kernel_bench as K  # noqa: E402
import torch  # noqa: E402

OP = "siss_loss"
PROVIDERS = K.kernel_providers()  # research-eager, compiled-ref, then every registered backend
MODES = ("forward", "backward", "forward+backward")
LAMBD = 0.5
FORGET_SCALE = 0.5  # loss = loss_x - FORGET_SCALE * loss_a, what the backward differentiates

TARGETS = (
    H.Target(OP, "16x4x64x64", "fp32", "forward+backward", "cpp", "research-eager", 4.0, device="cpu"),
    H.Target(OP, "16x4x64x64", "fp32", "forward+backward", "cpp", "compiled-ref", 1.2, device="cpu"),
)


def plain_reference_loss(pred, noisy, x0, a0, gamma, sigma, lambd: float):
    """The reference SISS loss in plain torch ops (no custom op): ``(mean ell_x, mean ell_a, w_x, w_a)``.

    The weights depend on noisy, x0, a0 only, so plain autograd w.r.t. pred gives SPEC §4's gradient.
    """
    from siss_fast import reference

    # The reference math on its fast path, in plain fp32 torch ops: per-sample sums (delta as one sum of per-element
    # differences) and the reference's log-space weights. The reference backend adds exactness work on top (an fp64
    # numerator for m - gamma*x, an fp64 fallback for sums that overflow) that inductor need not reproduce here;
    # torch 2.13 inductor also fails to compile that fallback on the CPU (its C++ mixes int and float vector masks).
    view = (-1,) + (1,) * (pred.dim() - 1)
    g, s = gamma.view(view), sigma.view(view)
    d = pred[0].numel()
    res_x = pred - (noisy - g * x0) / s
    res_a = pred - (noisy - g * a0) / s
    delta = (g * (a0 - x0) * (2 * noisy - g * (x0 + a0))).flatten(1).sum(1) / (2 * sigma * sigma)
    sums = torch.stack([delta, res_x.square().flatten(1).sum(1), res_a.square().flatten(1).sum(1)])
    w_x, w_a = reference.weights_from_delta(sums[0], lambd, None)
    return (w_x * (sums[1] / d)).mean(), (w_a * (sums[2] / d)).mean(), w_x, w_a


def research_eager_loss(pred, noisy, x0, a0, gamma, sigma, lambd: float):
    """The research code's formulation, schedule coefficients in the inputs' dtype as the research code has them."""
    from siss_fast.testing import research_siss_loss

    dtype = noisy.dtype
    return research_siss_loss(pred, noisy, x0, a0, gamma.to(dtype), sigma.to(dtype), lambd)


def public_loss(pred, noisy, x0, a0, gamma, sigma, lambd: float):
    import siss_fast as sf

    terms = sf.siss_loss(pred, noisy, x0, a0, gamma, sigma, lambd)
    return terms.loss_x, terms.loss_a, terms.weight_x, terms.weight_a


def logical_bytes(mode: str, numel: int, itemsize: int) -> int:
    tensors = {"forward": 4, "backward": 5, "forward+backward": 9}[mode]
    return tensors * numel * itemsize


def mode_callables(loss_fn: Callable, inputs: Tuple[torch.Tensor, ...], pred: torch.Tensor,
                   before: Callable[[], None] = lambda: None) -> Dict[str, Callable[[], object]]:
    """The three timed callables of one provider: forward (pred needs no grad), backward (of a graph built once,
    retained), forward+backward. ``before`` runs first in each call (selects the backend)."""
    def forward():
        before()
        return loss_fn(pred, *inputs, LAMBD)

    pred_g = pred.detach().clone().requires_grad_(True)
    before()
    loss_x, loss_a, _, _ = loss_fn(pred_g, *inputs, LAMBD)
    total = loss_x - FORGET_SCALE * loss_a

    def backward():
        before()
        return torch.autograd.grad(total, pred_g, retain_graph=True)

    def forward_backward():
        before()
        lx, la, _, _ = loss_fn(pred_g, *inputs, LAMBD)
        return torch.autograd.grad(lx - FORGET_SCALE * la, pred_g)

    return {"forward": forward, "backward": backward, "forward+backward": forward_backward}


def build_cases(shape: Tuple[int, ...], dtype: torch.dtype, plan: K.Plan) -> List[H.Case]:
    from siss_fast.testing import make_case

    device = plan.device
    c = make_case(shape, dtype=dtype, device=device, seed=0)
    pred = c["pred"]
    inputs = (c["noisy"], c["x0"], c["a0"], c["gamma"], c["sigma"])
    numel = pred.numel()
    per_mode: Dict[str, Dict[str, Callable[[], object]]] = {m: {} for m in MODES}
    skipped: Dict[str, str] = {}
    interpreted: List[str] = []
    notes: Dict[str, str] = {}

    def add(provider: str, build: Callable[[], Dict[str, Callable[[], object]]]) -> None:
        try:
            fns = build()
        except Exception as exc:  # noqa: BLE001 - a provider that cannot even set up is an error row
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
            for m in MODES:
                per_mode[m][provider] = _raiser(msg)
            return
        for m in MODES:
            per_mode[m][provider] = fns[m]

    for provider in plan.providers:
        if provider == "research-eager":
            add(provider, lambda: mode_callables(research_eager_loss, inputs, pred))
        elif provider == "compiled-ref":
            compiled = K.compiled_reference(plain_reference_loss, plan, notes)
            add(provider, lambda: mode_callables(compiled, inputs, pred))
        elif K.admit_backend(provider, device, numel, skipped, interpreted):
            add(provider, lambda p=provider: mode_callables(public_loss, inputs, pred, lambda: K.use_backend(p)))
    K.use_backend("auto")

    cases = []
    for mode in plan.modes:
        cases.append(H.Case(
            op=OP, shape=H.shape_name(shape), dtype=H.dtype_name(dtype), mode=mode,
            logical_bytes=logical_bytes(mode, numel, pred.element_size()),
            fns=per_mode[mode], skipped=dict(skipped), interpreted=tuple(interpreted), notes=dict(notes),
        ))
    return cases


def _raiser(msg: str) -> Callable[[], object]:
    def fail():
        raise RuntimeError(msg)

    return fail


def main(argv=None) -> int:
    return K.bench_main("siss_loss benchmark", "bench_siss_loss", PROVIDERS, MODES, build_cases, TARGETS, argv)


if __name__ == "__main__":
    sys.exit(main())
