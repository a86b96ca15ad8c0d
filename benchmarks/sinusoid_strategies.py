"""Time one sinusoid meta-training iteration: vmapped tasks vs the per-task loop, side by side.

One iteration = inner loop + outer backward + Adam step on the paper's preset (MLP 1-40-40-1,
meta-batch 25, K = 10, one inner step). The strategies are interleaved round by round in one
process so that machine noise hits both alike; the figure reported is the ratio of medians.

    python benchmarks/sinusoid_strategies.py [--threads 1] [--rounds 30] [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastmaml
from fastmaml.tasks.sinusoid import SinusoidTasks


def make_step(strategy: str, seed: int = 0):
    torch.manual_seed(seed)
    learner = fastmaml.MAML(fastmaml.sinusoid_mlp(), inner_lr=0.01, inner_steps=1, strategy=strategy)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    tasks = SinusoidTasks(shots=10, queries=10)
    generator = torch.Generator().manual_seed(seed)

    def step() -> float:
        episode = tasks.sample(25, generator)
        out = learner.meta_loss(episode)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return out.loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=20, help="iterations per strategy per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    strategies = {"vmap": make_step("vmap"), "loop": make_step("loop")}
    for step in strategies.values():  # warm-up
        for _ in range(20):
            step()
    times: dict[str, list[float]] = {name: [] for name in strategies}
    for _ in range(args.rounds):
        for name, step in strategies.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"torch {torch.__version__}, {args.threads} thread(s), sinusoid preset (meta-batch 25, K=10, 1 step)")
    print("| strategy | ms / meta-iteration (median) |")
    print("|---|---|")
    for name, ms in median.items():
        print(f"| {name} | {ms:.2f} |")
    print(f"loop / vmap = {median['loop'] / median['vmap']:.1f}x")


if __name__ == "__main__":
    main()
