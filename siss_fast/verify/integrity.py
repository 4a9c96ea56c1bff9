"""Opening a finished run for audit: the manifest, the hashes of ``final/``, the base model and the forget items.

:func:`open_run` reads ``RUN_DIR/manifest.json`` and checks, in this order, each failure a :class:`VerifyError`
whose message names the file:

1. the manifest exists, is JSON, says ``"status": "finished"`` (a run still in progress or killed is refused);
2. it is of this package's format: ``manifest_format`` (when present) equals
   :data:`~siss_fast.engine.run_record.MANIFEST_FORMAT`, and ``software.siss_fast`` equals this version;
3. every file listed in ``final_model.files`` exists under ``final/`` with that sha256, no file was added, and the
   folder hash (``final_model.sha256``, :func:`~siss_fast.engine.models.hash_model_folder`) matches (a manifest
   without the per-file list -- an earlier run of this version -- gets the folder check alone);
4. the base model folder (``config.model.path``, or ``RUN_DIR/base_model`` for a built one) hashes to
   ``base_model.sha256``, and the forget images in ``config.data.forget_dir`` are the ones of ``forget_items``.

Nothing is written here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from ..engine import run_record
from ..hashing import sha256_file

__all__ = ["VerifyError", "RunUnderAudit", "open_run", "check_final"]


class VerifyError(Exception):
    """The run cannot be audited (unfinished, another version or format, a missing or changed file)."""


@dataclass
class RunUnderAudit:
    """A finished run whose files match its manifest."""

    run_dir: Path
    manifest: Dict[str, Any]
    config: Dict[str, Any]  # the resolved config of the run (manifest["config"])
    base_dir: Path  # the base model folder
    final_dir: Path
    forget_files: List[Path]
    retain_files: List[Path]


def _load_manifest(run_dir: Path) -> Dict[str, Any]:
    path = run_dir / "manifest.json"
    if not run_dir.is_dir():
        raise VerifyError(f"{str(run_dir)!r}: no such run directory")
    if not path.is_file():
        raise VerifyError(f"{str(path)!r} is missing: the run has not finished (or this is not a run directory); "
                          "verify audits finished runs only -- resume it with resume=latest first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerifyError(f"{str(path)!r} is not valid JSON ({exc}): torn or edited") from None
    if not isinstance(manifest, dict) or manifest.get("status") != run_record.FINISHED:
        status = manifest.get("status") if isinstance(manifest, dict) else None
        raise VerifyError(f"{str(path)!r} has status {status!r}, not 'finished': the run is incomplete; resume it "
                          "with resume=latest before auditing it")
    return manifest


def _check_format(manifest: Dict[str, Any], path: Path) -> None:
    from .. import __version__

    fmt = manifest.get("manifest_format", run_record.MANIFEST_FORMAT)
    if fmt != run_record.MANIFEST_FORMAT:
        raise VerifyError(f"{str(path)!r} has manifest_format {fmt!r}; this siss_fast ({__version__}) reads format "
                          f"{run_record.MANIFEST_FORMAT}: audit it with the version that wrote it")
    written_by = (manifest.get("software") or {}).get("siss_fast")
    if written_by != __version__:
        raise VerifyError(f"{str(path)!r} was written by siss_fast {written_by!r}, this is {__version__}: audit the "
                          "run with the version that wrote it")
    for key in ("config", "final_model", "forget_items", "base_model"):
        if key not in manifest:
            raise VerifyError(f"{str(path)!r} lacks the key {key!r}: not a manifest of this format")


def check_final(run_dir: Path, manifest: Dict[str, Any]) -> Dict[str, str]:
    """Recompute the sha256 of every file of ``run_dir/final`` and compare with the manifest; returns
    ``{relative path: sha256}``. Raises :class:`VerifyError` naming the first missing, changed or added file."""
    from ..engine.models import hash_model_folder

    final, mpath = run_dir / "final", run_dir / "manifest.json"
    record = manifest.get("final_model") or {}
    if not final.is_dir():
        raise VerifyError(f"{str(final)!r} is missing, but {str(mpath)!r} says the run finished")
    listed = record.get("files")
    actual: Dict[str, str] = {}
    if listed is not None:
        for rel, expected in sorted(listed.items()):
            f = final / rel
            if not f.is_file():
                raise VerifyError(f"{str(f)!r} is missing: {str(mpath)!r} lists it with sha256 {expected[:16]}")
            actual[rel] = sha256_file(f)
            if actual[rel] != expected:
                raise VerifyError(f"{str(f)!r} does not match the sha256 recorded in {str(mpath)!r} "
                                  f"({actual[rel][:16]} != {expected[:16]}): changed after the run finished")
        extra = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()
                       and p.relative_to(final).as_posix() not in listed)
        if extra:
            raise VerifyError(f"{str(final / extra[0])!r} is not listed in {str(mpath)!r}: a file was added to the "
                              "final model after the run finished")
    folder_hash = hash_model_folder(final)
    if folder_hash != record.get("sha256"):
        raise VerifyError(f"{str(final)!r} does not match the folder sha256 recorded in {str(mpath)!r} "
                          f"({folder_hash[:16]} != {str(record.get('sha256'))[:16]}): the final model was changed")
    return actual or {p.relative_to(final).as_posix(): sha256_file(p) for p in sorted(final.rglob("*"))
                      if p.is_file()}


def _image_files(folder: str, key: str) -> List[Path]:
    from ..engine import data as engine_data

    try:
        return engine_data.scan_folder(folder, key).files
    except engine_data.DataError as exc:
        raise VerifyError(str(exc)) from None


def open_run(run_dir: Any) -> RunUnderAudit:
    """Open ``run_dir`` for audit (module doc); raises :class:`VerifyError`."""
    from ..engine.models import hash_model_folder

    run_dir = Path(run_dir)
    manifest = _load_manifest(run_dir)
    mpath = run_dir / "manifest.json"
    _check_format(manifest, mpath)
    check_final(run_dir, manifest)
    config = manifest["config"]
    model_cfg = config.get("model") or {}
    base = Path(model_cfg["path"]) if model_cfg.get("path") else run_dir / "base_model"
    if not base.is_dir():
        raise VerifyError(f"{str(base)!r} (the run's base model) is missing: verify compares against it")
    expected = (manifest.get("base_model") or {}).get("sha256")
    if hash_model_folder(base) != expected:
        raise VerifyError(f"{str(base)!r} (the base model) does not match the sha256 in {str(mpath)!r}: it changed "
                          "since the run")
    data = config.get("data") or {}
    forget = _image_files(data.get("forget_dir", ""), "data.forget_dir")
    retain = _image_files(data.get("retain_dir", ""), "data.retain_dir")
    recorded = {d["file"]: d["sha256"] for d in manifest["forget_items"]}
    for f in forget:
        if f.name not in recorded:
            raise VerifyError(f"{str(f)!r} is not among the forget items of {str(mpath)!r}")
        if sha256_file(f) != recorded[f.name]:
            raise VerifyError(f"{str(f)!r} does not match the forget item's sha256 in {str(mpath)!r}")
    missing = sorted(set(recorded) - {f.name for f in forget})
    if missing:
        raise VerifyError(f"{str(Path(data.get('forget_dir', '')) / missing[0])!r} (a forget item of the run) is "
                          "missing")
    if config.get("model", {}).get("build") is None and not model_cfg.get("path"):
        raise VerifyError(f"{str(mpath)!r}: the config names no base model")
    return RunUnderAudit(run_dir, manifest, config, base, run_dir / "final", forget, retain)
