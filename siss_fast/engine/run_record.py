"""The run record: how a run ends on disk, and how a later command recognises a finished run.

A run ends in this order, each piece written atomically (temp file or folder, then one ``os.replace``):

1. the stop decision -- ``{"reason", "step"}`` -- goes into the checkpoint of the step at which it was taken (a
   checkpoint is written at that step whatever ``checkpoint.every`` says, when checkpoints are on): a process killed
   after it resumes straight into the final write, with the decision and the kept state of the uninterrupted run;
2. the closing record of ``metrics.jsonl``;
3. ``final/`` (the kept weights as a diffusers folder);
4. ``manifest.json`` with ``"status": "finished"``, the stop rule, its step, the kept step and the sha256 of
   ``final/`` (of the folder, and of every file in it: ``final_model.files``) -- the marker of a finished run.

The manifest also records ``manifest_format`` (:data:`MANIFEST_FORMAT`) and ``validation_seeds``
(:func:`validation_seeds`: every ``torch.Generator`` seed the run's validation drew from), so that an audit
(``siss-fast verify``, :mod:`siss_fast.verify`) can re-measure on seeds the stop rule never saw. Both are additions:
a manifest without them (an earlier run of this version) is still a finished run; an auditor derives the seeds from
its ``config`` with the same function.

A finished run is never reopened by a retry: ``resume`` on it checks ``final/`` against the manifest's hash, says
that the run is finished and changes no file (:func:`verify_final`, in ``loop.run``); a new run (no ``resume``) into its folder is
refused (:class:`FinishedRunError`). Continuing past the stop is a new run seeded from the finished one
(``model=RUN/final output_dir=NEW``; README, "Retries and resuming").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from .checkpoint import CheckpointError

__all__ = ["FinishedRunError", "read_finished", "verify_final", "describe_finished", "refuse_new_run", "write_manifest",
           "final_files", "validation_seeds", "update_manifest", "MANIFEST_FORMAT", "SAMPLER_SEED_STRIDE"]

FINISHED = "finished"
MANIFEST_FORMAT = 1  # the layout of manifest.json written by this version (keys below); absent in older manifests
SAMPLER_SEED_STRIDE = 100003  # siss_fast.metrics.sampling: chunk i of seed s draws from Generator(s * 100003 + i)


class FinishedRunError(CheckpointError):
    """A new run was pointed at the folder of a finished run."""


def read_finished(out: Path) -> Optional[Dict[str, Any]]:
    """The manifest of the finished run in ``out``, or None when ``out`` holds no finished run (no manifest yet, a
    manifest of an older version without ``status``, or a torn one)."""
    path = Path(out) / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("status") == FINISHED else None


def verify_final(out: Path, manifest: Dict[str, Any]) -> str:
    """Check ``out/final`` against the manifest's sha256; return the hash. Raises :class:`CheckpointError` naming the
    folder when it is missing or its content changed."""
    from .models import hash_model_folder

    final = Path(out) / "final"
    expected = (manifest.get("final_model") or {}).get("sha256")
    if not final.is_dir():
        raise CheckpointError(f"{str(final)!r} is missing, but {str(Path(out) / 'manifest.json')!r} says the run "
                              "finished: restore the folder, or start a new run in a new output_dir")
    actual = hash_model_folder(final)
    if actual != expected:
        raise CheckpointError(f"{str(final)!r} does not match the sha256 recorded in "
                              f"{str(Path(out) / 'manifest.json')!r} ({actual[:12]} != {str(expected)[:12]}): the final "
                              "model was changed after the run finished")
    return actual


def describe_finished(manifest: Dict[str, Any]) -> str:
    """One line: rule, step, kept step, final hash."""
    stop = manifest.get("stop") or {}
    return (f"stop rule {stop.get('reason', manifest.get('stop_reason'))} at step "
            f"{stop.get('step', manifest.get('steps_done'))}, kept step {stop.get('kept_step')}, final model "
            f"sha256 {str((manifest.get('final_model') or {}).get('sha256'))[:16]}")


def refuse_new_run(out: Path, manifest: Dict[str, Any]) -> None:
    raise FinishedRunError(
        f"output_dir {str(out)!r} holds a finished run ({describe_finished(manifest)}). A retry with resume=latest "
        "changes nothing; a new run needs a new output_dir; to continue past the stop, start a new run from its final "
        f"model: model={str(Path(out) / 'final')} output_dir=NEW_DIR")


def write_manifest(out: Path, manifest: Dict[str, Any]) -> None:
    """``out/manifest.json`` with ``status: finished``, written to a temp file and renamed into place."""
    path = Path(out) / "manifest.json"
    tmp = path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps({**manifest, "status": FINISHED}, indent=2, default=str))
    os.replace(tmp, path)


def update_manifest(out: Path, changes: Dict[str, Any]) -> Dict[str, Any]:
    """Merge ``changes`` into ``out/manifest.json`` (top-level keys; every other key is kept as it is) through a
    temp file and one ``os.replace``; returns the new manifest. The status is not touched."""
    path = Path(out) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    tmp = path.with_name(".manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, path)
    return manifest


def final_files(folder: Path) -> Dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (sorted; ``/`` separators)."""
    from ..hashing import sha256_file

    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def validation_seeds(config: Dict[str, Any], n_forget: int) -> Dict[str, Any]:
    """Every ``torch.Generator`` seed the validation of a run with this resolved ``config`` (``to_dict``, as in
    ``config.json``) draws from, with ``n_forget`` forget items::

        {"sampler": {"seed", "num_samples", "batch_size", "generator_seeds": [s * 100003 + i, i < chunks]},
         "metrics": {name: [seeds]},          # as each metric declares them (its ``generator_seeds``)
         "undeclared": [names],               # metrics that declare none: their seeds are unknown
         "generator_seeds": sorted union}

    The sampler's seeds are the engine's; each metric's come from its own declaration in the registry
    (:func:`siss_fast.metrics.registry.metric_seeds`: e.g. ``forget_probe`` ``s * 1009 + k``, ``feature_fd``
    ``s, s + 1``, ``retain_fit`` ``s``, ``forget_nn`` none) with its ``metric_options``. Empty when validation is off
    (``every`` 0)."""
    from ..metrics.registry import metric_seeds

    v = config.get("validation") or {}
    if not v.get("every"):
        return {"sampler": None, "metrics": {}, "undeclared": [], "generator_seeds": []}
    seed, n, batch = int(v.get("seed", 0)), int(v.get("num_samples") or 0), int(v.get("batch_size") or 1)
    chunks = -(-n // batch)
    sampler = {"seed": seed, "num_samples": n, "batch_size": batch,
               "generator_seeds": [seed * SAMPLER_SEED_STRIDE + i for i in range(chunks)]}
    options = v.get("metric_options") or {}
    metrics: Dict[str, Any] = {}
    undeclared = []
    for name in v.get("metrics") or []:
        seeds = metric_seeds(name, options.get(name) or {}, n_forget)
        if seeds is None:
            undeclared.append(name)
        elif seeds:
            metrics[name] = seeds
    union = set(sampler["generator_seeds"]).union(*[set(x) for x in metrics.values()])
    return {"sampler": sampler, "metrics": metrics, "undeclared": undeclared, "generator_seeds": sorted(union)}
