"""Fresh seeds: the ``torch.Generator`` seeds verify draws from, disjoint from every seed the run's validation used.

The run's seeds come from its manifest (``validation_seeds``: the engine sampler's chunk seeds and the seeds each
metric declares, :func:`siss_fast.metrics.registry.metric_seeds`) or, for a manifest without that record, from its
config by the same rule (:func:`siss_fast.engine.run_record.validation_seeds`). Verify's own seeds, for a base
seed ``S``, ``N`` samples in chunks of ``B`` (``SAMPLER_SEED_STRIDE`` = 100003)::

    samples           S * 100003 + i,  i < ceil(N / B)   (the one sampler's chunk seeds: ddim_sample(seed=S); a
                                                         Stable Diffusion run: the same for every forget prompt
                                                         and every perturbed prompt -- paired comparisons)
    membership eps    S * 100003 + 99999
    retain_fit eps    S * 100003 + 99998
    feature_fd        S * 100003 + 99996 and 99997      (samples' features, retain set's features)
    relearn batches   S * 100003 + 99995
    prompt noise      S * 100003 + 99994                (the perturbation probe's text-embedding noise)

:func:`choose_seed` takes the smallest ``S >= 1`` whose set is disjoint from the run's; a seed given by the user
that collides is refused (:class:`~.integrity.VerifyError`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ..engine.run_record import SAMPLER_SEED_STRIDE, validation_seeds
from .integrity import VerifyError

__all__ = ["run_seeds", "verify_seeds", "choose_seed"]

OFFSETS = {"membership": 99999, "retain_fit": 99998, "feature_fd": 99996, "relearn": 99995, "perturb": 99994}


def run_seeds(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """The run's validation seeds: the manifest's record, else derived from its config (then ``"derived": True``)."""
    record = manifest.get("validation_seeds")
    if record is not None:
        return {"undeclared": [], **record, "derived": False}
    return {**validation_seeds(manifest.get("config") or {}, len(manifest.get("forget_items") or [])),
            "derived": True}


def verify_seeds(seed: int, samples: int, batch_size: int) -> Dict[str, List[int]]:
    """Every generator seed verify draws from with base seed ``seed`` (module doc)."""
    if samples >= SAMPLER_SEED_STRIDE // 2 * batch_size:
        raise VerifyError(f"--samples {samples}: too many chunks for the seed layout")
    base = seed * SAMPLER_SEED_STRIDE
    chunks = -(-samples // batch_size)
    out = {"samples": [base + i for i in range(chunks)]}
    out.update({name: [base + off] for name, off in OFFSETS.items()})
    out["feature_fd"].append(base + OFFSETS["feature_fd"] + 1)
    return out


def choose_seed(used: List[int], samples: int, batch_size: int, seed: Optional[int] = None) -> int:
    """``seed`` if its generator seeds avoid ``used`` (else :class:`VerifyError`), or the smallest such ``S >= 1``."""
    taken = set(int(u) for u in used)

    def clash(s: int) -> List[int]:
        return sorted(taken.intersection(x for xs in verify_seeds(s, samples, batch_size).values() for x in xs))

    if seed is not None:
        hit = clash(seed)
        if hit:
            raise VerifyError(f"--seed {seed}: its generator seeds {hit[:4]} were used by the run's validation; "
                              "choose another seed (or leave --seed out)")
        return seed
    s = 1
    while clash(s):
        s += 1
    return s
