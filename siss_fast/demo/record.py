"""What a demo run leaves behind, written once for both demos (``siss-fast demo`` and ``--text-to-image``).

The engine writes ``manifest.json`` (its run record) into the run directory; a demo then adds its own audit record
to it and writes ``report.json`` and ``report.md``::

    manifest = read_engine_manifest(run_dir)              # the engine's record (may be read before writing)
    write_run_record(run_dir, report, manifest, kind="siss-fast demo: ...", forget_items=forget_items(run_dir, ...),
                     base_model={...}, method=method_record(...), config=..., unlearning=..., before=..., after=...)

In the manifest the engine's validation scores move under ``engine_validation`` (the demo's ``metrics_before`` /
``metrics_after`` are its own, independent judge), and the demo adds the forget items with their content hashes,
the method, its config, the software versions and the finishing time.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from siss_fast.hashing import sha256_file
from siss_fast.methods import get_method

__all__ = ["say", "method_lambd", "method_record", "software_versions", "forget_items", "read_engine_manifest",
           "write_run_record", "audit_run"]


def say(msg: str, start: float) -> None:
    """A progress line, stamped with the seconds since ``start`` (a ``time.perf_counter()`` value)."""
    print(f"[{time.perf_counter() - start:6.1f} s] {msg}", flush=True)


def method_lambd(name: str, lambd: Optional[float]) -> Optional[float]:
    """``lambd`` if method ``name`` takes it (its record in :mod:`siss_fast.methods`), else None."""
    return lambd if get_method(name).lambd is not None else None


def method_record(name: str, lambd: Optional[float], **extra: Any) -> Dict[str, Any]:
    """``{"name", "lambd" (None for methods that do not take it), **extra}`` for the report and the manifest."""
    return {"name": name, "lambd": method_lambd(name, lambd), **extra}


def software_versions(*extra_modules: str) -> Dict[str, str]:
    """Python, platform, torch, siss_fast and its backend, and the versions of the demo's libraries (plus
    ``extra_modules``) that are installed."""
    import siss_fast

    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "siss_fast": siss_fast.__version__, "backend": siss_fast.get_backend()}
    for mod in ("diffusers", "safetensors", "sklearn", "numpy", *extra_modules):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            pass
    return out


def forget_items(run_dir: Path, folder: Path, **extra: Any) -> List[Dict[str, Any]]:
    """One record per forget image (``folder/*.png``, sorted): its path relative to ``run_dir``, the sha256 of the
    PNG file and of its 8-bit grey pixels, ``extra`` and the pixel shape."""
    import numpy as np
    from PIL import Image

    items = []
    for path in sorted(Path(folder).glob("*.png")):
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L"), dtype=np.uint8)
        items.append({"file": str(path.relative_to(run_dir)), "sha256": sha256_file(path),
                      "sha256_pixels_uint8": hashlib.sha256(arr.tobytes()).hexdigest(), **extra,
                      "shape": list(arr.shape)})
    return items


def read_engine_manifest(run_dir: Path) -> Dict[str, Any]:
    """The engine's ``manifest.json`` in ``run_dir`` (empty if there is none)."""
    path = Path(run_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _merge_items(engine: Sequence[Dict[str, Any]], demo: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The engine's forget-item records (``file`` = the name in ``data.forget_dir``, what ``siss-fast verify``
    checks) with the demo's extra keys (pixel hash, copies in the training set, prompt) joined by file name."""
    by_name = {Path(d["file"]).name: d for d in engine}
    return [{**d, **by_name.get(Path(d["file"]).name, {})} for d in demo]


def write_run_record(run_dir: Path, report: Dict[str, Any], manifest: Dict[str, Any], *, kind: str,
                     forget_items: Sequence[Dict[str, Any]], base_model: Dict[str, Any], method: Dict[str, Any],
                     config: Dict[str, Any], unlearning: Dict[str, Any], before: Dict[str, Any],
                     after: Dict[str, Any], software: Dict[str, str]) -> None:
    """Write ``report.json``, the demo's audit record into the engine's ``manifest`` (``manifest.json``, temp file +
    rename) and ``report.md`` (from the two). The engine's keys stay as the engine wrote them (``config`` is the
    engine's resolved config, which ``siss-fast verify`` audits against); the demo's own settings go under
    ``demo_config``."""
    from .report import rebuild_report

    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    manifest = dict(manifest)
    if "metrics_before" in manifest:  # the engine's validation scores, kept under their own name
        manifest["engine_validation"] = {"before": manifest.pop("metrics_before"),
                                         "after": manifest.pop("metrics_after", None),
                                         "method": manifest.pop("method", None)}
    manifest.update({
        "kind": kind,
        "forget_items": _merge_items(manifest.get("forget_items") or [], forget_items),
        "base_model": {**manifest.get("base_model", {}), **base_model},
        "method": method, "demo_config": config, "unlearning": unlearning,
        "metrics_before": before, "metrics_after": after, "pass_criteria": report["pass_criteria"],
        "software": software, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": report["wall_s"],
    })
    tmp = run_dir / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, run_dir / "manifest.json")
    rebuild_report(run_dir)


def audit_run(run_dir: Path, start: float, **verify_options: Any) -> Dict[str, Any]:
    """``siss-fast verify`` on a demo's finished run (``RUN_DIR/verify/``, :func:`siss_fast.verify.verify_run` with
    ``verify_options``); its headline numbers for the report's "Proof of deletion" section: ``{"folder", "passed",
    "seed", "samples", "relearn_steps", "retain_fit_ratio", "seconds", "items": [{file, prompt (SD), base, final
    (rate and 95 % interval), membership percentiles, relearning peak and return step, the controls'}],
    "perturbation_max_final_rate" (SD)}``."""
    from siss_fast.verify import verify_run

    run_dir = Path(run_dir)
    result = verify_run(run_dir, log=lambda message: say(message, start), **verify_options)
    data = result.report
    members = data["membership"]["items"]  # one row per forget item, in item order
    items = [{"file": it["file"], "prompt": it.get("prompt"), "base": it["base"], "final": it["final"],
              "membership_percentile": {k: members[it["item"]][f"percentile_{k}"] for k in ("base", "final")},
              "relearn_peak_rate": it["relearn_peak_rate"], "returned_at_step": it["returned_at_step"],
              "base_control_returned_at_step": it.get("base_control_returned_at_step"),
              "retrained_peak_rate": it.get("control_peak_rate")} for it in data["items"]]
    folder = result.out_dir
    perturbation = data.get("perturbation") or {}
    return {"folder": str(folder.relative_to(run_dir)) if run_dir in folder.parents else str(folder),
            "passed": result.passed, "seed": data["seeds"]["verify_seed"], "samples": data["settings"]["samples"],
            "relearn_steps": data["settings"]["relearn_steps"], "retain_fit_ratio": data["quality"]["retain_fit_ratio"],
            "items": items, "perturbation_max_final_rate": perturbation.get("max_final_rate"),
            "perturbation_samples": perturbation.get("samples"), "seconds": round(data["timings_s"]["total_s"], 1)}
