"""Atomic, verifiable checkpoints: ``OUTPUT_DIR/checkpoints/step-000050/``.

A checkpoint folder holds

* ``unet.safetensors``: the trained weights (fp32 master copy; with ``train.lora_rank`` > 0 the adapter alone);
* ``trainer.pt``: optimizer, LR schedule, ``GradientCombiner.state_dict()``, the loop's own state (step counter,
  skip counter, validation/best-model bookkeeping) -- tensors and plain Python only, read with
  ``torch.load(weights_only=True)``;
* ``rng-rank{r}.pt``: every random state of process ``r``: python, numpy, torch CPU, CUDA (if any), and the
  generators of its sample streams;
* ``COMPLETE.json``: the sha256 of every file above, written **last**.

Everything is written into ``.tmp-step-N/`` and renamed into place with one ``os.replace``: a save interrupted at any
point leaves no ``step-N`` folder (stale ``.tmp-*`` folders are removed by the next save). Loading verifies the
hashes: a missing or damaged file raises :class:`CheckpointError` -- never a silent start from garbage. Only the last
``keep_last`` checkpoints are kept.

Faults (tested in ``tests/test_reliability.py``):

* ``SIGKILL`` at any moment, including mid-save, leaves at worst a ``.tmp-step-N/`` folder, which is never listed or
  loadable (no ``COMPLETE.json``); ``resume=latest`` picks the last complete checkpoint, and the resumed run's final
  weights equal an uninterrupted run's (CPU). Files are not fsync'ed: a power loss (not a process kill) right after a
  save may need the checkpoint before it.
* Disk full (any ``OSError`` while writing): the half-written temp folder is deleted (freeing its space), the older
  checkpoints are untouched, and :class:`CheckpointError` says so -- **the run stops**. Going on without checkpoints
  would silently put hours of work at the mercy of the next crash; free space and ``resume=latest`` instead.
* Only ``unet.safetensors``, ``trainer.pt`` and ``rng-rank{r}.pt`` are read (after their hashes check out), the two
  ``.pt`` files with ``torch.load(weights_only=True)``: a checkpoint folder holding a foreign pickle cannot execute
  code; any other file in the folder is never loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..hashing import sha256_file

__all__ = ["CheckpointError", "capture_rng", "restore_rng", "save_checkpoint", "load_checkpoint",
           "list_checkpoints", "find_latest"]

_NAME = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted (incomplete, damaged, or from another run layout)."""


# ------------------------------------------------------------------------------------------------- RNG states


def capture_rng(streams: List[Any]) -> Dict[str, Any]:
    """Every random state of this process (plain data + uint8 tensors, loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "streams": [s.state_dict() for s in streams],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any], streams: List[Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if len(state["streams"]) != len(streams):
        raise CheckpointError(f"the checkpoint has {len(state['streams'])} sample streams, this run "
                              f"{len(streams)}: resume with the same world size and accumulation_steps")
    for stream, s in zip(streams, state["streams"]):
        stream.load_state_dict(s)


# ----------------------------------------------------------------------------------------------------- saving


def list_checkpoints(root: Path) -> List[Path]:
    """Complete-looking ``step-N`` folders under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_latest(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: Path, step: int, unet_state: Dict[str, torch.Tensor], trainer_state: Dict[str, Any],
                    rng_states: Dict[int, Dict[str, Any]], keep_last: int) -> Path:
    """Write ``root/step-{step:06d}`` atomically; return its path. ``rng_states`` maps rank -> capture_rng()."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    tmp.mkdir()

    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in unet_state.items()}
        save_file(tensors, str(tmp / "unet.safetensors"))
        torch.save(trainer_state, tmp / "trainer.pt")
        for rank, rng in rng_states.items():
            torch.save(rng, tmp / f"rng-rank{rank}.pt")
        hashes = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        (tmp / "COMPLETE.json").write_text(json.dumps({"step": step, "sha256": hashes}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:  # disk full, quota, I/O error: drop the partial folder, keep the older ones, stop loudly
        shutil.rmtree(tmp, ignore_errors=True)
        previous = find_latest(root)
        kept = (f"the previous checkpoint {str(previous)!r} is intact" if previous is not None
                else "there is no earlier checkpoint")
        raise CheckpointError(f"cannot write checkpoint step {step} in {str(root)!r}: {exc}. The run stops rather "
                              f"than go on without checkpoints; {kept}: free space, then rerun with "
                              "resume=latest") from exc
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(folder: Path, rank: int = 0) -> Dict[str, Any]:
    """Verify and read a checkpoint: ``{"step", "unet", "trainer", "rng"}``. Raises CheckpointError."""
    from safetensors.torch import load_file

    folder = Path(folder)
    marker = folder / "COMPLETE.json"
    if not marker.is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r} is incomplete (no COMPLETE.json): it was not fully "
                              "written; delete it or resume from another one")
    try:
        meta = json.loads(marker.read_text())
        hashes = meta["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {str(folder)!r}: damaged COMPLETE.json: {exc}") from None
    for name in ("unet.safetensors", "trainer.pt", f"rng-rank{rank}.pt"):
        if name not in hashes:
            raise CheckpointError(f"checkpoint {str(folder)!r} has no {name} (saved by another world size?)")
    for name, expected in hashes.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(folder)!r}: file {name} is missing")
        if sha256_file(path) != expected:
            raise CheckpointError(f"checkpoint {str(folder)!r}: file {name} is damaged (sha256 mismatch)")
    try:
        unet = load_file(str(folder / "unet.safetensors"))
        trainer = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(folder / f"rng-rank{rank}.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {str(folder)!r}: cannot read: {exc}") from None
    return {"step": int(meta["step"]), "unet": unet, "trainer": trainer, "rng": rng}
