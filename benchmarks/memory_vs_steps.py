"""Peak memory and time of one second-order meta-iteration vs inner steps: plain vs checkpointed.

Second-order MAML keeps every inner step's activation graph for the outer backward, so memory
grows with the number of steps. Checkpointing keeps one parameter set per step and recomputes
the rest in the backward pass. Each configuration runs in a fresh subprocess (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA), on the paper's MiniImagenet network or ResNet-12.

    python benchmarks/memory_vs_steps.py [--steps 1 5 10 20] [--device cpu] [--tasks 2] [--queries 15]
    python benchmarks/memory_vs_steps.py --models conv resnet12 --steps 5 --tasks 1 --iterations 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def peak_rss_mib() -> float:
    """This process's peak resident memory. ``VmHWM`` (Linux) starts afresh at ``exec``, unlike
    ``ru_maxrss``, which keeps the parent's high-water mark when the parent was large (pytest)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(name: str, filters: int, image: int):  # noqa: ANN201 - torch is imported in the worker only
    import fastmaml

    if name == "resnet12":  # MetaOptNet's widths; --filters does not apply
        return fastmaml.ResNet12(5, in_channels=3)
    return fastmaml.ConvNet(5, in_channels=3, filters=filters, pool=True, image_size=image)


def measure(steps: int, checkpoint: bool, device: str, tasks: int, queries: int, image: int, filters: int,
            iterations: int = 4, model: str = "conv") -> dict:
    """Run in this process: one warm-up and ``iterations - 1`` timed meta-iterations; peak memory and time."""
    import torch

    import fastmaml

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dev = torch.device(device)
    learner = fastmaml.MAML(build_model(model, filters, image), 0.01, steps, loss="cross_entropy", strategy="loop",
                            checkpoint=checkpoint).to(dev)
    optimizer = torch.optim.Adam(learner.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    support = torch.rand(tasks, 5, 3, image, image, generator=g)
    query = torch.rand(tasks, 5 * queries, 3, image, image, generator=g)
    episode = fastmaml.Episode(support, torch.arange(5).repeat(tasks, 1), query,
                               torch.arange(5).repeat_interleave(queries).repeat(tasks, 1)).to(dev)
    base = peak_rss_mib()
    times = []
    for i in range(iterations):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        learner.meta_loss(episode).loss.backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else peak_rss_mib() - base
    return {"model": model, "steps": steps, "checkpoint": checkpoint, "peak_mib": peak,
            "ms": 1e3 * sorted(times)[len(times) // 2]}


def run_isolated(**kwargs) -> dict:
    """:func:`measure` in a fresh interpreter, so one configuration's peak cannot hide another's."""
    code = f"import json, sys; sys.path.insert(0, {sys.path[0]!r}); import memory_vs_steps as m; " \
           f"print(json.dumps(m.measure(**{kwargs!r})))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", type=int, default=2, help="meta-batch (the 5-shot preset uses 2)")
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--image", type=int, default=84)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--models", nargs="+", choices=["conv", "resnet12"], default=["conv"])
    parser.add_argument("--iterations", type=int, default=4, help="meta-iterations per run (the first is warm-up)")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for steps in args.steps:
            for checkpoint in (False, True):
                rows.append(run_isolated(steps=steps, checkpoint=checkpoint, device=args.device, tasks=args.tasks,
                                         queries=args.queries, image=args.image, filters=args.filters,
                                         iterations=args.iterations, model=model))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.image}px RGB, 5-way 1-shot, {args.queries} queries/class, meta-batch {args.tasks}, second order, "
          f"{args.device}; conv: the paper's MiniImagenet net with {args.filters} filters; resnet12: 64-160-320-640")
    print("| model | inner steps | plain peak MiB | recomputed peak MiB | plain ms | recomputed ms |")
    print("|---|---|---|---|---|---|")
    for plain, ckpt in zip(rows[::2], rows[1::2]):
        print(f"| {plain['model']} | {plain['steps']} | {plain['peak_mib']:.0f} | {ckpt['peak_mib']:.0f} | "
              f"{plain['ms']:.0f} | {ckpt['ms']:.0f} |")


if __name__ == "__main__":
    main()
