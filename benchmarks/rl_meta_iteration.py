"""Where a MAML-TRPO meta-iteration spends its time: sampling, inner step, outer TRPO step.

    python benchmarks/rl_meta_iteration.py [--envs navigation2d halfcheetah_dir] [--iterations 3]

For each environment, with the preset's meta-batch and rollouts (overridable), it runs a few
meta-iterations of the real algorithm and reports the median seconds of each phase and the
sampler's environment steps per second (policy forward included). One torch thread by default.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fastmaml.rl import baselines, metarl, policies
from fastmaml.rl.config import load_rl_config
from fastmaml.rl.runner import build_env, inner_settings
from fastmaml.rl.sampling import sample


def time_meta_iteration(name: str, iterations: int, meta_batch: int | None, rollouts: int | None,
                        hvp: str) -> dict[str, float]:
    config = load_rl_config(f"rl/{name}", [f"outer.hvp={hvp}"])
    env = build_env(config)
    settings, outer = inner_settings(config), config.outer
    tasks_per_batch = meta_batch or config.train.meta_batch
    episodes = rollouts or config.train.rollouts
    rng = np.random.default_rng(0)
    theta = policies.init_policy(env.observation_dim, env.action_dim, config.policy.hidden,
                                 config.policy.init_std, torch.Generator().manual_seed(0))
    phases: dict[str, list[float]] = {"sample": [], "inner": [], "outer": [], "env_steps": []}
    for _ in range(iterations):
        tasks = env.sample_tasks(rng, tasks_per_batch)
        t0 = time.perf_counter()
        pre = sample(env, tasks, theta, episodes, rng, settings.nonlinearity)
        t1 = time.perf_counter()
        batch = metarl.pack(pre, baselines.advantages(pre.obs, pre.rewards, pre.mask, settings.gamma))
        adapted = metarl.inner_step(theta, batch, settings.lrs[0], settings, env.observation_dim, first_order=True)
        t2 = time.perf_counter()
        post = sample(env, tasks, {k: v.detach() for k, v in adapted.items()}, episodes, rng,
                      settings.nonlinearity)
        t3 = time.perf_counter()
        meta = metarl.collect(env, tasks, theta, settings, episodes, rng)  # the trainer's path, for the outer step
        t4 = time.perf_counter()
        theta, _ = metarl.trpo_step(theta, meta, settings, outer, env.observation_dim)
        t5 = time.perf_counter()
        phases["sample"].append((t1 - t0) + (t3 - t2))
        phases["inner"].append(t2 - t1)
        phases["outer"].append(t5 - t4)
        phases["env_steps"].append(pre.steps() + post.steps())
    result = {k: statistics.median(v) for k, v in phases.items()}
    result["steps_per_s"] = result["env_steps"] / result["sample"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="*", default=["navigation2d", "halfcheetah_dir"])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--meta-batch", type=int)
    parser.add_argument("--rollouts", type=int)
    parser.add_argument("--hvp", default="exact")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), hvp {args.hvp}\n")
    print("| env | tasks x episodes | env steps / iteration | sampling s (steps/s) | inner step s | "
          "TRPO step s | total s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.envs:
        r = time_meta_iteration(name, args.iterations, args.meta_batch, args.rollouts, args.hvp)
        config = load_rl_config(f"rl/{name}")
        shape = f"{args.meta_batch or config.train.meta_batch} x {args.rollouts or config.train.rollouts}"
        total = r["sample"] + r["inner"] + r["outer"]
        print(f"| {name} | {shape} | {r['env_steps']:.0f} | {r['sample']:.2f} ({r['steps_per_s']:.0f}) | "
              f"{r['inner']:.2f} | {r['outer']:.2f} | {total:.2f} |", flush=True)


if __name__ == "__main__":
    main()
