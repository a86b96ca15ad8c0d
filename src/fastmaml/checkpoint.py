"""Atomic checkpoints: a run never loses finished work, and a crash never leaves half a file.

Write to a temporary file in the same directory, fsync it, ``os.replace`` it over the target
(atomic on POSIX), then fsync the directory so the rename itself survives a power cut.
Checkpoints hold only tensors and plain Python values, so they load with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastmaml.storage import write_atomic


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that ``path`` is always either the old or the new file."""
    write_atomic(Path(path), lambda f: torch.save(state, f))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``); a missing file names what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; train first (fastmaml train CONFIG) or check the run directory"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(
            f"checkpoint {path} is unreadable ({error}); delete it to restart from the previous one"
        ) from error
