"""Independent pieces of a meta-batch on concurrent CPU threads, one intra-op thread each.

Why: on CPU torch splits every operation over its intra-op threads, and MAML's per-task kernels
(a few images through a small conv net) are too small to split well: learn2learn's per-task loop
runs only 1.4-1.7x faster on two cores than on one. Tasks are independent until their gradients
are summed, so two tasks at a time, each on one core, use both cores almost fully (1.8-1.9x the
one-thread speed on Omniglot, against 1.4-1.7x).
Measurements: ``benchmarks/strategies.py --threads 2`` and docs/benchmarks.md.

Threads rather than processes: torch kernels release the GIL, parameters are shared without
copies, and autograd runs a graph's backward on the thread that calls it. Each worker sets its
own intra-op thread count to one (OpenMP's count is per calling thread); the caller's is restored.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait
from typing import TypeVar

import torch

Item = TypeVar("Item")
Share = TypeVar("Share")
Result = TypeVar("Result")


class ChunkThreads:
    """A fixed set of daemon worker threads, each with its own job queue.

    :meth:`run` gives worker ``w`` the ``w``-th share of the work; which worker runs which share is
    fixed, so whatever a worker sums (its chunks' gradients, in order) is summed the same way on
    every call: results are deterministic for a fixed thread count.
    """

    def __init__(self, threads: int) -> None:
        if threads < 2:
            raise ValueError(f"ChunkThreads needs at least 2 threads, got {threads}")
        self.threads = threads
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(threads)]
        ready = threading.Barrier(threads + 1)
        caller_threads = torch.get_num_threads()
        self._workers = [
            threading.Thread(target=self._work, args=(index, ready), name=f"fastmaml-chunk-{index}", daemon=True)
            for index in range(threads)
        ]
        for worker in self._workers:
            worker.start()
        ready.wait()
        # torch.set_num_threads in a worker also changes the default that threads created later
        # start with; put the caller's count back (the workers keep their own).
        torch.set_num_threads(caller_threads)

    def _work(self, index: int, ready: threading.Barrier) -> None:
        # A thread takes torch's process-wide count the first time it asks for it; set one only
        # after that, or its first parallel operation would reset it to the caller's count.
        torch.get_num_threads()
        torch.set_num_threads(1)
        ready.wait()
        jobs = self._queues[index]
        while True:
            fn, share, future = jobs.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(index, share))
            except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(error)

    def run(self, fn: Callable[[int, Share], Result], shares: Sequence[Share]) -> list[Result]:
        """``[fn(w, shares[w]) for w in range(len(shares))]``, share ``w`` on worker ``w``, all at once.

        The caller should do no tensor work of its own meanwhile: its idle intra-op threads spin
        for milliseconds after each parallel operation, taking a core from the workers. If a share
        raises, the first such error is raised here after every share has finished.
        """
        if len(shares) > self.threads:
            raise ValueError(f"{len(shares)} shares for {self.threads} worker threads")
        futures: list[Future] = []
        for index, share in enumerate(shares):
            future: Future = Future()
            self._queues[index].put((fn, share, future))
            futures.append(future)
        wait(futures)
        return [future.result() for future in futures]


def deal(items: Sequence[Item], hands: int) -> list[list[Item]]:
    """``items`` dealt round-robin into at most ``hands`` shares (``[items[0], items[hands], ...], ...``)."""
    return [list(items[start::hands]) for start in range(min(hands, len(items)))]


_POOLS: dict[tuple[int, int], ChunkThreads] = {}
_POOLS_LOCK = threading.Lock()


def chunk_threads(threads: int) -> ChunkThreads:
    """The process's pool of ``threads`` workers, started on first use (and again after a fork,
    whose child has none of its parent's threads)."""
    key = (os.getpid(), threads)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ChunkThreads(threads)
        return _POOLS[key]
