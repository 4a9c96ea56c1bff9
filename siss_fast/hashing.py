"""sha256 of files, streamed in 1 MiB blocks: the one helper behind every hash siss_fast records (checkpoint files,
kept states, forget items, model folders, pretraining records)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Union

__all__ = ["sha256_file", "update_from_file"]

BLOCK = 1 << 20


def update_from_file(digest: Any, path: Union[str, Path]) -> Any:
    """Feed the bytes of ``path`` into ``digest`` (a ``hashlib`` object), block by block; returns ``digest``."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            digest.update(block)
    return digest


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of the file at ``path``."""
    return update_from_file(hashlib.sha256(), path).hexdigest()
