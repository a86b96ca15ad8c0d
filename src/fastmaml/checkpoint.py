"""Checkpoint files: atomic, checksummed, and loaded without running code.

A checkpoint is written whole or not at all (:func:`fastmaml.storage.write_atomic`: temp file,
fsync, rename), so a crash never leaves half a file. What can still happen to a whole file (a
flipped bit on disk, a copy that truncated it) is caught by a sha256 over every tensor's bytes and
every other value, stored in the file under :data:`CHECKSUM_KEY`: :func:`load` recomputes it before
trusting a single number. The file stays a plain ``torch.save`` of the state dict, so
``torch.load(path, weights_only=True)["learner"]`` keeps working; files written before checksums
(no such key) load as they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from fastmaml.storage import write_atomic

CHECKSUM_KEY = "sha256"


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be trusted: unreadable, truncated or failing its checksum."""


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` (a dict) to ``path`` so that ``path`` is always either the old or the new file."""
    stamped = {**state, CHECKSUM_KEY: digest(state)}
    write_atomic(Path(path), lambda f: torch.save(stamped, f))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint (``weights_only=True``); a missing file names what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; train first (fastmaml train CONFIG) or check the run directory"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"checkpoint {path} is unreadable ({_first_line(error)})") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a fastmaml checkpoint")
    expected = state.pop(CHECKSUM_KEY, None)
    if expected is not None and digest(state) != expected:
        raise CheckpointError(f"checkpoint {path} fails its sha256 checksum: the file was damaged after it was written")
    return state


def digest(state: Any) -> str:
    """sha256 over a nested structure of dicts, lists, tensors and plain values, in order."""
    h = hashlib.sha256()
    _feed(state, h)
    return h.hexdigest()


def _feed(value: Any, h: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        h.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"dict {len(value)}:".encode())
        for key, item in value.items():
            _feed(key, h)
            _feed(item, h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__} {len(value)}:".encode())
        for item in value:
            _feed(item, h)
    else:
        h.update(f"{type(value).__name__} {value!r};".encode())


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__
