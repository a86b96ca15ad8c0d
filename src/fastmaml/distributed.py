"""Data-parallel meta-training with ``torch.distributed``, launched by ``torchrun``.

Each rank samples ``meta_batch / world_size`` tasks with its own task generator, computes the
mean meta-loss of its tasks, and the meta-gradients are averaged over the ranks with one
``all_reduce`` of a single flattened bucket. With equal shards the average over ranks of per-rank
means is the mean over all tasks, so every rank applies the update a single process would apply
to the meta-batch made of the union of the ranks' tasks, and the replicas stay identical.

A plain ``all_reduce`` is used rather than ``DistributedDataParallel``: the learner's entry point
is ``meta_loss``, not ``forward``, so DDP's hooks would need a wrapper; the meta-gradient is
small (one bucket); and the loss and accuracy ride in the same collective, so one step costs one
``all_reduce``. The same code runs in one process, where every method here is a no-op.

Example (one process; under ``torchrun`` the same calls talk to the other ranks):

>>> ctx = from_env({})
>>> ctx.world_size, ctx.rank, shard_size(25, ctx.world_size), task_seed(0, rank=0)
(1, 0, 25, 1)
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastmaml.config import ConfigError

__all__ = ["DistContext", "ReplicaMismatch", "from_env", "shard_size", "task_seed"]

T = TypeVar("T")


class ReplicaMismatch(RuntimeError):
    """The ranks' parameters differ; they must stay identical for the run to mean anything."""


def shard_size(meta_batch: int, world_size: int) -> int:
    """Tasks each rank samples per meta-batch; the meta-batch must split evenly over the ranks."""
    if meta_batch % world_size:
        lower = max(world_size, meta_batch - meta_batch % world_size)
        upper = meta_batch + world_size - meta_batch % world_size
        raise ConfigError(
            f"train.meta_batch={meta_batch} does not split over {world_size} processes: each rank samples "
            f"meta_batch / world_size tasks. Use train.meta_batch={lower} or {upper} (a multiple of {world_size}), "
            f"or launch a number of processes that divides {meta_batch}"
        )
    return meta_batch // world_size


def task_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s task generator: different streams per rank, reproducible per run.

    Rank 0 uses ``seed + 1``, the single-process trainer's seed, so one process is the
    ``world_size == 1`` case of the same scheme. Other ranks hash ``(seed, rank)``, so no rank of one
    run replays another rank, or another seed's rank 0 (as ``seed + 1 + rank`` would).
    """
    if rank == 0:
        return seed + 1
    digest = hashlib.sha256(f"fastmaml.task_rng/{seed}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class DistContext:
    """Where this process sits in the job; every collective is a no-op when ``world_size == 1``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """Whether :meth:`start` created the process group (and so :meth:`close` destroys it)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- set-up ------------------------------------------------------------------------
    def device(self, device: torch.device) -> torch.device:
        """The rank's device: ``cuda`` without an index means ``cuda:LOCAL_RANK``."""
        if self.enabled and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device: torch.device) -> None:
        """Join the process group (gloo on CPU, nccl on CUDA) unless the caller already did."""
        if not self.enabled:
            return
        if device.type == "cuda":  # NCCL's object collectives use the current device
            torch.cuda.set_device(device)
        if dist.is_initialized():
            return
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.owns_group = True

    def close(self, finished: bool = False) -> None:
        """Leave the process group; after a ``finished`` run, all ranks together.

        Why together: a rank that tore its group down while rank 0 was still writing the last
        checkpoint sometimes aborted at exit ("terminate called without an active exception"; 3 of
        12 runs of the distributed tests, 0 of 8 with the barrier). Not after an error: a rank
        waiting there for one stuck elsewhere would hang instead of letting torchrun stop the job.
        """
        if self.owns_group and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
        self.owns_group = False

    # -- collectives ---------------------------------------------------------------------
    def run_on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and hand its result, or its exception, to every rank.

        Checks that only rank 0 can make (the run directory, the checkpoint) then fail on every
        rank with the same message, instead of leaving the others blocked in a collective.
        """
        if not self.enabled:
            return fn()
        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload[0] = (True, fn())
            except Exception as error:  # noqa: BLE001 - re-raised below, on every rank
                payload[0] = (False, _picklable(error))
        dist.broadcast_object_list(payload, src=0)
        ok, value = payload[0]
        if not ok:
            raise value
        return value

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank, in place."""
        if not self.enabled:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def average_gradients(self, params: Sequence[nn.Parameter], scalars: Sequence[Tensor]) -> list[float]:
        """Average the gradients of ``params`` and the ``scalars`` over the ranks in one ``all_reduce``.

        ``params`` must be the same list, in the same order, on every rank (their ``.grad``s all set).
        Returns the averaged scalars as floats; the gradients are replaced in place.
        """
        grads = [p.grad for p in params]
        if not self.enabled:
            return [s.item() for s in scalars]
        reference = grads[0] if grads else scalars[0]
        flat = torch.cat([*(g.reshape(-1) for g in grads),
                          *(s.detach().reshape(1).to(reference) for s in scalars)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return flat[offset:].tolist()

    def all_gather_object(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        payload = [obj]
        dist.broadcast_object_list(payload, src=0)
        return payload[0]

    def check_replicas(self, module: nn.Module, step: int) -> None:
        """Fail on every rank if any rank's parameters differ from rank 0's (one broadcast, one max)."""
        if not self.enabled:
            return
        with torch.no_grad():
            mine = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
            reference = mine.clone()
            dist.broadcast(reference, src=0)
            diff = (mine - reference).abs().max().nan_to_num(float("inf")).reshape(1)
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if diff.item() != 0:
            raise ReplicaMismatch(
                f"at iteration {step} the ranks' parameters differ from rank 0's (max |difference| {diff.item():.3g}); "
                "every rank must run the same code, software and device type. Resume from the last checkpoint, "
                "which holds rank 0's parameters."
            )


def _picklable(error: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any exception that cannot cross processes becomes a plain one
        return RuntimeError(f"{type(error).__name__}: {error}")


def from_env(environ: Mapping[str, str] | None = None) -> DistContext:
    """The job layout from ``torchrun``'s variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).

    An already initialised process group (a caller's own launcher) takes precedence; without
    either, this is a single process.
    """
    if dist.is_available() and dist.is_initialized():
        env = os.environ if environ is None else environ
        return DistContext(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", 0)))
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", 1))
    if world_size <= 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {', '.join(missing)} unset; launch with torchrun "
                          "(torchrun --nproc_per_node=N -m fastmaml.cli train ...), which sets them")
    return DistContext(int(env["RANK"]), world_size, int(env.get("LOCAL_RANK", 0)))
