"""The lean unlearning engine (layer 4): ``siss-fast unlearn CONFIG [key=value ...]``.

Modules, each readable in one sitting:

* :mod:`.config` -- YAML -> typed dataclasses, overrides, validation before any model loads (:class:`ConfigError`);
* :mod:`.data` -- image folders, prompts, cached VAE latents and text embeddings, seeded sample streams;
* :mod:`.models` -- offline safetensors loading of pixel DDPMs and Stable Diffusion; tiny random-weight builders;
* :mod:`.setup` -- device, processes, optimizer, LR schedule, gradient combiner;
* :mod:`.partition` -- the partitioned split (exact SISS gradient at about one backward);
* :mod:`.step` -- one optimizer step (:class:`~.step.UnlearnStep`), public for custom loops and benchmarks;
* :mod:`.trainer` -- the run between its steps: resume, one step with its record and stop rules, validation,
  checkpoints (:class:`~.trainer.Trainer`);
* :mod:`.loop` -- the run's outline and its outputs (``run``);
* :mod:`.checkpoint` -- atomic, hash-verified checkpoints and RNG states;
* :mod:`.validation` -- DDIM samples with fixed seeds, the metric registry;
* :mod:`.stop_rules` -- the forget target and the quality guard (:class:`~.stop_rules.StopRules`);
* :mod:`.validator` -- rank 0's validation, and which kept state becomes the final model;
* :mod:`.run_record` -- how a run ends on disk (``final/``, then the manifest) and why a finished run stays closed.

Importing this package does not import diffusers or transformers; :func:`unlearn` does.

Reliability (``tests/test_reliability.py``): a killed run resumes from its last complete checkpoint to the same final
weights; a non-finite step is skipped and counted (weights and optimizer state untouched), too many in a row stop the
run; a full disk stops the run with the previous checkpoint intact (:mod:`.checkpoint`); weights are read from
safetensors, pickles only with ``model.allow_pickle`` and ``weights_only=True``; nothing touches the network; the
manifest records sha256 hashes of the forget items and of the base and final models; ``train.deterministic: true``
makes CPU runs bit-identical (what holds on CUDA: :mod:`.loop`).
"""

from __future__ import annotations

from typing import Any, Sequence

from .config import ConfigError, EngineConfig, load_config

__all__ = ["ConfigError", "EngineConfig", "load_config", "unlearn", "register_metric"]


def unlearn(config: Any, overrides: Sequence[str] = (), **kwargs: Any):
    """Load and validate ``config`` (a YAML path, a dict or an :class:`EngineConfig`), then run it."""
    from .loop import run

    cfg = config if isinstance(config, EngineConfig) else load_config(config, overrides)
    return run(cfg, **kwargs)


def register_metric(name: str, *, higher_is_better: bool = False):
    """See :func:`siss_fast.engine.validation.register_metric`."""
    from .validation import register_metric as _register

    return _register(name, higher_is_better=higher_is_better)
