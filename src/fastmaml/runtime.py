"""Process settings for long CPU training runs: keep freed memory for reuse.

Why: glibc's ``malloc`` serves large blocks (above a threshold that grows to at most 32 MiB) with
``mmap`` and hands them back to the kernel on ``free``. A meta-training step allocates and frees
the same activation-sized blocks every step, so each step page-faults them in again: on
MiniImagenet first-order MAML (2 CPU cores) 690,000 minor faults per step and 1.8 s, against 2,000
faults and 1.1 s once freed memory stays in the process (learn2learn's step in the same process
gains the same; ``benchmarks/compare.py --reuse-freed-memory``). The price is a resident size that
stays at its high-water mark, which a training process reaches anyway on its first step.

This is a process-wide setting, so the library never applies it on import: ``fastmaml train``
does when asked (config ``train.reuse_freed_memory=true``), and scripts may call
:func:`reuse_freed_memory`. It is opt-in out of caution: two-process ``torchrun`` runs (gloo) of
the test suite's distributed worker aborted at exit ("terminate called without an active
exception") in 2 of 15 runs with it and 0 of 15 without. The same abort later appeared without it
too, and went away when ranks left the process group together (``DistContext.close``), so it may
not have been the cause.
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
