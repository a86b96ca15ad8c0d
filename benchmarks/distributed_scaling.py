"""Time one data-parallel meta-iteration on CPU: 1 process vs N processes (gloo on 127.0.0.1).

The global meta-batch is fixed; with N processes each samples meta_batch / N tasks, runs
meta_loss + backward on them, and the meta-gradients (with the loss) are averaged in one
``all_reduce`` before the Adam step: the loop of ``fastmaml.train`` with its
:class:`fastmaml.distributed.DistContext`, minus logging. Cases: the sinusoid preset and an
Omniglot-shaped one (the 5-way 1-shot preset's conv net, 15 queries per class, random images, so
no data set is needed). Each process uses one torch thread. Reported: median ms per meta-iteration
over rounds (timed on rank 0; every rank waits for the others in the all_reduce), the mean time
rank 0 spends in the all_reduce (communication plus waiting for the slower rank), and the speed-up.

    python benchmarks/distributed_scaling.py [--procs 1 2] [--rounds 3] [--cases sinusoid omniglot]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

from fastmaml.config import load_config
from fastmaml.distributed import from_env, shard_size, task_seed
from fastmaml.episode import Episode
from fastmaml.experiment import build_learner, build_tasks

CASES = {
    # name: (preset, overrides, timed steps per round)
    "sinusoid": ("sinusoid", ["train.meta_batch=32"], 100),
    "omniglot": ("omniglot_5way1shot", ["train.meta_batch=32", "task.queries=15"], 3),
}


def random_images(ways: int, shots: int, queries: int):
    """An Omniglot-shaped task source with random images (shapes and dtypes as the real sampler's)."""

    def sample(num_tasks: int, generator: torch.Generator) -> Episode:
        def images(n: int) -> torch.Tensor:
            return torch.rand(num_tasks, n * ways, 1, 28, 28, generator=generator)

        def labels(n: int) -> torch.Tensor:
            return torch.arange(ways).repeat_interleave(n).expand(num_tasks, -1).contiguous()

        return Episode(images(shots), labels(shots), images(queries), labels(queries))

    return sample


def worker(rank: int, world: int, port: int, case: str, rounds: int, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    preset, overrides, steps = CASES[case]
    config = load_config(preset, overrides)
    ctx = from_env()
    device = torch.device("cpu")
    ctx.start(device)
    try:
        torch.manual_seed(0)
        learner = build_learner(config, device)
        ctx.broadcast_module(learner)
        optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
        if config.task.name == "sinusoid":
            sample = build_tasks(config, "train", device).sample
        else:
            sample = random_images(config.task.ways, config.task.shots, config.task.queries)
        local = shard_size(config.train.meta_batch, ctx.world_size)
        generator = torch.Generator().manual_seed(task_seed(0, ctx.rank))
        params = list(learner.parameters())

        waited = [0.0]

        def step() -> None:
            out = learner.meta_loss(sample(local, generator))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            start = time.perf_counter()
            ctx.average_gradients([p for p in params if p.grad is not None], [out.loss])
            waited[0] += time.perf_counter() - start
            optimizer.step()

        for _ in range(max(2, steps // 5)):  # warm-up
            step()
        times, waited[0] = [], 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - start) / steps)
        if ctx.is_main:
            results.put((statistics.median(times) * 1e3, waited[0] / (rounds * steps) * 1e3))
    finally:
        ctx.close()


def time_case(case: str, world: int, rounds: int) -> tuple[float, float]:
    spawn = mp.get_context("spawn")
    results = spawn.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, case, rounds, results), nprocs=world, join=True)
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"1 thread per process, gloo on 127.0.0.1; load average before: {os.getloadavg()[0]:.1f}")
    print("| case | global meta-batch | processes | ms / meta-iteration (median) | in all_reduce (mean) | speed-up |")
    print("|---|---|---|---|---|---|")
    for case in args.cases:
        baseline = None
        meta_batch = load_config(CASES[case][0], CASES[case][1]).train.meta_batch
        for world in args.procs:
            ms, reduce_ms = time_case(case, world, args.rounds)
            baseline = baseline or ms
            print(f"| {case} | {meta_batch} | {world} | {ms:.1f} | {reduce_ms:.2f} | {baseline / ms:.2f}x |",
                  flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f} (other processes on the machine slow the larger world more)")


if __name__ == "__main__":
    main()
