"""Files that are either whole or absent: the one way fastmaml writes checkpoints and caches."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temp file in the same folder, fsync, ``os.replace``, fsync the folder.

    Readers see the old file or the new one, never half of one, even after a crash or SIGKILL.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``FASTMAML_CACHE``, else ``~/.cache/fastmaml``."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("FASTMAML_CACHE") or Path.home() / ".cache" / "fastmaml").expanduser()


def read_cached_array(path: Path, valid: Callable[[np.ndarray], bool]) -> np.ndarray | None:
    """The array cached at ``path``, or ``None`` if it is absent, unreadable or not ``valid``.

    A broken cache is rebuilt by the caller, never trusted.
    """
    if not Path(path).is_file():
        return None
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    return array if valid(array) else None


def cached_array(path: Path, valid: Callable[[np.ndarray], bool], build: Callable[[], np.ndarray],
                 what: str) -> np.ndarray:
    """The array cached at ``path``; built by ``build`` and cached atomically when absent or broken."""
    array = read_cached_array(path, valid)
    if array is None:
        array = build()
        try:
            write_atomic(path, lambda f: np.save(f, array))
        except OSError as exc:
            raise OSError(
                f"cannot write the {what} cache {path} ({exc}); point FASTMAML_CACHE (or task.cache_dir) "
                f"at a writable folder"
            ) from exc
    return array
