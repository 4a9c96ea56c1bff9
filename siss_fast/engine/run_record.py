"""The run record: how a run ends on disk, and how a later command recognises a finished run.

A run ends in this order, each piece written atomically (temp file or folder, then one ``os.replace``):

1. the stop decision -- ``{"reason", "step"}`` -- goes into the checkpoint of the step at which it was taken (a
   checkpoint is written at that step whatever ``checkpoint.every`` says, when checkpoints are on): a process killed
   after it resumes straight into the final write, with the decision and the kept state of the uninterrupted run;
2. the closing record of ``metrics.jsonl``;
3. ``final/`` (the kept weights as a diffusers folder);
4. ``manifest.json`` with ``"status": "finished"``, the stop rule, its step, the kept step and the sha256 of
   ``final/`` -- the marker of a finished run.

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

__all__ = ["FinishedRunError", "read_finished", "verify_final", "describe_finished", "refuse_new_run", "write_manifest"]

FINISHED = "finished"


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
