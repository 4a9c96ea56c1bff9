"""Proof of deletion: audit a finished unlearning run (``siss-fast verify RUN_DIR``; issue 15).

* :mod:`.integrity` -- the run must be finished, of this version and format, with ``final/`` byte-identical to its
  manifest (:class:`VerifyError` names the file otherwise);
* :mod:`.seeds` -- fresh generator seeds, disjoint from every seed the run's validation used;
* :mod:`.measure` -- per-item forget rates of fresh samples with Clopper-Pearson intervals, quality, membership;
  the pixel run's view (:class:`~.measure.PixelSubject`);
* :mod:`.sd` -- a Stable Diffusion run's view: each item's own prompt, the run's forget rule, latents;
* :mod:`.relearn` -- the relearning probe (retain-only fine-tune of a copy; the base model as the control);
* :mod:`.perturb` -- the prompt perturbation probe (Stable Diffusion runs);
* :mod:`.report` -- ``verify.json``, ``verify.md``, pictures, and the manifest's ``verify`` entry;
* :mod:`.api` -- :func:`verify_run`, the library call behind the command;
* :mod:`.stats` -- the Clopper-Pearson interval and percentiles (plain ``math``).

Pixel-DDPM and Stable Diffusion runs written by the engine.
"""

from .integrity import VerifyError
from .stats import clopper_pearson

__all__ = ["VerifyError", "VerifyResult", "verify_run", "clopper_pearson"]


def __getattr__(name):  # the heavy parts (torch models, diffusers) load on first use
    if name in ("verify_run", "VerifyResult"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
