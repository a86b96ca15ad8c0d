"""Meta-RL runs on disk: train with atomic checkpoints and exact resume, evaluate like the paper.

The shell around :mod:`fastmaml.rl.metarl` (which holds no I/O): the run directory has the same
layout as a supervised run (``config.yaml``, ``metrics.jsonl`` + TensorBoard, ``last.pt``), plus
``init.pt`` (the initial policy: the paper's "random initialisation" baseline, adapted the same way).
Everything random (tasks, initial states, exploration noise) comes from one numpy generator whose
state is checkpointed, so a resumed run continues exactly as if never interrupted.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastmaml.config import ConfigError, apply_overrides, build_config
from fastmaml.evaluate import mean_ci95
from fastmaml.experiment import resolve_device
from fastmaml.rl import metarl, policies
from fastmaml.rl.config import RLConfig, validate
from fastmaml.rl.envs import make_batch_env
from fastmaml.rl.sampling import BatchEnv
from fastmaml.runs import INIT, RunDir, RunLog, StopRequest, check_resume_changes, diverged, stopped_message

CHECKPOINTS = ("last", "best", "init")
RESUMABLE = ("name", "train.iterations", "train.checkpoint_every", "train.threads", "train.device", "eval.*",
             "outer.max_kl", "outer.cg_iterations", "outer.cg_damping", "outer.hvp", "outer.fd_eps",
             "outer.backtracks", "outer.backtrack_ratio", "outer.ppo_clip", "outer.ppo_epochs")
"""Config keys a meta-RL ``--resume`` may change: the outer step's settings are read afresh every iteration."""


def build_env(config: RLConfig) -> BatchEnv:
    return make_batch_env(config.env.name, frame_skip=config.env.frame_skip or None,
                          squared_distance=config.env.squared_distance)


def inner_settings(config: RLConfig, evaluation: bool = False) -> metarl.InnerSettings:
    """Step sizes: ``inner_steps`` x alpha in training; alpha, then alpha * later_lr_scale at test."""
    alpha = config.meta.inner_lr
    if evaluation:
        lrs = (alpha, alpha * config.eval.later_lr_scale)
    else:
        lrs = () if config.meta.algorithm == "pretrain" else (alpha,) * config.meta.inner_steps
    return metarl.InnerSettings(lrs=lrs, first_order=config.meta.first_order, estimator=config.meta.estimator,
                                gamma=config.meta.gamma, nonlinearity=config.policy.nonlinearity)


def load_run_rl_config(run_dir: Path, overrides: list[str] | None = None) -> RLConfig:
    run = RunDir(run_dir)
    data = run.read_config_data()
    return validate(apply_overrides(build_config(RLConfig, data, source=str(run / "config.yaml")), overrides or []))


def train_rl(config: RLConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Meta-train a policy into ``run_dir``; with ``resume``, continue from its last checkpoint exactly.

    Nothing is written until the run can start (see :mod:`fastmaml.runs`).
    """
    run = RunDir(run_dir)
    try:
        return _train_rl(config, run, resume, progress)
    finally:
        run.release()


def _train_rl(config: RLConfig, run: RunDir, resume: bool, progress: bool) -> dict[str, Any]:
    run_dir = run.path
    cfg = config.train
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not resume and run.has_checkpoint():
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it, or another --run-dir")
    env = build_env(config)
    settings, outer = inner_settings(config), config.outer
    theta, rng, start, ppo_state = (_restore(run, config, device) if resume else _start(run, config, env, device))
    run.write_config(config)

    def save() -> None:
        run.save_last({"theta": _cpu(theta), "iteration": iteration, "rng": _rng_state_to_tensor(rng),
                       "ppo": ppo_state})

    log = RunLog(run_dir, resume_step=start if resume else None)
    bar = _progress(progress, start, cfg.iterations)
    iteration = start
    stop = StopRequest()  # Ctrl-C / SIGTERM: finish the meta-iteration, checkpoint it, return
    stop.install()
    try:
        for iteration in range(start + 1, cfg.iterations + 1):
            began = time.perf_counter()
            tasks = env.sample_tasks(rng, cfg.meta_batch)
            meta = metarl.collect(env, tasks, theta, settings, cfg.rollouts, rng, device)
            sampled = time.perf_counter()
            if outer.method == "trpo":
                new_theta, stats = metarl.trpo_step(theta, meta, settings, outer, env.observation_dim)
            else:
                new_theta, stats = metarl.ppo_step(theta, meta, settings, outer, env.observation_dim, ppo_state)
            finished = time.perf_counter()
            returns = meta.returns
            if not all(math.isfinite(r) for r in returns) or not all(torch.isfinite(v).all() for v in
                                                                      new_theta.values()):
                raise diverged(run, f"non-finite returns {returns} or parameters at meta-iteration {iteration}",
                               "Lower outer.max_kl, then resume (fastmaml train --resume DIR outer.max_kl=...), or "
                               "restart with a lower meta.inner_lr.")
            theta = new_theta
            record = {"pre_return": returns[0], "post_return": returns[-1],
                      **{f"return_step{k}": r for k, r in enumerate(returns)}, **stats,
                      "sample_inner_s": sampled - began, "outer_s": finished - sampled,
                      "env_steps": sum(b.y[..., 1].sum().item() for b in meta.batches) + meta.post.steps()}
            log.write(iteration, **record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(pre=f"{returns[0]:.1f}", post=f"{returns[-1]:.1f}")
            if iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations or stop.requested:
                save()
            if stop.requested:
                log.write(iteration, event="stopped", message=stopped_message(run, "meta-iteration", iteration))
                break
    finally:
        stop.uninstall()
        log.close()
        if bar is not None:
            bar.close()
    if not run.has_checkpoint():
        save()
    return {"iteration": iteration, "run_dir": str(run_dir)}


def _restore(run: RunDir, config: RLConfig, device: torch.device) -> tuple[Any, np.random.Generator, int, dict]:
    """Lock the run, refuse changes its checkpoint cannot honour, load policy, generator and step."""
    run.open_resume()
    check_resume_changes(run.read_config_data(), asdict(config), RESUMABLE)
    state = run.load_last()
    rng = np.random.default_rng()
    rng.bit_generator.state = _rng_state_from_tensor(state["rng"])
    return {k: v.to(device) for k, v in state["theta"].items()}, rng, state["iteration"], state.get("ppo", {})


def _start(run: RunDir, config: RLConfig, env: BatchEnv, device: torch.device) -> tuple[Any, np.random.Generator,
                                                                                      int, dict]:
    """The seeded initial policy and generator; owns the run directory and saves ``init.pt``."""
    generator = torch.Generator().manual_seed(config.train.seed)
    theta = policies.init_policy(env.observation_dim, env.action_dim, config.policy.hidden, config.policy.init_std,
                                 generator)
    theta = {k: v.to(device) for k, v in theta.items()}
    run.open_new()
    run.save(INIT, {"theta": _cpu(theta), "iteration": 0})
    return theta, np.random.default_rng(config.train.seed), 0, {}


def evaluate_rl_run(run_dir: Path, which: str = "last", overrides: list[str] | None = None,
                    name: str = "eval") -> dict[str, Any]:
    """Average return over ``eval.tasks`` fixed test tasks after 0..steps policy-gradient steps,
    with 95% confidence intervals over tasks; writes ``NAME.json`` and ``NAME.md``."""
    run = RunDir(run_dir)
    if which not in CHECKPOINTS:
        raise ConfigError(f"checkpoint {which!r}: use one of {', '.join(CHECKPOINTS)}")
    config = load_run_rl_config(run_dir, overrides)
    device = resolve_device(config.train.device)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    env = build_env(config)
    state = run.load_checkpoint("last" if which == "best" else which)  # meta-RL keeps no best: the last
    theta = {k: v.to(device) for k, v in state["theta"].items()}
    ev = config.eval
    tasks = env.sample_tasks(np.random.default_rng(ev.seed), ev.tasks)
    start = time.perf_counter()
    returns = metarl.evaluate_adaptation(env, tasks, theta, inner_settings(config, evaluation=True), ev.steps,
                                         ev.rollouts, np.random.default_rng(ev.seed + 1), device)
    curve = mean_ci95(returns)
    result = {"env": config.env.name, "checkpoint": which, "iteration": state["iteration"], "tasks": ev.tasks,
              "rollouts": ev.rollouts, "inner_lr": config.meta.inner_lr, "later_lr_scale": ev.later_lr_scale,
              "return": {"mean": curve.mean, "ci95": curve.ci95}, "seconds": time.perf_counter() - start}
    run.write_text(f"{name}.json", json.dumps(result, indent=2))
    run.write_text(f"{name}.md", format_rl_table(result))
    return result


def format_rl_table(result: dict[str, Any]) -> str:
    header = (f"{result['env']}: average return over {result['tasks']} test tasks x {result['rollouts']} episodes "
              f"({result['checkpoint']} checkpoint, meta-iteration {result['iteration']}); mean +- 95% CI\n\n")
    rows = "| policy-gradient steps | return |\n|---|---|\n"
    for k, (m, c) in enumerate(zip(result["return"]["mean"], result["return"]["ci95"])):
        rows += f"| {k} | {m:.2f} +- {c:.2f} |\n"
    return header + rows


def _cpu(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in params.items()}


def _rng_state_to_tensor(rng: np.random.Generator) -> torch.Tensor:
    """The generator's state as bytes in a uint8 tensor (checkpoints load with ``weights_only``)."""
    return torch.frombuffer(bytearray(json.dumps(rng.bit_generator.state).encode()), dtype=torch.uint8)


def _rng_state_from_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    return json.loads(bytes(tensor.tolist()).decode())


def _progress(enabled: bool, start: int, total: int):  # noqa: ANN202
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="meta-RL", unit="it", dynamic_ncols=True)
