"""The lean unlearning engine (layer 4): ``siss-fast unlearn CONFIG [key=value ...]``.

Modules, each readable in one sitting:

* :mod:`.config` -- YAML -> typed dataclasses, overrides, validation before any model loads (:class:`ConfigError`);
* :mod:`.data` -- image folders, prompts, cached VAE latents and text embeddings, seeded sample streams;
* :mod:`.models` -- offline safetensors loading of pixel DDPMs and Stable Diffusion; tiny random-weight builders;
* :mod:`.setup` -- device, processes, optimizer, LR schedule, gradient combiner;
* :mod:`.partition` -- the partitioned split (exact SISS gradient at about one backward);
* :mod:`.loop` -- the steps, metrics, checkpoints, validation and stop rules, outputs (``run``);
* :mod:`.checkpoint` -- atomic, hash-verified checkpoints and RNG states;
* :mod:`.validation` -- DDIM samples with fixed seeds, the metric registry, stop rules.

Importing this package does not import diffusers or transformers; :func:`unlearn` does.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

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
