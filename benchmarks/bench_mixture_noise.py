"""Benchmark of the mixture forward noising (SPEC §3), forward only, every provider side by side.

    python benchmarks/bench_mixture_noise.py [--device cpu|cuda] [--quick] [--full] [--tiny] [--out results/x.json]

``noisy[b] = gamma[b] * (a0[b] if mask[b] else x0[b]) + sigma[b] * noise[b]``

Providers:

* ``research-eager``: what the research code does: noise both samples (diffusers ``add_noise``, schedule in the
  samples' dtype) and pick one per sample with ``torch.where``.
* ``compiled-ref``: ``torch.compile`` of :func:`siss_fast.reference.mixture_noise` (plain torch ops).
* every registered backend (``siss_fast.backends.backend_names()``: ``torch``, ``cpp``, ``triton``, ``cuda``): the
  public API ``sf.mixture_noise`` with ``sf.set_backend(name)``.

Logical bytes: reads x0, a0, noise, writes noisy (4 tensors).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402
import kernel_bench as K  # noqa: E402
import torch  # noqa: E402

OP = "mixture_noise"
PROVIDERS = K.kernel_providers()  # research-eager, compiled-ref, then every registered backend
MODES = ("forward",)


def research_eager_mixture(x0, a0, noise, gamma, sigma, mask):
    """Two ``add_noise`` calls (schedule cast to the samples' dtype, as diffusers does) and a per-sample select."""
    dtype = x0.dtype
    shape = (-1,) + (1,) * (x0.dim() - 1)
    g, s = gamma.to(dtype).reshape(shape), sigma.to(dtype).reshape(shape)
    noisy_x = g * x0 + s * noise
    noisy_a = g * a0 + s * noise
    return torch.where(mask.reshape(shape), noisy_a, noisy_x)


def reference_mixture(x0, a0, noise, gamma, sigma, mask):
    from siss_fast import reference

    return reference.mixture_noise(x0, a0, noise, gamma, sigma, mask)


def public_mixture(x0, a0, noise, gamma, sigma, mask):
    import siss_fast as sf

    return sf.mixture_noise(x0, a0, noise, gamma, sigma, mask)


def build_cases(shape: Tuple[int, ...], dtype: torch.dtype, plan: K.Plan) -> List[H.Case]:
    from siss_fast.testing import make_case

    device = plan.device
    c = make_case(shape, dtype=dtype, device=device, seed=0)
    args = (c["x0"], c["a0"], c["noise"], c["gamma"], c["sigma"], c["mask"])
    numel = c["x0"].numel()
    fns: Dict[str, Callable[[], object]] = {}
    skipped: Dict[str, str] = {}
    interpreted: List[str] = []
    notes: Dict[str, str] = {}
    for provider in plan.providers:
        if provider == "research-eager":
            fns[provider] = lambda: research_eager_mixture(*args)
        elif provider == "compiled-ref":
            compiled = K.compiled_reference(reference_mixture, plan, notes)
            fns[provider] = lambda f=compiled: f(*args)
        elif K.admit_backend(provider, device, numel, skipped, interpreted):

            def run(p=provider):
                K.use_backend(p)
                return public_mixture(*args)

            fns[provider] = run
    return [H.Case(op=OP, shape=H.shape_name(shape), dtype=H.dtype_name(dtype), mode="forward",
                   logical_bytes=4 * numel * c["x0"].element_size(), fns=fns, skipped=skipped,
                   interpreted=tuple(interpreted), notes=notes)]


def main(argv=None) -> int:
    return K.bench_main("mixture_noise benchmark", "bench_mixture_noise", PROVIDERS, MODES, build_cases, (), argv)


if __name__ == "__main__":
    sys.exit(main())
