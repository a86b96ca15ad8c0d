"""Files that are either whole or absent: the one way fastmaml writes checkpoints and caches."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np

FULL_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT)
STALE_FOREIGN_TEMP_S = 24 * 3600
"""A temp file whose writer cannot be checked (another host, an old name) is stale after a day."""


class DiskFullError(OSError):
    """A write ran out of space (or quota); the file it was replacing is left as it was."""


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write through a temp file in the same folder, fsync, ``os.replace``, fsync the folder.

    Readers see the old file or the new one, never half of one, even after a crash or SIGKILL.
    The temp file's name carries the writer's pid, so a later successful write removes the temp
    files that killed writers left beside ``path``. A full disk raises :class:`DiskFullError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as error:
        Path(temp).unlink(missing_ok=True)
        if _out_of_space(error, path.parent):
            raise DiskFullError(
                errno.ENOSPC, f"the disk holding {path.parent} is full ({os.strerror(errno.ENOSPC)}) while writing "
                f"{path.name}; {path} is left as it was. Free space there, then run the command again"
            ) from error
        raise
    fsync_folder(path.parent)
    remove_stale_temps(path)


def _out_of_space(error: BaseException, folder: Path) -> bool:
    """ENOSPC / EDQUOT, or a writer (torch's zip writer) that hid it in a RuntimeError on a full disk."""
    if isinstance(error, OSError):
        return error.errno in FULL_DISK_ERRORS
    if isinstance(error, RuntimeError):
        try:
            return shutil.disk_usage(folder).free < 1 << 20
        except OSError:
            return False
    return False


def fsync_folder(folder: Path) -> None:
    """Make renames in ``folder`` survive a power cut."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temp files of ``path`` whose writer is dead (or, unknown, that are over a day old)."""
    removed = []
    for temp in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        if _writer_alive(temp):
            continue
        try:
            temp.unlink()
            removed.append(temp)
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


def _writer_alive(temp: Path) -> bool:
    pid = temp.name.rsplit(".", 3)[-3] if temp.name.count(".") >= 3 else ""
    if pid.isdigit():
        if int(pid) == os.getpid():
            return False  # ours, and not in flight: write_atomic removes its own temp on every error
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        return time.time() - temp.stat().st_mtime < STALE_FOREIGN_TEMP_S
    except FileNotFoundError:
        return True


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
        except DiskFullError:
            raise
        except OSError as exc:
            raise OSError(
                f"cannot write the {what} cache {path} ({exc}); point FASTMAML_CACHE (or task.cache_dir) "
                f"at a writable folder"
            ) from exc
    return array
