"""Env steps per second of each meta-RL batch env (fastmaml.rl.envs), one thread, random actions.

A MAML meta-iteration samples about 40 tasks x 20 rollouts x 200 steps twice (before and after
adaptation), so the env step rate bounds the sampler. Actions are uniform in [-1, 1]; an ant that
falls over is frozen and costs nothing, so the table also gives the share of steps actually simulated.
Wall-clock and per-CPU-second rates are both printed (on a shared machine the latter is the steadier).
``--backends`` also times, per CPU second, the alternatives to the implemented state-swap loop on the
raw simulator: one ``MjData`` per env, and ``mujoco.rollout`` once per policy step.

    python benchmarks/rl_env_speed.py [--steps 200] [--backends]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from fastmaml.rl.envs import load_model, make_batch_env

DEFAULT_SIZES = {"navigation2d": 800, "halfcheetah_vel": 800, "halfcheetah_dir": 800, "ant_vel": 400, "ant_dir": 400}


def time_env(name: str, num_envs: int, steps: int, seed: int = 0) -> tuple[float, float, float, float]:
    """Wall and CPU seconds for ``steps`` batch steps, wall seconds for the reset, share of env steps simulated."""
    env = make_batch_env(name)
    rng = np.random.default_rng(seed)
    env.set_tasks(env.sample_tasks(rng, num_envs))
    start = time.perf_counter()
    env.reset(rng)
    reset_s = time.perf_counter() - start
    actions = rng.uniform(-1.0, 1.0, (steps, num_envs, env.action_dim))
    done = np.zeros(num_envs, dtype=bool)
    live = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for t in range(steps):
        live += int(np.sum(~done)) if name.startswith("ant") else num_envs
        _, _, done = env.step(actions[t])
    return time.perf_counter() - start, time.process_time() - cpu_start, reset_s, live / (steps * num_envs)


def time_backends(xml: str, num_envs: int, steps: int, repeats: int = 3, frame_skip: int = 5) -> dict[str, float]:
    """Best-of-``repeats`` steps/s per CPU second of ways to step ``num_envs`` envs (one thread each).

    CPU time and interleaved repeats, so that other work on a shared machine does not pick the winner.
    """
    import mujoco
    import mujoco.rollout

    model = load_model(xml)
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1.0, 1.0, (steps, num_envs, model.nu))
    post = xml == "ant.xml"  # the ant needs contact forces, which mj_step alone does not compute
    S = mujoco.mjtState
    swap_spec = int(S.mjSTATE_FULLPHYSICS) | int(S.mjSTATE_WARMSTART) | int(S.mjSTATE_CTRL)
    full = int(S.mjSTATE_FULLPHYSICS)

    def fresh() -> list:
        noise = np.random.default_rng(1)
        datas = []
        for _ in range(num_envs):
            data = mujoco.MjData(model)
            data.qpos[:] += noise.uniform(-0.1, 0.1, model.nq)
            data.qvel[:] += 0.1 * noise.standard_normal(model.nv)
            mujoco.mj_forward(model, data)
            datas.append(data)
        return datas

    def states(spec: int) -> np.ndarray:
        out = np.empty((num_envs, mujoco.mj_stateSize(model, spec)))
        for i, data in enumerate(fresh()):
            mujoco.mj_getState(model, data, out[i], spec)
        return out

    def per_env_data() -> float:
        datas = fresh()
        qpos, qvel = np.empty((num_envs, model.nq)), np.empty((num_envs, model.nv))
        start = time.process_time()
        for t in range(steps):
            for i, data in enumerate(datas):
                data.ctrl[:] = actions[t, i]
                mujoco.mj_step(model, data, frame_skip)
                if post:
                    mujoco.mj_rnePostConstraint(model, data)
                qpos[i], qvel[i] = data.qpos, data.qvel
        return time.process_time() - start

    def swapped() -> float:
        state, data = states(swap_spec), mujoco.MjData(model)
        ctrl_at = mujoco.mj_stateSize(model, swap_spec & (int(S.mjSTATE_CTRL) - 1))
        start = time.process_time()
        for t in range(steps):
            state[:, ctrl_at : ctrl_at + model.nu] = actions[t]
            for i in range(num_envs):
                mujoco.mj_setState(model, data, state[i], swap_spec)
                mujoco.mj_step(model, data, frame_skip)
                if post:
                    mujoco.mj_rnePostConstraint(model, data)
                mujoco.mj_getState(model, data, state[i], swap_spec)
        return time.process_time() - start

    def rollout() -> float:
        state, data, runner = states(full), mujoco.MjData(model), mujoco.rollout.Rollout(nthread=0)
        start = time.process_time()
        for t in range(steps):
            out, _ = runner.rollout(model, data, state, actions[t][:, None, :], nstep=frame_skip)
            state = out[:, -1]
        return time.process_time() - start

    backends = {"one MjData per env": per_env_data, "one MjData, states swapped (used)": swapped}
    if not post:  # rollout returns states only: no contact forces, and it restarts the solver's warm start
        backends["mujoco.rollout per policy step (1 thread)"] = rollout
    best = dict.fromkeys(backends, float("inf"))
    for _ in range(repeats):
        for label, run in backends.items():
            best[label] = min(best[label], run())
    return {label: num_envs * steps / seconds for label, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--envs", nargs="+", default=list(DEFAULT_SIZES), choices=list(DEFAULT_SIZES))
    parser.add_argument("--backends", action="store_true", help="also compare simulator loops (50 steps)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print("| env | num_envs | steps | reset s | step s | env steps/s | per CPU s | us/env step (CPU) | simulated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.envs:
        n = DEFAULT_SIZES[name]
        seconds, cpu, reset_s, live = time_env(name, n, args.steps)
        rate, cpu_rate = n * args.steps / seconds, n * args.steps / cpu
        print(
            f"| {name} | {n} | {args.steps} | {reset_s:.3f} | {seconds:.2f} | {rate:,.0f} | {cpu_rate:,.0f} "
            f"| {1e6 / cpu_rate:.1f} | {100 * live:.0f}% |",
            flush=True,
        )
    if args.backends:
        print("\n| model | num_envs | backend | steps per CPU s |")
        print("|---|---|---|---|")
        for xml, n in (("half_cheetah.xml", 800), ("ant.xml", 400)):
            for backend, rate in time_backends(xml, n, steps=50 if xml == "half_cheetah.xml" else 10).items():
                print(f"| {xml} | {n} | {backend} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
