"""Measure the execution plans that ``strategy="auto"`` chooses between, on compare.py's cases.

For each case: vmap over the whole meta-batch, vmap in backward chunks of 1/2/4/8/16 tasks, the
per-task loop (one graph, and one backward per task), the plan ``auto`` picks, and learn2learn
(the reference of compare.py), timed interleaved round-robin in one process, one thread, process
CPU time per meta-training step (median). These numbers are the evidence behind
:func:`fastmaml.core.choose_strategy`.

    python benchmarks/strategies.py [--cases omniglot-5w1s-q15 ...] [--rounds 3] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402

import fastmaml  # noqa: E402

PLANS = ["vmap", "vmap/1", "vmap/2", "vmap/4", "vmap/8", "vmap/16", "loop", "loop/1", "auto"]
"""``strategy/backward chunk``; ``auto`` is the learner's own plan (``MAML.plan``), ``auto@N`` the
same with ``task_threads=N`` (chunks on N worker threads; ``auto@1``: one after another)."""


def fastmaml_step(case: compare.Case, plan: str):
    plan, _, task_threads = plan.partition("@")
    strategy, _, chunk = plan.partition("/")
    torch.manual_seed(0)
    learner = fastmaml.MAML(case.model(), case.lr, case.steps, case.first_order, loss=case.loss, strategy=strategy,
                            task_threads=int(task_threads) if task_threads else None)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    episode = case.episode(torch.Generator().manual_seed(2))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if chunk:
            learner.backward_in_chunks(episode, int(chunk))
        else:
            learner.meta_loss(episode).loss.backward()
        optimizer.step()

    return step, learner.plan(episode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(compare.CASES), choices=list(compare.CASES))
    parser.add_argument("--plans", nargs="+", default=PLANS)
    parser.add_argument("--rounds", type=int, default=None, help="default: compare.py's per case")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1); above 1: wall ms, for an idle machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # One thread: process CPU time, which a shared machine disturbs least. Several threads: wall
    # time (CPU time would add the threads up), so run on an otherwise idle machine.
    clock, unit = (time.process_time, "CPU ms") if args.threads == 1 else (time.perf_counter, "wall ms")
    libs = compare.Libraries("auto")
    reference = "learn2learn" if libs["learn2learn"][0] is not None else "learn2learn-style"
    results = {}
    for name in args.cases:
        case = compare.CASES[name]
        steps, auto_plan = {}, None
        for plan in args.plans:
            chunk = plan.partition("@")[0].partition("/")[2]
            if chunk and int(chunk) >= case.tasks:
                continue  # the same as no chunks
            steps[plan], picked = fastmaml_step(case, plan)
            if plan == "auto":
                auto_plan = picked
        steps[reference] = compare.make_step(case, "learn2learn", libs, "cpu")[0]
        for step in steps.values():
            for _ in range(max(case.warmup, 1)):
                step()
        cpu: dict[str, list[float]] = {k: [] for k in steps}
        names = list(steps)
        for r in range(args.rounds or case.rounds):
            for plan in names[r % len(names):] + names[: r % len(names)]:
                start = clock()
                for _ in range(case.repeat):
                    steps[plan]()
                cpu[plan].append((clock() - start) / case.repeat * 1e3)
        medians = {k: statistics.median(v) for k, v in cpu.items()}
        results[name] = {"auto_plan": str(auto_plan), "unit": unit, "threads": args.threads,
                         "cpu_ms_median": medians, "cpu_ms": cpu}
        print(f"\n{case.title}\nauto picks {auto_plan}", flush=True)
        for plan, ms in medians.items():
            print(f"  {plan:18s} {ms:9.1f} {unit}/step  ({ms / medians[reference]:.2f}x {reference})", flush=True)
    columns = [p for p in [*args.plans, reference] if any(p in r["cpu_ms_median"] for r in results.values())]
    print("\n| case | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for name, r in results.items():
        cells = [f"{r['cpu_ms_median'][p]:.1f}" if p in r["cpu_ms_median"] else "" for p in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
