"""Process settings for long CPU training runs: keep freed memory for reuse.

Why: glibc's ``malloc`` returns large freed blocks to the kernel, so every meta-training step
page-faults its activations in again. Keeping them in the process made MiniImagenet first-order
MAML 1.6x faster per step on 2 cores. The measurements are in docs/benchmarks.md, "Freed memory
and page faults".

The setting is process-wide, so the library never applies it on import. ``fastmaml train`` applies
it when asked (``train.reuse_freed_memory=true``), and scripts may call :func:`reuse_freed_memory`.
It is opt-in out of caution; docs/benchmarks.md has the torchrun exit abort that led to this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def reuse_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory in the process (no ``mmap``-ed blocks, no trimming).

    Returns whether it applied: ``False`` off Linux or without glibc (musl, other allocators
    preloaded under glibc's names still accept the calls). Safe to call more than once.
    """
    if platform.system() != "Linux":
        return False
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Every block from the heap (none mmap-ed), and the heap's free top never given back.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
