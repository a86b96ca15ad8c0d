"""MAML-TRPO's outer step: the closed-form exact Fisher-vector product against the double backward.

    python benchmarks/rl_fvp.py [--rounds 5] [--threads 1] [--shapes navigation2d halfcheetah]

Two meta-batches of the paper's sizes: 2D navigation sampled for real (``make_batch_env("navigation2d")``
and ``metarl.collect``: 20 tasks x 20 episodes of 100 steps, policy 2 x 100 ReLU), and a half-cheetah-shaped
synthetic one (observation 17, action 6, 20 tasks x 10 episodes of 200 steps, random episodes: only the
shapes matter for timing). For each it times, interleaved in one process (median of ``--rounds``):

* one Fisher-vector product: ``method="exact-double-backward"`` (a double backward through the vmapped
  inner step, the previous implementation) against ``"exact"`` (the Gauss-Newton closed form with cached
  inner-step linearisations), plus each one's setup (what is computed once per TRPO step);
* a whole ``trpo_step`` (meta-gradient, 10 conjugate-gradient iterations, line search) with each;

and reports how far apart their results are (float32 rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from fastmaml.rl import baselines, metarl, policies, trpo
from fastmaml.rl.envs import make_batch_env
from fastmaml.rl.sampling import Trajectories

OLD, NEW = "exact-double-backward", "exact"


def navigation(seed: int = 0) -> tuple[dict, metarl.MetaBatch, metarl.InnerSettings, int]:
    env = make_batch_env("navigation2d")
    settings = metarl.InnerSettings(lrs=(0.1,))
    rng = np.random.default_rng(seed)
    theta = policies.init_policy(env.observation_dim, env.action_dim, (100, 100), 1.0,
                                 torch.Generator().manual_seed(seed))
    meta = metarl.collect(env, env.sample_tasks(rng, 20), theta, settings, 20, rng)
    return theta, meta, settings, env.observation_dim


def halfcheetah_shaped(seed: int = 0, tasks: int = 20, episodes: int = 10, horizon: int = 200, obs_dim: int = 17,
                       action_dim: int = 6) -> tuple[dict, metarl.MetaBatch, metarl.InnerSettings, int]:
    settings = metarl.InnerSettings(lrs=(0.1,))
    gen = torch.Generator().manual_seed(seed)
    theta = policies.init_policy(obs_dim, action_dim, (100, 100), 1.0, gen)

    def episodes_() -> Trajectories:
        shape = (tasks, episodes, horizon)
        return Trajectories(torch.randn(*shape, obs_dim, generator=gen), torch.randn(*shape, action_dim, generator=gen),
                            torch.randn(*shape, generator=gen), torch.ones(shape))

    support = episodes_()
    batch = metarl.pack(support, baselines.advantages(support.obs, support.rewards, support.mask, settings.gamma))
    adapted = {k: v.detach() for k, v in metarl.inner_step(theta, batch, settings.lrs[0], settings, obs_dim,
                                                           first_order=True).items()}
    post = episodes_()
    with torch.no_grad():
        old_logp = torch.func.vmap(policies.log_prob)(adapted, post.obs, post.actions)
        old_mean = torch.func.vmap(policies.action_mean)(adapted, post.obs)
    meta = metarl.MetaBatch([batch], post, baselines.advantages(post.obs, post.rewards, post.mask, settings.gamma),
                            old_logp, old_mean, adapted["log_std"], [])
    return theta, meta, settings, obs_dim


SHAPES = {"navigation2d": navigation, "halfcheetah": halfcheetah_shaped}


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(theta: dict, meta: metarl.MetaBatch, settings: metarl.InnerSettings, obs_dim: int,
            rounds: int) -> dict[str, dict[str, float]]:
    v = torch.randn(trpo.flatten(theta).numel(), generator=torch.Generator().manual_seed(1))
    times: dict[str, dict[str, list[float]]] = {m: {"setup": [], "fvp": [], "trpo_step": []} for m in (OLD, NEW)}
    products, steps = {}, {}
    for _ in range(rounds):
        for method in (OLD, NEW):  # interleaved, so both see the same machine load
            setup, fvp = _timed(lambda m=method: metarl.fisher_vector_product(theta, meta, settings, obs_dim, m))
            times[method]["setup"].append(setup)
            product_s, products[method] = _timed(lambda f=fvp: f(v))
            times[method]["fvp"].append(product_s)
            outer = metarl.OuterSettings(hvp=method)
            step_s, steps[method] = _timed(lambda o=outer: metarl.trpo_step(theta, meta, settings, o, obs_dim))
            times[method]["trpo_step"].append(step_s)
    result = {m: {k: statistics.median(x) for k, x in t.items()} for m, t in times.items()}
    new_theta, old_theta = trpo.flatten(steps[NEW][0]), trpo.flatten(steps[OLD][0])
    result["diff"] = {
        "fvp": ((products[NEW] - products[OLD]).norm() / products[OLD].norm()).item(),
        "trpo_step": ((new_theta - old_theta).norm() / (old_theta - trpo.flatten(theta)).norm()).item(),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} interleaved rounds\n")
    print("| shape | samples / phase | FVP setup s (old / new) | FVP s (old / new, speed-up) | "
          "trpo_step s (old / new, speed-up) | rel. diff FVP / step |")
    print("|---|---|---|---|---|---|")
    for name in args.shapes:
        theta, meta, settings, obs_dim = SHAPES[name]()
        r = measure(theta, meta, settings, obs_dim, args.rounds)
        old, new, diff = r[OLD], r[NEW], r["diff"]
        print(f"| {name} | {meta.post.mask.numel()} | {old['setup']:.3f} / {new['setup']:.3f} | "
              f"{old['fvp']:.3f} / {new['fvp']:.3f} ({old['fvp'] / new['fvp']:.1f}x) | "
              f"{old['trpo_step']:.2f} / {new['trpo_step']:.2f} ({old['trpo_step'] / new['trpo_step']:.1f}x) | "
              f"{diff['fvp']:.1e} / {diff['trpo_step']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
